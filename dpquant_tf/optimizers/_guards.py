"""Trace-time guards of the DP step (docs/METHOD.md section 4, invariants 8, 10).

* :class:`StepBinding`: the model and input batch of the owned step, handed
  to the optimizer explicitly (``DPQuantOptimizer.dp_step``), so it checks
  the per-example loss against the input batch and the model's layers. A
  step without one is refused (:class:`UnattributedStepError`).
* :func:`check_loss_rows`: the per-example loss has exactly one entry per
  input example (rank 1, length = rows of ``x``).
* :class:`IssuedGradients`: every update ``apply_gradients`` applies must be
  the very tensors the optimizer's own ``_compute_gradients`` returned in the
  same step (paired by Python identity at trace time, so it also holds under
  ``tf.function``, ``jit_compile`` and ``steps_per_execution``). Raw
  gradients raise :class:`UnrecordedUpdateError`; nothing here uses
  ``assert``, which ``python -O`` removes.
"""

from typing import List

import tensorflow as tf

from dpquant_tf import _validation as V

__all__ = ["IssuedGradients", "StepBinding", "UNATTRIBUTED_FIX",
           "UnattributedStepError", "UnrecordedUpdateError",
           "check_loss_rows"]

_MAX_ISSUED = 4096


class UnrecordedUpdateError(RuntimeError):
  """apply_gradients got gradients the DP step did not produce."""

  # Exception's own constructor: autograph then re-raises this type (with
  # its trace) from inside a tf.function instead of a generic StagingError.
  __init__ = Exception.__init__


class UnattributedStepError(ValueError):
  """A DP step was asked for outside the owned step (no model, no batch)."""

  # As UnrecordedUpdateError: autograph re-raises this type from a trace.
  __init__ = Exception.__init__


class StepBinding:
  """The model and input batch of one owned DP step, handed over explicitly.

  ``DPQuantOptimizer.dp_step`` creates one for the duration of its
  ``minimize`` call (at trace time); ``_compute_gradients`` reads it. Nothing
  is guessed: no stack frames are read and no side table maps data to rates.

  Attributes:
    model: the ``tf.keras.Model`` whose forward pass produced the loss.
    x: that forward pass's inputs (the loss must have one entry per row).
    forward_graph: the graph being traced in which the library's own train
      step ran that forward pass (None elsewhere): the model check reads
      the state writes of that very forward pass from it instead of tracing
      the model again.
  """

  __slots__ = ("model", "x", "forward_graph")

  def __init__(self, model, x, forward_graph=None):
    if not isinstance(model, tf.keras.Model):
      V.fail("model", type(model).__name__, "a tf.keras.Model (the model "
             "whose forward pass computed the per-example loss)", TypeError)
    if x is None or _input_rows(x) is None:
      V.fail("x", x, "the input batch of the step (a tensor or a structure "
             "of tensors with a batch axis)")
    self.model = model
    self.x = x
    self.forward_graph = forward_graph


UNATTRIBUTED_FIX = (
    "a DP step through the owned step, which hands the model and batch to "
    "the optimizer: use dpquant_tf.make_private(...), or pass "
    "dpquant_tf.PrivacyCallback(ledger, delta) to model.fit (it installs the "
    "owned train step), or call dpquant_tf.training.install_dp_train_step("
    "model) before fit; in a custom loop call optimizer.dp_step(model, x, "
    "per_example_loss, tape) instead of minimize/apply_gradients")


def _input_rows(x):
  for leaf in tf.nest.flatten(x):
    if isinstance(leaf, (tf.Tensor, tf.Variable)) or hasattr(leaf, "shape"):
      shape = getattr(leaf, "shape", None)
      if shape is not None and len(shape) >= 1:
        return leaf
  return None


def check_loss_rows(loss: tf.Tensor, x=None) -> List[tf.Operation]:
  """Refuses a loss that is not one entry per input example.

  Args:
    loss: the loss handed to the optimizer.
    x: the step's model inputs when known (see :class:`StepBinding`).

  Returns:
    Runtime checks (control dependencies for the update) when the number of
    rows is only known when the step runs; [] otherwise.

  Raises:
    ValueError: the loss is not a vector, or its static length differs from
      the static number of input rows.
  """
  if loss.shape.rank != 1:
    V.fail("loss", loss.shape, "a per-example loss vector of shape [batch] (one "
           "entry per input example): build the Keras loss with "
           "reduction=tf.keras.losses.Reduction.NONE and reduce any other "
           "axes per example")
  leaf = _input_rows(x) if x is not None else None
  if leaf is None:
    return []
  rows = leaf.shape[0]
  if rows is not None and loss.shape[0] is not None:
    if int(rows) != int(loss.shape[0]):
      V.fail("loss", loss.shape, f"one entry per input example ({int(rows)} rows): "
             "a loss that keeps a batch mean or folds examples makes one "
             "example move many entries, and q would be recorded wrongly")
    return []
  return [tf.debugging.assert_equal(
      tf.shape(loss, out_type=tf.int64)[0],
      tf.shape(leaf, out_type=tf.int64)[0],
      message=("Expected the per-example loss to have one entry per input "
               "example (its length differs from the rows of the input "
               "batch); build the loss with Reduction.NONE"))]


class IssuedGradients:
  """The gradients a DP step returned, redeemable once by apply_gradients.

  A plain (non-trackable) holder: nothing here is saved.
  """

  def __init__(self):
    self._issued = {}

  def issue(self, grads) -> None:
    for g in grads:
      self._issued[id(g)] = g
    while len(self._issued) > _MAX_ISSUED:
      self._issued.pop(next(iter(self._issued)))

  def redeem(self, grads_and_vars) -> list:
    """Returns the pairs as a list if every gradient was issued; consumes them.

    Raises:
      UnrecordedUpdateError: a gradient was not produced by this optimizer's
        own DP step (raw, modified, or already applied).
    """
    pairs = list(grads_and_vars)
    grads = [g for g, _ in pairs if g is not None]
    bad = [i for i, g in enumerate(grads) if self._issued.get(id(g)) is not g]
    if not grads or bad:
      V.fail("grads_and_vars", f"<{len(pairs)} gradients, {len(bad)} not "
             "from this optimizer's DP step>", "the gradients returned by "
             "this optimizer's own _compute_gradients in the same step "
             "(Keras fit or minimize()): a raw or modified apply_gradients "
             "would release an unclipped, unnoised and unrecorded update",
             UnrecordedUpdateError)
    for g in grads:
      self._issued.pop(id(g), None)
    return pairs

"""Trace-time guards of the DP step (docs/METHOD.md section 4, invariants 8, 10).

* :func:`calling_model` finds the Keras model whose ``train_step`` called the
  optimizer, and that step's inputs ``x``, so the optimizer can check the
  per-example loss against the input batch and the model's layers.
* :func:`check_loss_rows`: the per-example loss has exactly one entry per
  input example (rank 1, length = rows of ``x``).
* :class:`IssuedGradients`: every update ``apply_gradients`` applies must be
  the very tensors the optimizer's own ``_compute_gradients`` returned in the
  same step (paired by Python identity at trace time, so it also holds under
  ``tf.function``, ``jit_compile`` and ``steps_per_execution``). Raw
  gradients raise :class:`UnrecordedUpdateError`; nothing here uses
  ``assert``, which ``python -O`` removes.
"""

import sys
from typing import Any, List, Optional, Tuple

import tensorflow as tf

from dpquant_tf import _validation as V

__all__ = ["IssuedGradients", "UnrecordedUpdateError", "calling_model",
           "check_loss_rows"]

# _compute_gradients <- minimize <- Model.train_step is 3 frames up; a few
# more allow a wrapper (LossScaleOptimizer, a user's train_step override).
_MAX_FRAMES = 8
_MAX_ISSUED = 4096


class UnrecordedUpdateError(RuntimeError):
  """apply_gradients got gradients the DP step did not produce."""

  # Exception's own constructor: autograph then re-raises this type (with
  # its trace) from inside a tf.function instead of a generic StagingError.
  __init__ = Exception.__init__


def _optimizer_of(model) -> Any:
  opt = getattr(model, "optimizer", None)
  return getattr(opt, "inner_optimizer", None), opt


def calling_model(optimizer) -> Tuple[Optional[tf.keras.Model], Any]:
  """``(model, x)`` of the ``tf.keras.Model`` whose train step called us.

  Walks at most a few Python frames up from the caller looking for a frame
  whose ``self`` is a ``tf.keras.Model`` compiled with `optimizer` (directly
  or wrapped); ``x`` is that frame's ``x`` (``Model.train_step``), else the
  first element of its ``data``, else None. Outside Keras ``fit`` (a custom
  loop calling ``minimize``) this returns ``(None, None)``: the caller then
  checks what it can without the model.

  Args:
    optimizer: the optimizer doing the DP step.

  Returns:
    ``(model or None, x or None)``.
  """
  frame = sys._getframe(1)  # pylint: disable=protected-access
  for _ in range(_MAX_FRAMES):
    frame = frame.f_back
    if frame is None:
      break
    owner = frame.f_locals.get("self")
    if not isinstance(owner, tf.keras.Model):
      continue
    if not any(o is optimizer for o in _optimizer_of(owner)):
      continue
    local = frame.f_locals
    x = local.get("x")
    if x is None and isinstance(local.get("data"), (tuple, list)):
      x = local["data"][0] if local["data"] else None
    elif x is None:
      x = local.get("data")
    return owner, x
  return None, None


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
    x: the step's model inputs when known (see :func:`calling_model`).

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

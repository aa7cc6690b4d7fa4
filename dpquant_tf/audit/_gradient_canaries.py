"""Gradient canaries: white-box canaries injected into the clipped sum.

A gradient canary i is a fixed random unit direction u_i in the flattened
trainable-parameter space. While ``gradient_canaries(optimizer, ...)`` is
active, every DP step of ``optimizer`` adds ``C * u_i`` to its clipped
per-example sum, before the noise, for each canary i that is (a) in the
audit's "in" set (each canary independently with probability 1/2, the
one-run audit's membership) and (b) sampled at this step: an independent
Bernoulli(q) per step and per canary, with q the optimizer's own sampling
probability. A canary is thus exactly one more Poisson-sampled example whose
clipped gradient is ``C u_i`` (norm C, the sensitivity of every mode).

Why the per-step Bernoulli(q) matters: the ledger's epsilon is amplified by
Poisson subsampling: it holds for an example that joins each batch with
probability q, the draw hidden from the adversary. A canary added at every
step would be a different mechanism (q = 1 for that record), whose epsilon
over T steps is far larger than the ledger's; a bound on it would not test
the ledger's claim. For the same reason the per-step draws come from OS
entropy by default (``sampling_seed=None``): with a known seed the sampling
is no longer hidden. The DP guarantee covers arbitrary clipped gradients
(DP-SGD's analysis holds for any per-example gradient of norm <= C), so a
bound above the ledger's epsilon from these canaries falsifies the claim.

The score of canary i is the projection of the total parameter change on
``-u_i`` (SGD moves against the summed gradient), or, white box over all
iterates (``StepProjections`` + ``per_step_scores``, plain SGD), the
log-likelihood ratio of its per-step projections: DP-SGD's accounting covers
every iterate, so scores computed from all of them are post-processing of
what the ledger accounts. The one-run audit
(``audit_one_run(canary_kind="gradient")``) turns the scores into
membership guesses. The hook exists only for auditing: the context manager
logs a warning, refuses an optimizer that already has a hook or runs under
more than one replica (each replica would add the canaries; the replicas are
counted on the strategy that owns the optimizer's and the model's variables,
not on the caller's scope), and removes the hook on exit, also on exception;
it also zeroes a gate variable, so a graph traced while the hook was set adds
nothing afterwards.

An audit cannot fail open: the hook is read when the step is traced, so a
train step traced before the context (a model already fit once) would run
without canaries and report a lower bound of 0. Given ``model=``, the context
drops the model's traced train function on entry and on exit (Keras retraces
it); and every step that runs the hook counts itself, so a context in which
DP steps ran without the canaries raises ``CanariesNotTracedError``.
"""

import contextlib
import logging
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import tensorflow as tf

from dpquant_tf import _validation as V
from dpquant_tf.privacy import _random

__all__ = ["CanariesNotTracedError", "GradientCanaries", "StepProjections",
           "fit_with_gradient_canaries", "gradient_canaries",
           "per_step_scores"]

_log = logging.getLogger(__name__)


class CanariesNotTracedError(RuntimeError):
  """DP steps ran inside ``gradient_canaries`` without the canaries (their
  step was traced before the context): the audit would fail open."""


def _replicas_owning(variables) -> int:
  """Replicas of the strategy that owns `variables` (1 for plain ones)."""
  replicas = 1
  for v in variables:
    strategy = getattr(v, "_distribute_strategy", None)
    if strategy is not None:
      replicas = max(replicas, int(strategy.num_replicas_in_sync))
  return replicas


def _reset_train_function(model) -> None:
  """Makes Keras retrace `model`'s train step at the next fit."""
  if model is not None and hasattr(model, "train_function"):
    model.train_function = None


class GradientCanaries:
  """m gradient canaries over a list of variables (see module docstring).

  Attributes:
    directions: [m, P] float32 NumPy array of unit rows (P = total size of
      ``var_list``).
    included: [m] bool NumPy array, the "in" set.
    var_list: the variables, in the order of the flattened space.
  """

  def __init__(self, optimizer, var_list: Sequence[tf.Variable], *,
               canaries: int, seed: int = 0,
               sampling_seed: Optional[int] = None):
    m = V.check_int("canaries", canaries, low=1)
    self.var_list = list(var_list)
    if not self.var_list:
      V.fail("var_list", var_list, "at least one trainable variable")
    sizes = [int(np.prod(v.shape)) for v in self.var_list]
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(size=(m, sum(sizes))).astype(np.float32)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    self.directions = u
    self.included = rng.random(m) < 0.5
    self._sizes = sizes
    self._index = {v.ref(): i for i, v in enumerate(self.var_list)}
    self._optimizer = optimizer
    self._u = tf.Variable(u, trainable=False, name="audit_canary_directions")
    self._mask = tf.Variable(self.included.astype(np.float32),
                             trainable=False, name="audit_canary_included")
    self._gate = tf.Variable(1.0, trainable=False, name="audit_canary_gate")
    # Steps that ran the hook (each counts itself, in graph).
    self._runs = tf.Variable(0, dtype=tf.int64, trainable=False,
                             name="audit_canary_steps")
    self._generator = _random.make_generator(seed=sampling_seed)
    self.sampling_seeded = sampling_seed is not None

  @property
  def steps_with_canaries(self) -> int:
    """DP steps that ran with the canaries' hook."""
    return int(self._runs.numpy())

  def hook(self, var_list):
    """Tensors (one per variable of ``var_list``) added to the clipped sum."""
    with tf.control_dependencies([self._runs.assign_add(1)]):
      q = tf.cast(self._optimizer.sampling_probability_var, tf.float32)
    draw = self._generator.uniform([self._u.shape[0]], dtype=tf.float32)
    present = tf.cast(draw < q, tf.float32) * self._mask * self._gate
    clip = tf.cast(self._optimizer.l2_norm_clip_var, tf.float32)
    flat = clip * tf.linalg.matvec(self._u, present, transpose_a=True)
    parts = tf.split(flat, self._sizes)
    out = []
    for v in var_list:
      i = self._index.get(v.ref())
      out.append(tf.zeros(v.shape, tf.float32) if i is None
                 else tf.reshape(parts[i], v.shape))
    return out

  def flat_weights(self) -> np.ndarray:
    """The variables' current values, flattened in the canaries' order."""
    return np.concatenate([np.reshape(v.numpy(), [-1])
                           for v in self.var_list]).astype(np.float64)

  def scores(self, initial_flat: np.ndarray) -> np.ndarray:
    """Projection of (initial - current) weights on each u_i ([m])."""
    return self.directions.astype(np.float64) @ (
        np.asarray(initial_flat, np.float64) - self.flat_weights())

  def _disable(self):
    self._gate.assign(0.0)


@contextlib.contextmanager
def gradient_canaries(optimizer, var_list: Sequence[tf.Variable], *,
                      canaries: int, seed: int = 0,
                      sampling_seed: Optional[int] = None,
                      model=None, ledger=None) -> Iterator[GradientCanaries]:
  """Injects gradient canaries into ``optimizer``'s DP steps (audit only).

  Args:
    optimizer: a ``DPQuantOptimizer`` or ``DPQuantAdamOptimizer`` with a
      known sampling probability (``sampling_probability=`` or
      ``dataset_size=``); its steps must be traced inside the context.
    var_list: the trainable variables spanning the canary space (usually
      ``model.trainable_variables``).
    canaries: m.
    seed: public seed of the directions and of the "in" set.
    sampling_seed: seeds the per-step Bernoulli(q) draws (tests only);
      None (default) draws from OS entropy, as required for the ledger's
      amplified epsilon to apply.
    model: the Keras model compiled with `optimizer` (optional): its traced
      train step is dropped on entry and on exit, so ``fit`` retraces it
      with (then without) the canaries.
    ledger: the optimizer's ``PrivacyLedger`` (optional): a seeded
      `sampling_seed` is recorded there (``note_seeded("canaries")``), so
      the statement names it.

  Yields:
    The ``GradientCanaries``.

  Raises:
    ValueError: an optimizer without the audit hook, one already audited,
      an unknown sampling probability, or more than one replica.
    CanariesNotTracedError: on exit, if DP steps of `optimizer` ran in the
      context without the canaries (a step traced before the context).
  """
  if not hasattr(type(optimizer), "_audit_hook"):
    V.fail("optimizer", type(optimizer).__name__,
           "a DPQuantOptimizer or DPQuantAdamOptimizer")
  if optimizer._audit_hook is not None:  # pylint: disable=protected-access
    V.fail("optimizer", "already audited", "one gradient_canaries at a time")
  if float(optimizer.sampling_probability_var.numpy()) < 0:
    V.fail("optimizer", "sampling probability unknown",
           "sampling_probability= or dataset_size= set")
  # The strategy that owns the variables, not the caller's scope: an
  # optimizer built under MirroredStrategy and audited outside its scope
  # still runs on every replica.
  replicas = max(tf.distribute.get_strategy().num_replicas_in_sync,
                 _replicas_owning(list(var_list) +
                                  [optimizer.sampling_probability_var]),
                 int(getattr(getattr(optimizer, "_distribution_strategy",
                                     None), "num_replicas_in_sync", 1)))
  if replicas != 1:
    V.fail("replicas", replicas, "1 (each replica would add the canaries)")
  cans = GradientCanaries(optimizer, var_list, canaries=canaries, seed=seed,
                          sampling_seed=sampling_seed)
  if ledger is not None and cans.sampling_seeded:
    ledger.note_seeded("canaries")
  _log.warning(
      "%s is being AUDITED: %d gradient canaries are added to its clipped "
      "sums (dpquant_tf.audit.gradient_canaries). Do not release this model.",
      type(optimizer).__name__, canaries)
  steps_before = optimizer.dp_event_steps()
  optimizer._audit_hook = cans.hook  # pylint: disable=protected-access
  _reset_train_function(model)
  try:
    yield cans
  finally:
    cans._disable()  # pylint: disable=protected-access
    optimizer._audit_hook = None  # pylint: disable=protected-access
    _reset_train_function(model)
  steps = optimizer.dp_event_steps() - steps_before
  if cans.steps_with_canaries < steps:
    raise CanariesNotTracedError(
        f"{steps - cans.steps_with_canaries} of the {steps} DP steps taken "
        "inside gradient_canaries ran WITHOUT the canaries: their train step "
        "was traced before the context was entered (a model already fit "
        "once). Pass model= (Keras retraces its train step), or retrace your "
        "own tf.function inside the context; the audit would report a lower "
        "bound of 0.")


class StepProjections(tf.keras.callbacks.Callback):
  """Records each step's parameter change projected on every -u_i.

  ``projections`` is a [T, m] array after ``fit``: row t is
  ``U (theta_{t-1} - theta_t)``. One Keras batch must be one DP step
  (``steps_per_execution=1``, no gradient accumulation).
  """

  def __init__(self, canaries: GradientCanaries):
    super().__init__()
    self._cans = canaries
    self._rows = []
    self._last = None

  def on_train_batch_begin(self, batch, logs=None):
    if self._last is None:
      self._last = self._cans.flat_weights()

  def on_train_batch_end(self, batch, logs=None):
    now = self._cans.flat_weights()
    # float32 product (U is [m, P]); the difference itself is exact.
    self._rows.append(self._cans.directions
                      @ (self._last - now).astype(np.float32))
    self._last = now

  @property
  def projections(self) -> np.ndarray:
    return np.asarray(self._rows, np.float64).reshape(
        -1, self._cans.directions.shape[0])


def per_step_scores(projections, *, unit: float, sampling_probability: float,
                    noise_multiplier: float) -> np.ndarray:
  """Log-likelihood-ratio score of each canary from its per-step moves.

  For plain SGD (no momentum) step t moves the weights by
  ``-lr (clipped sum + noise) / B``; in units ``unit = lr C / B`` the
  projection x_t of that move on -u_i is ``b_t + N(0, z^2)`` plus the
  (small, canary-independent) projection of the data gradients and of the
  other canaries, with b_t ~ Bernoulli(q) for an included canary and 0
  otherwise. The score is the log-likelihood ratio of "in" against "out"
  under that model, ``sum_t log(1 - q + q exp((x_t - 1/2) / z^2))``. Any
  score is valid for the one-run bound; this one is the most powerful under
  the model (Neyman-Pearson), whence its use.

  Args:
    projections: [T, m] from ``StepProjections``.
    unit: lr * C / normalizer of the audited optimizer.
    sampling_probability: q.
    noise_multiplier: z (> 0).

  Returns:
    [m] scores (higher = more likely "in").
  """
  unit = V.check_positive("unit", unit)
  q = V.check_open_unit("sampling_probability", sampling_probability)
  z = V.check_positive("noise_multiplier", noise_multiplier)
  x = np.asarray(projections, np.float64) / unit
  return np.sum(np.logaddexp(np.log1p(-q), np.log(q) + (x - 0.5) / z**2),
                axis=0)


def fit_with_gradient_canaries(model, optimizer, fit: Callable[[list], None],
                               *, canaries: int, seed: int = 0,
                               score: str = "per_step"):
  """Runs ``fit(extra_callbacks)`` with gradient canaries; scores them.

  Args:
    model: the Keras model whose ``trainable_variables`` span the canaries.
    optimizer: its DPQuant optimizer (compiled into the model).
    fit: trains the model, passing the given callbacks to ``model.fit``.
    canaries: m.
    seed: public seed of the directions and the "in" set.
    score: "per_step" (``per_step_scores``; plain SGD without momentum, one
      DP step per Keras batch) or "final" (projection of the total change).

  Returns:
    (scores [m], included [m] bool).
  """
  if score not in ("per_step", "final"):
    V.fail("score", score, "'per_step' or 'final'")
  config = optimizer.get_config()
  if score == "per_step" and (config.get("momentum", 1.0) != 0.0
                              or "beta_1" in config
                              or not config.get("expected_batch_size")):
    V.fail("optimizer", type(optimizer).__name__,
           "plain SGD (momentum 0) with expected_batch_size for "
           "score='per_step' (else score='final')")
  with gradient_canaries(optimizer, model.trainable_variables,
                         canaries=canaries, seed=seed, model=model) as cans:
    initial = cans.flat_weights()
    recorder = StepProjections(cans)
    fit([recorder] if score == "per_step" else [])
  if cans.steps_with_canaries == 0:
    raise CanariesNotTracedError(
        "No DP step ran with the canaries (fit took no step?): the audit has "
        "nothing to score.")
  if score == "final":
    return cans.scores(initial), cans.included
  unit = (float(config["learning_rate"]) * float(config["l2_norm_clip"]) /
          float(config["expected_batch_size"]))
  q = float(optimizer.sampling_probability_var.numpy())
  z = float(optimizer.noise_multiplier_var.numpy())
  return per_step_scores(recorder.projections, unit=unit,
                         sampling_probability=q,
                         noise_multiplier=z), cans.included

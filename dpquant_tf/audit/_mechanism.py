"""White-box mechanism audit: one DP step, neighbouring batches, many trials.

The audited object is the optimizer exactly as a user builds it (any
``DPQuantOptimizer`` / ``DPQuantAdamOptimizer`` configuration, optionally a
quantized model and a ``tf.distribute`` strategy), driven only through
``optimizer.minimize`` and read through the model's weights (or Adam's first
moment slot: m' - beta_1 m is the noised gradient times 1 - beta_1).

Construction (Jagielski et al. 2020; Nasr et al. 2021, white-box gradient
canary): a linear model ``f(x) = w . x`` (``Dense(1, use_bias=False)``) with
per-example loss ``-f(x)``, whose per-example gradient is ``-x`` whatever the
weights, so every trial sees the same known gradients. The batch D holds
``batch_size`` examples supported on coordinates 1..d-1; the canary is
``x = canary_norm * C * e_0``, a gradient of norm ``canary_norm * C >= C`` in a
direction no example of D touches. D' = D + canary. Each trial takes one
step (``steps_per_trial`` for the replay check) on D or D' with fresh noise;
the score is the step's move along e_0 in units of C. Its claimed privacy is
the ledger's epsilon for exactly one trial (one step at q = 1:
``sampled_gaussian_event(1, z_eff)``, i.e. the Gaussian
mechanism), read from a ledger attached to the optimizer after the first
trial.

The bound reported is, by default, the pooled two-tailed test
(``pooled_threshold_epsilon_lower_bound``: "score > t means D'" and its
mirror "score < t' means D", counts pooled over both sides); the one-tailed
test is reported beside it. The statistic is chosen before the trials
(argument ``statistic``), so the reported bound keeps its confidence.
"""

import dataclasses
import time
from typing import Any, Callable, Dict, Optional

import numpy as np
import tensorflow as tf

from dpquant_tf import _validation as V
from dpquant_tf.audit import _stats
from dpquant_tf.optimizers import DPQuantOptimizer
from dpquant_tf.privacy import Accountant
from dpquant_tf.privacy import PrivacyLedger
from dpquant_tf.privacy import SamplingMethod

__all__ = ["MechanismAudit", "audit_mechanism", "linear_probe_model"]


@dataclasses.dataclass(frozen=True)
class MechanismAudit:
  """Result of ``audit_mechanism``.

  Attributes:
    epsilon_lower_bound: empirical lower bound at `confidence` of the
      statistic chosen in advance (``statistic``).
    claimed_epsilon: the ledger's epsilon for one trial (its accountant).
    claimed_epsilon_pld: the same events under PLD accounting (tight for a
      single Gaussian step); None for z < 0.5.
    delta, confidence: of the bound.
    trials: trials per side.
    test: the one-tailed ``ThresholdAudit`` (threshold, error counts,
      bounds).
    pooled: the pooled two-tailed ``PooledThresholdAudit`` (None for audits
      that report only the one-tailed test, e.g. the checkpoint audit).
    statistic: "pooled" or "one_tailed", the one `epsilon_lower_bound`
      reports.
    wall_s: seconds.
  """
  epsilon_lower_bound: float
  claimed_epsilon: float
  claimed_epsilon_pld: Optional[float]
  delta: float
  confidence: float
  trials: int
  test: _stats.ThresholdAudit
  wall_s: float
  pooled: Optional[_stats.PooledThresholdAudit] = None
  statistic: str = "one_tailed"

  @property
  def violated(self) -> bool:
    """True when the lower bound exceeds the claim (the audit found a bug)."""
    return self.epsilon_lower_bound > self.claimed_epsilon

  def as_dict(self) -> Dict[str, Any]:
    out = dataclasses.asdict(self)
    out["violated"] = self.violated
    return out


def pld_epsilon(ledger, delta: float, noise_multiplier: float):
  """The ledger's events under PLD accounting, or None for z < 0.5 (PLD's
  discretization of a nearly noiseless step needs unbounded memory)."""
  if noise_multiplier < 0.5:
    return None
  return ledger.epsilon(delta, accountant=Accountant.PLD)


def linear_probe_model(dims: int) -> tf.keras.Model:
  """``Dense(1, use_bias=False)`` on ``dims`` inputs, zero weights."""
  return tf.keras.Sequential([
      tf.keras.layers.InputLayer(input_shape=(dims,)),
      tf.keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros",
                            name="probe")])


def _batches(dims, batch_size, clip, canary_norm, seed):
  rng = np.random.default_rng(seed)
  base = np.zeros((batch_size, dims), np.float32)
  base[:, 1:] = rng.standard_normal(size=(batch_size, dims - 1)) * clip
  canary = np.zeros((1, dims), np.float32)
  canary[0, 0] = canary_norm * clip
  return tf.constant(base), tf.constant(np.concatenate([base, canary]))


def audit_mechanism(
    *, trials: int, l2_norm_clip: float = 1.0, noise_multiplier: float = 1.0,
    optimizer_cls: Callable[..., Any] = DPQuantOptimizer,
    optimizer_kwargs: Optional[Dict[str, Any]] = None,
    model_fn: Optional[Callable[[int], tf.keras.Model]] = None,
    strategy: Optional[tf.distribute.Strategy] = None,
    dims: int = 4, batch_size: int = 4, canary_norm: float = 2.0,
    steps_per_trial: int = 1, delta: float = 1e-5, confidence: float = 0.95,
    selection_fraction: float = 0.1, threshold: Optional[float] = None,
    mirror_threshold: Optional[float] = None, statistic: str = "pooled",
    seed: int = 0) -> MechanismAudit:
  """Audits one configuration of the DP optimizer step (white box).

  Args:
    trials: trials per side (D and D').
    l2_norm_clip, noise_multiplier: C and z of the optimizer.
    optimizer_cls: ``DPQuantOptimizer``, ``DPQuantAdamOptimizer`` or a
      subclass (tests use deliberately broken ones).
    optimizer_kwargs: further keyword arguments (gradient_bits,
      sensitivity_mode, learning_rate, ...). ``expected_batch_size`` and
      ``sampling_probability`` are set by the audit (fixed normalizer, q=1).
    model_fn: builds the audited model from ``dims`` (default
      ``linear_probe_model``; e.g. a ``quantize_model`` of it with a plan).
      It must compute ``w . x`` with one weight vector whose gradient is -x.
    strategy: run under this ``tf.distribute`` strategy (batch split across
      replicas, canary on replica 0's shard).
    dims, batch_size: model inputs and |D| (batch_size % replicas == 0).
    canary_norm: the canary's gradient norm in units of C (>= 1).
    steps_per_trial: steps per trial. With 2, the canary is in the first step
      only and the score is the first step's move minus the second's (the
      attack on noise replayed across steps); the claim covers both steps.
    delta, confidence, selection_fraction, threshold: of the test
      (``threshold_epsilon_lower_bound``); scores are in units of C (the
      canary moves a correct step's score by 1).
    mirror_threshold: t' of the mirrored test of the pooled statistic;
      default ``1 - threshold`` when a threshold is given (the mirror image
      about the midpoint of the claimed score distributions N(0, z^2) and
      N(1, z^2)), else chosen on the selection split with t.
    statistic: "pooled" (two-tailed, both sides pooled; default) or
      "one_tailed": which bound ``epsilon_lower_bound`` reports. Both are
      computed.
    seed: seeds the data of D and the threshold split (public values). The
      optimizer's noise is never seeded here.

  Returns:
    A ``MechanismAudit``.
  """
  trials = V.check_int("trials", trials, low=8)
  if statistic not in ("pooled", "one_tailed"):
    V.fail("statistic", statistic, "'pooled' or 'one_tailed'")
  dims = V.check_int("dims", dims, low=2)
  steps_per_trial = V.check_int("steps_per_trial", steps_per_trial, low=1,
                                high=2)
  canary_norm = V.check_number("canary_norm", canary_norm)
  if canary_norm < 1:
    V.fail("canary_norm", canary_norm, ">= 1 (a gradient clipping cuts)")
  strategy = strategy or tf.distribute.get_strategy()
  replicas = strategy.num_replicas_in_sync
  if batch_size % replicas:
    V.fail("batch_size", batch_size, f"a multiple of {replicas} replicas")
  kwargs = dict(optimizer_kwargs or {})
  kwargs.setdefault("learning_rate", 1.0)
  lr = float(kwargs["learning_rate"])
  start = time.perf_counter()
  base, with_canary = _batches(dims, batch_size, l2_norm_clip, canary_norm,
                               seed)
  with strategy.scope():
    model = (model_fn or linear_probe_model)(dims)
    ledger = PrivacyLedger(sampling_method=SamplingMethod.POISSON)
    optimizer = optimizer_cls(
        l2_norm_clip=l2_norm_clip, noise_multiplier=noise_multiplier,
        expected_batch_size=float(batch_size), sampling_probability=1.0,
        ledger=ledger, **kwargs)
  weights = model.trainable_variables
  probe = [v for v in weights if v.shape.rank == 2 and v.shape[0] == dims]
  if len(probe) != 1:
    V.fail("model_fn", model_fn, "a model with one [dims, 1] kernel")
  kernel = probe[0]
  # Adam-like (first moment "m" with decay beta_1): score the noised
  # gradient from the moment slot, not the (sign-like) first Adam update.
  beta_1 = optimizer.get_config().get("beta_1")
  use_moment = beta_1 is not None
  if use_moment:
    beta_1 = float(beta_1)
    with strategy.scope():  # Slots exist before the first trial reads them.
      optimizer._create_all_weights(weights)  # pylint: disable=protected-access
    if "m" not in optimizer.get_slot_names():
      V.fail("optimizer_cls", optimizer_cls, "an SGD or Adam optimizer")

  def replica_step(x):
    with tf.GradientTape() as tape:
      loss = -tf.reshape(model(x, training=True), [-1])
    optimizer.dp_step(model, x, loss, tape)

  def shard(batch):
    rows = batch_size // replicas

    # Replica 0 gets rows [0, rows) plus the canary (last row) if present.
    def value_fn_exact(ctx):
      i = ctx.replica_id_in_sync_group
      part = batch[rows * i:rows * (i + 1)]
      if batch.shape[0] > batch_size and i == 0:
        part = tf.concat([part, batch[batch_size:]], axis=0)
      return part

    return strategy.experimental_distribute_values_from_function(
        value_fn_exact)

  def make_step(batch):
    data = shard(batch) if replicas > 1 else None

    @tf.function
    def step():
      before = tf.identity(kernel[0, 0])
      if replicas > 1:
        strategy.run(replica_step, args=(data,))
      else:
        replica_step(batch)
      return kernel[0, 0] - before
    return step

  step_d, step_d_prime = make_step(base), make_step(with_canary)
  scale = ((1.0 - beta_1) if use_moment else lr) * l2_norm_clip / batch_size

  def run_step(fn):
    if not use_moment:
      return float(fn())
    # m' = beta_1 m + (1 - beta_1) g: the noised gradient, read eagerly (the
    # gradient of -w.x points against the update, hence the sign).
    moment = optimizer.get_slot(kernel, "m")
    m_before = float(moment.numpy()[0, 0])
    fn()
    return beta_1 * m_before - float(moment.numpy()[0, 0])

  def trial(first):
    score = run_step(first)
    if steps_per_trial == 2:
      score -= run_step(step_d)
    return score / scale

  scores_d, scores_d_prime = [], []
  scores_d_prime.append(trial(step_d_prime))
  claimed = ledger.epsilon(delta)
  claimed_pld = pld_epsilon(ledger, delta, noise_multiplier)
  scores_d.append(trial(step_d))
  for _ in range(trials - 1):
    scores_d.append(trial(step_d))
    scores_d_prime.append(trial(step_d_prime))
  test = _stats.threshold_epsilon_lower_bound(
      scores_d, scores_d_prime, delta=delta, confidence=confidence,
      selection_fraction=selection_fraction, seed=seed, threshold=threshold)
  if threshold is not None and mirror_threshold is None:
    mirror_threshold = 1.0 - float(threshold)
  pooled = _stats.pooled_threshold_epsilon_lower_bound(
      scores_d, scores_d_prime, delta=delta, confidence=confidence,
      threshold=threshold, mirror_threshold=mirror_threshold,
      selection_fraction=selection_fraction, seed=seed)
  chosen = pooled if statistic == "pooled" else test
  return MechanismAudit(
      epsilon_lower_bound=chosen.epsilon_lower_bound, claimed_epsilon=claimed,
      claimed_epsilon_pld=claimed_pld, delta=delta, confidence=confidence,
      trials=trials, test=test, pooled=pooled, statistic=statistic,
      wall_s=time.perf_counter() - start)

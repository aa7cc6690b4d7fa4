"""Checkpoint audit: can an adversary holding checkpoints regenerate noise?

Attack (issue "Close eleven attacks", item 1): the victim writes
``tf.train.Checkpoint(model=model, optimizer=optimizer)`` before a step and
releases the weights after it (the next checkpoint). The adversary, who knows
everything but whether the canary was in the batch (D or D'), restores the
first checkpoint into a copy of the model and optimizer and takes the same
step on D. If the checkpoint carried the noise generator's state, the copy
draws the victim's noise and the difference of the two updates is the
noiseless canary contribution. The score is that difference along the
canary direction; the audit is the threshold test of ``_stats`` against the
ledger's epsilon for the victim's one step.
"""

import os
import tempfile
import time
from typing import Any, Callable, Dict, Optional

import tensorflow as tf

from dpquant_tf import _validation as V
from dpquant_tf.audit import _mechanism
from dpquant_tf.audit import _stats
from dpquant_tf.optimizers import DPQuantOptimizer
from dpquant_tf.privacy import PrivacyLedger
from dpquant_tf.privacy import SamplingMethod

__all__ = ["audit_checkpoint_replay"]


def _build(dims, l2_norm_clip, noise_multiplier, batch_size, optimizer_cls,
           kwargs, ledger):
  model = _mechanism.linear_probe_model(dims)
  optimizer = optimizer_cls(
      l2_norm_clip=l2_norm_clip, noise_multiplier=noise_multiplier,
      expected_batch_size=float(batch_size), sampling_probability=1.0,
      ledger=ledger, **kwargs)
  kernel = model.trainable_variables[0]

  def make_step(batch):
    @tf.function
    def step():
      before = tf.identity(kernel[0, 0])

      with tf.GradientTape() as tape:
        loss = -tf.reshape(model(batch, training=True), [-1])
      optimizer.dp_step(model, batch, loss, tape)
      return kernel[0, 0] - before
    return step

  return model, optimizer, make_step


def audit_checkpoint_replay(
    *, trials: int, l2_norm_clip: float = 1.0, noise_multiplier: float = 4.0,
    optimizer_cls: Callable[..., Any] = DPQuantOptimizer,
    optimizer_kwargs: Optional[Dict[str, Any]] = None, dims: int = 4,
    batch_size: int = 4, canary_norm: float = 2.0, delta: float = 1e-5,
    confidence: float = 0.95, selection_fraction: float = 0.1,
    seed: int = 0, directory: Optional[str] = None
) -> _mechanism.MechanismAudit:
  """Audits the release of consecutive checkpoints (noise regeneration).

  Args:
    trials: trials per side.
    l2_norm_clip, noise_multiplier, optimizer_cls, optimizer_kwargs: the
      audited optimizer configuration (as ``audit_mechanism``).
    dims, batch_size, canary_norm: the probe (as ``audit_mechanism``).
    delta, confidence, selection_fraction: of the threshold test.
    seed: seeds D and the threshold split (public values).
    directory: where checkpoints are written (default: a temporary one).

  Returns:
    A ``MechanismAudit``; ``violated`` means the adversary recovered more
    than the ledger's epsilon allows (the checkpoint leaks the noise).
  """
  trials = V.check_int("trials", trials, low=8)
  kwargs = dict(optimizer_kwargs or {})
  kwargs.setdefault("learning_rate", 1.0)
  lr = float(kwargs["learning_rate"])
  start = time.perf_counter()
  base, with_canary = _mechanism._batches(  # pylint: disable=protected-access
      dims, batch_size, l2_norm_clip, canary_norm, seed)
  ledger = PrivacyLedger(sampling_method=SamplingMethod.POISSON)
  model, optimizer, make_step = _build(dims, l2_norm_clip, noise_multiplier,
                                       batch_size, optimizer_cls, kwargs,
                                       ledger)
  adv_model, adv_optimizer, adv_make_step = _build(
      dims, l2_norm_clip, noise_multiplier, batch_size, optimizer_cls, kwargs,
      PrivacyLedger(sampling_method=SamplingMethod.POISSON))
  victim_steps = {False: make_step(base), True: make_step(with_canary)}
  adversary_step = adv_make_step(base)
  # Create the adversary's slots before the first restore.
  adversary_step()
  victim_ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer)
  adversary_ckpt = tf.train.Checkpoint(model=adv_model,
                                       optimizer=adv_optimizer)
  scale = lr * l2_norm_clip / batch_size
  scores = {False: [], True: []}
  claimed = claimed_pld = None
  with tempfile.TemporaryDirectory(dir=directory) as tmp:
    prefix = os.path.join(tmp, "before_step")
    for i in range(2 * trials):
      canary = bool(i % 2)
      path = victim_ckpt.write(prefix)
      victim_move = float(victim_steps[canary]())
      if claimed is None:
        claimed = ledger.epsilon(delta)
        claimed_pld = _mechanism.pld_epsilon(ledger, delta, noise_multiplier)
      adversary_ckpt.read(path).expect_partial()
      replay_move = float(adversary_step())
      scores[canary].append((victim_move - replay_move) / scale)
  test = _stats.threshold_epsilon_lower_bound(
      scores[False], scores[True], delta=delta, confidence=confidence,
      selection_fraction=selection_fraction, seed=seed)
  return _mechanism.MechanismAudit(
      epsilon_lower_bound=test.epsilon_lower_bound, claimed_epsilon=claimed,
      claimed_epsilon_pld=claimed_pld, delta=delta, confidence=confidence,
      trials=trials, test=test, wall_s=time.perf_counter() - start)

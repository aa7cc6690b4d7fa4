"""Deliberately broken DP optimizers, reachable only from the audit tests.

Each subclass claims the privacy of its constructor arguments (its ledger
records the configured noise multiplier) but breaks one step of the
mechanism. The audit must flag every one (lower bound above the claim).
They override private hooks of ``DPQuantOptimizer``; if those hooks are
renamed, these classes fail loudly (AttributeError or no detection), never
silently pass.
"""

import tensorflow as tf

import dpquant_tf


class NoNoiseOptimizer(dpquant_tf.DPQuantOptimizer):
  """Adds no noise (noise multiplier 0 in the graph), records z."""

  def _per_replica_noise_stddev(self, stddev):
    return 0.0 * super()._per_replica_noise_stddev(stddev)


class NoClipOptimizer(dpquant_tf.DPQuantOptimizer):
  """Sums the unclipped per-example gradients, records sensitivity C."""

  def _per_example_taps(self, loss, var_list, tape, num_microbatches):
    return None  # Always the materialized per-example gradients.

  def _clip_quantize_sum(self, grads):
    summed = [tf.reduce_sum(g, axis=0) for g in grads]
    return summed, tf.constant(1.0, tf.float64)


class ReplayedNoiseOptimizer(dpquant_tf.DPQuantOptimizer):
  """Steps 2k and 2k+1 draw the same noise (generator state replayed)."""

  def _per_replica_noise_stddev(self, stddev):
    pair = tf.cast(self.iterations // 2, tf.int64)
    state = tf.stack([pair, tf.constant(7, tf.int64), tf.constant(0, tf.int64)])
    self._generator.reset(state)
    return super()._per_replica_noise_stddev(stddev)


class CheckpointedNoiseOptimizer(dpquant_tf.DPQuantOptimizer):
  """Writes its noise generator into checkpoints (main before issue 15)."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._track_trackable(self.generator, name="dp_generator")

"""A minimal distribution-aware DP-SGD optimizer: the design's reference (tests only).

`PrototypeDPSGDOptimizer` is the smallest optimizer that implements the
"split" noise placement of `_replica.py` on top of TF-Privacy's
`GenericDPSGDOptimizer`: per-example gradients (jacobian), per-example L2 clip
to C, local sum, this replica's share of one N(0, (sigma*C)^2) draw, division
by the global normalizer; Keras' SUM all-reduce completes the step. It has no
quantization and no privacy accounting: dpquant_tf's `DPQuantOptimizer`
is the product; this class exists to validate the distributed design in
isolation and as an executable specification in tests. It lives under tests/
(not in the library): it draws its noise through the library's one noise path
(`distribute.add_replica_noise`) and its generator from the one factory.
"""

from typing import Optional

import tensorflow as tf
from tensorflow_privacy.privacy.dp_query import gaussian_query
from tensorflow_privacy.privacy.optimizers import dp_optimizer_keras

from dpquant_tf import _validation
from dpquant_tf import distribute
from dpquant_tf.privacy import _random


class PrototypeDPSGDOptimizer(dp_optimizer_keras.GenericDPSGDOptimizer):
  """DP-SGD that is exact under MirroredStrategy and MultiWorkerMirroredStrategy.

  Create it inside `strategy.scope()`; its generator then gives every
  replica an independent stream.
  """

  def __init__(self, *, l2_norm_clip: float, noise_multiplier: float,
               learning_rate: float = 0.01,
               expected_batch_size: Optional[float] = None,
               seed: Optional[int] = None, name: str = "PrototypeDPSGD"):
    self._clip = _validation.check_positive("l2_norm_clip", l2_norm_clip)
    self._sigma = _validation.check_non_negative("noise_multiplier",
                                                 noise_multiplier)
    self._expected_batch_size = expected_batch_size
    # The query is only there to satisfy the base class; noise is added here.
    query = gaussian_query.GaussianSumQuery(self._clip, 0.0)
    super().__init__(dp_sum_query=query, num_microbatches=None,
                     learning_rate=learning_rate, name=name)
    self._generator = _random.make_generator(seed=seed)

  def _compute_gradients(self, loss, var_list, grad_loss=None, tape=None):
    self._was_dp_gradients_called = True
    if not callable(loss) and tape is None:
      raise ValueError("`tape` is required when a `Tensor` loss is passed.")
    tape = tape if tape is not None else tf.GradientTape()
    with tape:
      if callable(loss):
        if not callable(var_list):
          tape.watch(var_list)
        loss = loss()
      loss = tf.reshape(loss, [-1])
      if callable(var_list):
        var_list = var_list()
    var_list = tf.nest.flatten(var_list)
    jacobians = tape.jacobian(loss, var_list, unconnected_gradients="zero")
    n = tf.shape(loss)[0]
    sq = tf.add_n([tf.reduce_sum(tf.reshape(tf.square(j), [n, -1]), axis=1)
                   for j in jacobians])
    factor = tf.minimum(1.0, self._clip / tf.maximum(tf.sqrt(sq), 1e-12))
    sums = [tf.tensordot(factor, j, axes=1) for j in jacobians]
    noised = distribute.add_replica_noise(
        sums, stddev=self._sigma * self._clip, generator=self._generator)
    norm = distribute.global_normalizer(n, self._expected_batch_size)
    return [(g / norm, v) for g, v in zip(noised, var_list)]

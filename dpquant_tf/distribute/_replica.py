"""Replica-context arithmetic for exact DP-SGD under `tf.distribute`.

How tf-keras (Keras 2, legacy `optimizer_v2`) trains under a
`tf.distribute.MirroredStrategy` or `MultiWorkerMirroredStrategy`, measured on
TF 2.21 / tf-keras 2.21 (see docs/DISTRIBUTED.md):

* `Model.fit` splits each global batch of B examples across the R replicas in
  sync and runs `train_step` once per replica, in replica context.
* A per-example loss (`Reduction.NONE`) reaches the optimizer unscaled, one
  entry per local example (only SUM_OVER_BATCH_SIZE/AUTO losses and
  regularization losses are scaled by 1/R).
* The optimizer's `_compute_gradients` runs per replica; `apply_gradients` then
  all-reduces the gradients with a SUM (`optimizer_utils.all_reduce_sum_gradients`)
  and applies the same summed gradient to every mirrored copy of a variable.

TF-Privacy's `GenericDPSGDOptimizer` therefore goes wrong twice: each replica
divides by its *local* number of microbatches and adds its own full noise
N(0, (sigma*C)^2), so the applied update is R times the DP-SGD mean and its
noise std, relative to that mean, is sqrt(R) times too large.

dpquant_tf's design (the "split" placement): every replica clips its own
examples, adds its share N(0, (sigma*C)^2 / R) of the noise drawn from its own
stream of one `tf.random.Generator` created under the strategy's scope (TF
folds the global replica id into the generator's key, so the R streams are
independent and the generator's state stays identical on every replica), and
divides by the *global* normalizer. The SUM all-reduce then produces exactly

    (sum_i clip(g_i) + N(0, (sigma*C)^2 I)) / B_global,

which is DP-SGD on the global batch: the sum of R independent Gaussians of
variance (sigma*C)^2 / R is one Gaussian of variance (sigma*C)^2.
"""

import math
from typing import List, Optional, Sequence

import tensorflow as tf

from dpquant_tf import _validation
from dpquant_tf.privacy import _mechanisms

__all__ = [
    "add_replica_noise",
    "check_generator_strategy",
    "global_example_count",
    "global_normalizer",
    "num_replicas_in_sync",
    "replica_noise_stddev",
    "update_quantization_guard",
]


def num_replicas_in_sync() -> int:
  """Returns R, the number of replicas that all-reduce gradients together.

  In replica context this is the replica context's count (across all workers
  of a `MultiWorkerMirroredStrategy`); in cross-replica context the current
  strategy's; 1 without a strategy.
  """
  ctx = tf.distribute.get_replica_context()
  if ctx is not None:
    return int(ctx.num_replicas_in_sync)
  return int(tf.distribute.get_strategy().num_replicas_in_sync)


def replica_noise_stddev(stddev):
  """Returns the std of this replica's share of one global Gaussian draw.

  Formal guarantee: if each of the R replicas adds independent
  N(0, s^2) with s = `replica_noise_stddev(stddev)` = stddev / sqrt(R) to the
  tensor it contributes to a SUM all-reduce, the reduced tensor carries
  exactly N(0, stddev^2) noise per coordinate.

  Args:
    stddev: float or scalar tensor, the total noise std (sigma * sensitivity).

  Returns:
    `stddev / sqrt(R)` (same type as `stddev`).
  """
  r = num_replicas_in_sync()
  if r == 1:
    return stddev
  return stddev / math.sqrt(r)


def check_generator_strategy(generator: tf.random.Generator) -> None:
  """Raises if `generator` cannot give independent noise to every replica.

  A `tf.random.Generator` created under a strategy's scope mixes the global
  replica id into its key, so each replica draws an independent stream while
  the generator state stays mirrored. One created outside the scope (or under
  another strategy) relies on replicas advancing one shared variable in some
  order, and under `MultiWorkerMirroredStrategy` with a seed every worker would
  draw the *same* noise: the noise of the sum would be sqrt(R) too small
  relative to what the accountant assumes. Privacy invariant: raise.

  Args:
    generator: the generator that draws the DP noise.

  Raises:
    RuntimeError: more than one replica in sync and the generator was not
      created under the current strategy's scope.
  """
  if num_replicas_in_sync() == 1:
    return
  current = tf.distribute.get_strategy()
  owner = getattr(generator, "_distribution_strategy", None)
  if owner is not current:
    raise RuntimeError(
        "The DP noise generator was not created under the current "
        f"tf.distribute strategy ({type(current).__name__} with "
        f"{current.num_replicas_in_sync} replicas in sync), so replicas would "
        "not draw independent noise. Create the optimizer (and so its "
        "generator) inside `with strategy.scope():`.")


def add_replica_noise(tensors: Sequence[tf.Tensor], *, stddev,
                      generator: tf.random.Generator) -> List[tf.Tensor]:
  """Adds this replica's share of one global Gaussian noise draw.

  The draw itself is ``privacy._mechanisms.add_gaussian_noise`` (the one
  noise function of dpquant_tf) at the replica's share of the std.

  With R replicas in sync, each replica adds N(0, stddev^2 / R) per
  coordinate from its own stream of `generator`; after the SUM all-reduce the
  total noise is exactly N(0, stddev^2). With one replica this is plain
  `t + N(0, stddev^2)`.

  Args:
    tensors: the (clipped, summed) tensors this replica contributes.
    stddev: total noise std sigma * sensitivity (float or scalar tensor).
    generator: a `tf.random.Generator` created under the strategy's scope
      (`privacy._random.make_generator`, OS entropy unless a test seeds it).

  Returns:
    The noised tensors, in order.

  Raises:
    RuntimeError: see `check_generator_strategy`.
  """
  check_generator_strategy(generator)
  return _mechanisms.add_gaussian_noise(tensors, replica_noise_stddev(stddev),
                                        generator)


def global_example_count(local_count) -> tf.Tensor:
  """Sums a per-replica count (examples or microbatches) over all replicas.

  One scalar SUM all-reduce in replica context; the identity otherwise.

  Args:
    local_count: scalar, this replica's count.

  Returns:
    float32 scalar tensor, the global count.
  """
  local_count = tf.cast(local_count, tf.float32)
  ctx = tf.distribute.get_replica_context()
  if ctx is None or ctx.num_replicas_in_sync == 1:
    return local_count
  return ctx.all_reduce(tf.distribute.ReduceOp.SUM, local_count)


def global_normalizer(local_count,
                      expected_batch_size: Optional[float] = None) -> tf.Tensor:
  """Returns what each replica divides its noised sum by.

  DP-SGD divides the noised global sum by the global batch size. Each replica
  divides its share by the same global normalizer, so the SUM all-reduce
  yields the DP-SGD mean: with Poisson sampling the *global* expected batch
  size (a public constant, never the realized size), otherwise the realized
  global count of microbatches.

  Args:
    local_count: scalar, this replica's number of microbatches.
    expected_batch_size: the global expected batch size (Poisson sampling;
      float or scalar tensor), or None to use the realized global count.

  Returns:
    float32 scalar tensor.
  """
  if expected_batch_size is not None:
    if isinstance(expected_batch_size, (tf.Tensor, tf.Variable)):
      return tf.cast(expected_batch_size, tf.float32)
    _validation.check_positive("expected_batch_size", expected_batch_size)
    return tf.constant(float(expected_batch_size), tf.float32)
  return global_example_count(local_count)


def update_quantization_guard(update_bits) -> List[tf.Operation]:
  """Control dependencies that forbid per-replica update quantization.

  Quantizing the noised update (stochastic rounding) is post-processing only
  when it is applied to the *global* noised sum. Under R > 1 replicas each
  replica holds just its share, with noise std sigma*C/sqrt(R); rounding the
  shares before the SUM all-reduce would make the release depend on each
  share, which the accountant does not cover. Privacy invariant: with R > 1
  the returned op fails the step if `update_bits` > 0.

  Args:
    update_bits: int32 scalar (variable or tensor), 0 = update quantization off.

  Returns:
    [] with one replica, else a one-element list with the check op.
  """
  if num_replicas_in_sync() == 1:
    return []
  return [tf.debugging.assert_equal(
      tf.cast(update_bits, tf.int32), 0,
      message=("update_bits > 0 is not supported with more than one replica "
               "in sync: post-noise quantization must see the global noised "
               "sum. Set update_bits=None under tf.distribute."))]

"""Poisson-sampled tf.data input pipeline with fixed padded batch shape.

Each step includes every example independently with probability q. The
library claims amplification by sampling (``PoissonSampledDpEvent(q, ...)``)
only where it made the sampler and feeds it to ``fit`` itself
(``dpquant_tf.make_private``); a ``poisson_dataset`` handed to ``model.fit``
by the user may have been transformed on the way, so its steps are recorded
without amplification (q = 1). Batches are
padded to ``max_batch_size`` rows with a 0/1 mask used as the Keras sample
weight: padded rows have loss 0 and contribute exactly zero gradient, and the
shape never changes (no XLA retrace; outside XLA the owned train step cuts
the padding to at most 15 rows before any work, ``training._step``). Train with
``DPQuantOptimizer(expected_batch_size=q * N, ...)`` so the sum is normalized
by the expected, data-independent batch size.
"""

import math
import secrets
from typing import Optional

import numpy as np
import tensorflow as tf
from scipy import stats

from dpquant_tf import _tf_utils
from dpquant_tf import _validation as V
from dpquant_tf.privacy import _random

__all__ = ["SEAL_WIDTH", "poisson_dataset", "poisson_max_batch_size",
           "sampler_id_is_ours", "steps_per_epoch"]

# Columns of the seal every sampled batch carries: (sampler id, draw index,
# q, N), the same on every row (so it splits across replicas like the rows).
SEAL_WIDTH = 4

# Sampler ids: |id| = PROCESS_KEY * 2**ID_BITS + a random 26-bit number, so
# the owned step recognizes the samplers of THIS process (a seal drawn by
# another process, e.g. batches saved to disk and replayed after a restart,
# or one written by hand, does not carry the key). The key is not a
# cryptographic secret against code running in the process (which could
# edit the ledger anyway); it rules out replays and hand-made seals. The id
# is negative for a SEEDED sampler: its batches are known to anyone who
# knows the seed, so the owned step records them at q = 1.
ID_BITS = 26
PROCESS_KEY = secrets.randbits(ID_BITS) + 1


def _new_sampler_id(seeded: bool) -> float:
  sid = float(PROCESS_KEY * 2 ** ID_BITS + secrets.randbits(ID_BITS))
  return -sid if seeded else sid


def sampler_id_is_ours(sid):
  """Whether the (float64 tensor) sampler id `sid` was made by
  ``poisson_dataset`` in this process (seeded or not)."""
  return tf.equal(tf.floor(tf.abs(sid) / float(2 ** ID_BITS)),
                  tf.constant(float(PROCESS_KEY), tf.float64))


def steps_per_epoch(dataset_size: int, sampling_rate: float) -> int:
  """Steps of one epoch at rate q: ceil(1 / q), i.e. ceil(N / B) for B = qN.

  The one definition of an epoch's steps: ``poisson_dataset``'s default
  ``steps``, ``planned_steps`` and ``calibrate_noise_multiplier`` use it, and
  so do Keras' fixed batches (``fit(batch_size=B)`` runs ceil(N / B) steps).
  A float q = B / N that is an exact divisor up to rounding counts exactly.

  Args:
    dataset_size: N.
    sampling_rate: q in (0, 1].

  Returns:
    The number of steps (>= 1).
  """
  n = V.check_int("dataset_size", dataset_size, low=1)
  q = V.check_probability("sampling_rate", sampling_rate)
  batch = q * n
  return max(1, int(math.ceil(n / batch - 1e-9)))


def poisson_max_batch_size(dataset_size: int, sampling_rate: float,
                           overflow_probability: float = 1e-9) -> int:
  """Smallest m with P(Binomial(N, q) > m) <= overflow_probability."""
  n = V.check_int("dataset_size", dataset_size, low=1)
  q = V.check_probability("sampling_rate", sampling_rate)
  p = V.check_open_unit("overflow_probability", overflow_probability)
  return int(min(n, stats.binom.isf(p, n, q) + 1))


def _zero_rows(t, keep):
  """`t` with the rows where `keep` is False replaced by zeros."""
  keep = tf.reshape(keep, [-1] + [1] * (t.shape.rank - 1))
  return tf.where(keep, t, tf.zeros_like(t))


def poisson_dataset(x, y, sampling_rate: float,
                    max_batch_size: Optional[int] = None, *,
                    steps: Optional[int] = None, seed: Optional[int] = None
                    ) -> tf.data.Dataset:
  """Poisson-sampled batches ``(x, y, mask, seal)`` of fixed shape.

  Args:
    x: features, array with N rows.
    y: labels, array with N rows.
    sampling_rate: q in (0, 1].
    max_batch_size: rows per padded batch; default: overflow probability
      1e-9 per step (``poisson_max_batch_size``). A sampled batch larger than
      this raises an error at iteration (never silently truncated).
    steps: batches per pass (default: ``steps_per_epoch(N, q)`` = ceil(1 / q),
      one epoch in the definition calibration uses).
    seed: seeds the sampling (tests and research); None (default) draws
      from OS entropy. A seeded sampler's batches are known to anyone who
      knows the seed: the owned train step records them at q = 1 (no
      amplification by sampling) and the ledger's statement names the
      seeded sampler.

  Returns:
    A ``tf.data.Dataset`` yielding ``(x_batch, y_batch, mask, seal)`` with
    ``mask`` float32 of shape [max_batch_size] (1 = real, 0 = padding; the
    Keras sample weight) and ``seal`` float64 of shape [max_batch_size, 4]:
    (sampler id, draw index, q, N) on every row. The owned train step claims
    amplification at q only for batches whose seals show they came from one
    unseeded sampler of this process, in the order it drew them, never
    consumed before by the model (also across checkpoint restores): any
    reordering, repetition, filtering, caching, re-batching or replay on the
    way is accounted at q = 1.
  """
  x = np.asarray(x)
  y = np.asarray(y)
  n = len(x)
  if len(y) != n:
    V.fail("y", f"array with {len(y)} rows", f"of the same length as x ({n})")
  q = V.check_probability("sampling_rate", sampling_rate)
  if max_batch_size is None:
    max_batch_size = poisson_max_batch_size(n, q)
  max_batch_size = V.check_int("max_batch_size", max_batch_size, low=1,
                               high=n)
  if steps is None:
    steps = steps_per_epoch(n, q)
  steps = V.check_int("steps", steps, low=1)
  seed = None if seed is None else V.check_int("seed", seed)
  gen = _random.make_generator(seed=seed)
  x_t = tf.constant(x)
  y_t = tf.constant(y)
  # Identity of this sampler (the sampling randomness is the generator's)
  # and the number of batches it has drawn, across passes.
  sampler_id = _new_sampler_id(seed is not None)
  drawn = _tf_utils.local_variable(tf.constant(0, tf.int64),
                                   name="poisson_draws")

  def sample(_):
    index = drawn.assign_add(1) - 1
    chosen = gen.uniform([n], dtype=tf.float64) < q
    idx = tf.cast(tf.where(chosen)[:, 0], tf.int32)
    count = tf.shape(idx)[0]
    check = tf.debugging.assert_less_equal(
        count, max_batch_size,
        message=(f"Poisson batch larger than max_batch_size={max_batch_size};"
                 " raise max_batch_size (truncation would break the "
                 "accounting)."))
    with tf.control_dependencies([check]):
      pad = max_batch_size - count
    idx = tf.concat([idx, tf.zeros([pad], tf.int32)], axis=0)
    mask = tf.concat([tf.ones([count]), tf.zeros([pad])], axis=0)
    # Padding rows hold zeros, not a copy of example 0: whatever example 0
    # holds (a NaN, an outlier), a padded row is a fixed public input with
    # mask weight 0, so it contributes exactly zero on every path.
    real = tf.range(max_batch_size) < count
    xb = _zero_rows(tf.gather(x_t, idx), real)
    yb = _zero_rows(tf.gather(y_t, idx), real)
    xb = tf.ensure_shape(xb, [max_batch_size] + list(x.shape[1:]))
    yb = tf.ensure_shape(yb, [max_batch_size] + list(y.shape[1:]))
    mask = tf.ensure_shape(mask, [max_batch_size])
    seal = tf.stack([tf.constant(sampler_id, tf.float64),
                     tf.cast(index, tf.float64),
                     tf.constant(q, tf.float64),
                     tf.constant(float(n), tf.float64)])
    seal = tf.tile(seal[None, :], [max_batch_size, 1])
    return xb, yb, mask, seal

  return tf.data.Dataset.range(steps).map(sample)


def expected_batch_size(dataset_size: int, sampling_rate: float) -> float:
  """q * N, the normalizer for Poisson batches."""
  return float(sampling_rate) * float(dataset_size)


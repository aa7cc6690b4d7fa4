"""Exact all-reduce of b-bit code sums packed into int64 words."""

import numpy as np
import pytest
import tensorflow as tf

from dpquant_tf.privacy import _mechanisms
from tests.distribute import _helpers
from tools import code_sum_packing_lib
from tools import traffic_lib


def _levels(bits):
  return 2 ** (bits - 1) - 1


def _replica_codes(num_replicas, rows, d, bits, seed):
  """Real BOUND-mode codes: clipped per-example gradients on the b-bit grid."""
  gen = tf.random.Generator.from_seed(seed)
  grads = gen.normal([num_replicas * rows, d])
  clipped = _mechanisms.clip_per_example([grads], 1.0)
  (q,) = _mechanisms.quantize_per_example(clipped, tf.constant([bits]), 1.0,
                                          gen)
  codes = np.round(q.numpy() * _levels(bits)).astype(np.int64)
  return codes.reshape(num_replicas, rows, d)


def _reduce(strategy, codes, layout):
  codes_t = tf.constant(codes)
  rows = codes.shape[1]

  @tf.function
  def step():
    def fn():
      ctx = tf.distribute.get_replica_context()
      mine = tf.gather(codes_t, ctx.replica_id_in_sync_group)
      return code_sum_packing_lib.all_reduce_code_sums(
          tf.reduce_sum(mine, axis=0), local_rows=rows, layout=layout)
    return strategy.run(fn)

  return [t.numpy() for t in
          strategy.experimental_local_results(step())]


@pytest.mark.parametrize("num_replicas", [1, 2, 4])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packed_all_reduce_is_exact(num_replicas, bits):
  rows, d = 8, 301  # d not a multiple of the fields per word
  codes = _replica_codes(num_replicas, rows, d, bits, seed=bits)
  layout = code_sum_packing_lib.pack_layout(bits, num_replicas * rows)
  for total in _reduce(_helpers.mirrored(num_replicas), codes, layout):
    np.testing.assert_array_equal(total, codes.sum(axis=(0, 1)))


@pytest.mark.parametrize("sign", [1, -1])
def test_extreme_sums_do_not_carry_between_fields(sign):
  bits, rows, d = 4, 16, 50
  codes = np.full((2, rows, d), sign * _levels(bits), np.int64)
  codes[:, :, ::2] *= -1  # neighbours at opposite extremes
  layout = code_sum_packing_lib.pack_layout(bits, 2 * rows)
  (total, _) = _reduce(_helpers.mirrored(2), codes, layout)
  np.testing.assert_array_equal(total, codes.sum(axis=(0, 1)))


def test_payload_bytes_beat_float32():
  d = 26010
  for bits, expected_fields in ((2, 6), (4, 5), (8, 3)):
    layout = code_sum_packing_lib.pack_layout(bits, 256)
    assert layout.fields == expected_fields
    assert layout.width == traffic_lib.code_sum_bits(bits, 256)
    assert layout.payload_bytes(d) < 4 * d


def test_too_many_rows_fails_the_step():
  codes = np.zeros((2, 8, 10), np.int64)
  layout = code_sum_packing_lib.pack_layout(4, 8)  # but 16 rows in all
  with pytest.raises(tf.errors.InvalidArgumentError, match="max_global_rows"):
    _reduce(_helpers.mirrored(2), codes, layout)

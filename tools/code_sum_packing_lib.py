"""All-reducing sums of b-bit gradient codes packed into int64 words.

In BOUND mode DPQuant's per-example gradient codes are integers in [-L, L]
(L = 2^(b-1) - 1) on the public grid C / L, so a replica's sum of codes over
its n_r rows is an integer vector, and the sum over all replicas lies in
[-B L, B L] for B rows in all. Shifted by +L per row, every partial sum is
non-negative and the global one is below 2^w with
w = `code_sum_bits(b, B)`. Packing floor(63 / w) such fields into one int64
word makes the SUM all-reduce of the words add every field independently
(no carry can cross a field, no word can overflow), so TF's own collectives
move b-bit code sums at w bits per coordinate (plus the padding of the last
word) instead of 32: the "packed int64 code sum" of the traffic table.

`all_reduce_code_sums` is exact (integers). It carries no noise: DP noise
must then be added once, after the reduction, identically on every replica
(placement (a) of docs/DISTRIBUTED.md). The DPQuant optimizers do not use it
yet; it demonstrates and measures the transport (research code: it lives in
tools/, not in the library; tests/distribute/test_distribute_packing.py tests
it).
"""

import dataclasses
import math

import tensorflow as tf

from dpquant_tf import _validation
from tools import traffic_lib

__all__ = [
    "PackLayout",
    "all_reduce_code_sums",
    "pack_layout",
]

_USABLE_BITS = 63  # int64 words, sign bit unused


@dataclasses.dataclass(frozen=True)
class PackLayout:
  """How code sums of one variable are packed."""
  bits: int          # b, gradient code bits
  width: int         # w, bits per packed field
  fields: int        # fields per int64 word
  max_global_rows: int

  def num_words(self, num_coordinates: int) -> int:
    return int(math.ceil(num_coordinates / self.fields))

  def payload_bytes(self, num_coordinates: int) -> int:
    return 8 * self.num_words(num_coordinates)


def pack_layout(bits: int, max_global_rows: int) -> PackLayout:
  """The int64 packing of sums of at most `max_global_rows` b-bit codes."""
  width = traffic_lib.code_sum_bits(bits, max_global_rows)
  if width > _USABLE_BITS:
    _validation.fail("max_global_rows", max_global_rows,
                     f"small enough for sums of {bits}-bit codes to fit in "
                     "63 bits")
  return PackLayout(bits=bits, width=width, fields=_USABLE_BITS // width,
                    max_global_rows=max_global_rows)


def _pack(values: tf.Tensor, layout: PackLayout) -> tf.Tensor:
  """[d] non-negative int64 (< 2^w each) -> [ceil(d / fields)] int64 words."""
  d = tf.size(values)
  words = layout.num_words(int(values.shape.num_elements()))
  padded = tf.pad(values, [[0, words * layout.fields - d]])
  fields = tf.reshape(padded, [words, layout.fields])
  shifts = tf.constant([layout.width * j for j in range(layout.fields)],
                       tf.int64)
  return tf.reduce_sum(tf.bitwise.left_shift(fields, shifts), axis=1)


def _unpack(words: tf.Tensor, layout: PackLayout, d: int) -> tf.Tensor:
  shifts = tf.constant([layout.width * j for j in range(layout.fields)],
                       tf.int64)
  mask = tf.constant((1 << layout.width) - 1, tf.int64)
  fields = tf.bitwise.bitwise_and(
      tf.bitwise.right_shift(words[:, None], shifts), mask)
  return tf.reshape(fields, [-1])[:d]


def all_reduce_code_sums(local_code_sum, *, local_rows, layout: PackLayout
                         ) -> tf.Tensor:
  """SUM-all-reduces integer code sums through packed int64 words.

  Call in replica context (identity otherwise). Exact.

  Args:
    local_code_sum: integer tensor (any shape), this replica's sum of b-bit
      codes over its `local_rows` rows (each code in [-L, L]).
    local_rows: scalar, rows summed on this replica.
    layout: from `pack_layout(b, max_global_rows)`; the rows of all replicas
      together must not exceed `max_global_rows` (checked at run time).

  Returns:
    int64 tensor shaped like `local_code_sum`: the global code sum.
  """
  levels = 2 ** (layout.bits - 1) - 1
  shape = tf.shape(local_code_sum)
  flat = tf.reshape(tf.cast(local_code_sum, tf.int64), [-1])
  d = int(flat.shape.num_elements())
  rows = tf.cast(local_rows, tf.int64)
  shifted = flat + rows * levels  # in [0, 2 L n_r]
  words = _pack(shifted, layout)
  ctx = tf.distribute.get_replica_context()
  if ctx is not None and ctx.num_replicas_in_sync > 1:
    words = ctx.all_reduce(tf.distribute.ReduceOp.SUM, words)
    rows = ctx.all_reduce(tf.distribute.ReduceOp.SUM, rows)
  check = tf.debugging.assert_less_equal(
      rows, tf.constant(layout.max_global_rows, tf.int64),
      message="more rows than the packing layout's max_global_rows")
  with tf.control_dependencies([check]):
    total = _unpack(words, layout, d) - rows * levels
  return tf.reshape(total, shape)

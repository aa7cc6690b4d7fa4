"""Bytes replicas exchange per DP step: float32 vs b-bit gradient codes.

A research model used by tools/benchmark_traffic.py (not part of the library).

What one replica sends per step to aggregate the gradient, for a model with
variables of d_l coordinates and per-variable gradient bits b_l
(L_l = 2^(b_l - 1) - 1 levels per side; DPQuant's Q(g; b, C) puts every
clipped per-example coordinate on the public grid (C / L_l) * {-L_l..L_l}):

* `Transport.FLOAT32_SUM`: what dpquant_tf all-reduces today (the split-noise
  design): this replica's noised, clipped sum as float32, 4 * sum_l d_l bytes.
* `Transport.CODES_PER_EXAMPLE`: every local example's b-bit codes plus one
  float32 scale per example (the reclip factor of RECLIP mode), as a
  federated / gather transport would send them:
  n_local * (sum_l ceil(d_l * b_l / 8) + 4) bytes.
* `Transport.CODE_SUM`: the integer sum of the codes over the replica's
  examples, all-reduced as integers on the common grid (exact; BOUND mode,
  where no reclip moves the codes off the grid). The global sum lies in
  [-B L_l, B L_l], so each coordinate needs
  w_l = ceil(log2(2 B L_l + 1)) bits: sum_l ceil(d_l * w_l / 8) bytes. The
  noise cannot travel in this payload, so it must be added once after the
  reduction, identically on every replica; dpquant_tf does not implement
  that transport (TF's collectives all-reduce int32/int64, not w-bit
  integers), so this column is what a b-bit transport would move.
* `Transport.PACKED_CODE_SUM`: the same integer sums packed floor(63 / w_l)
  fields per int64 word, which TF's collectives *do* all-reduce exactly
  (`tools/code_sum_packing_lib.all_reduce_code_sums`, tested under
  MirroredStrategy): sum_l 8 * ceil(d_l / floor(63 / w_l)) bytes. Same
  caveat on the noise.

Bytes are the payload per replica per step; a ring all-reduce moves
2 (R - 1) / R times the payload per replica (`ring_factor`), a gather of
per-example codes moves (R - 1) times it to every peer.
"""

import dataclasses
import enum
import math
from typing import Dict, Optional, Sequence

from dpquant_tf import _validation

__all__ = [
    "Transport",
    "TrafficRow",
    "code_sum_bits",
    "ring_factor",
    "step_traffic",
]

FLOAT32_BYTES = 4
SCALE_BYTES = 4


class Transport(enum.Enum):
  """How a replica's gradient contribution is encoded on the wire."""
  FLOAT32_SUM = "float32_sum"
  CODES_PER_EXAMPLE = "codes_per_example"
  CODE_SUM = "code_sum"
  PACKED_CODE_SUM = "packed_code_sum"


@dataclasses.dataclass(frozen=True)
class TrafficRow:
  """Bytes per replica per step for one setting."""
  bits: Optional[int]
  payload_bytes: Dict[str, int]
  ratio_vs_float32: Dict[str, float]


def _levels(bits: int) -> int:
  return 2 ** (bits - 1) - 1


def code_sum_bits(bits: int, global_batch: int) -> int:
  """Integer width of a sum of `global_batch` b-bit grid codes."""
  bits = _validation.check_int("bits", bits, low=2, high=24)
  global_batch = _validation.check_int("global_batch", global_batch, low=1)
  return int(math.ceil(math.log2(2 * global_batch * _levels(bits) + 1)))


def ring_factor(num_replicas: int) -> float:
  """Bytes a ring all-reduce sends per replica, in units of the payload."""
  r = _validation.check_int("num_replicas", num_replicas, low=1)
  return 2.0 * (r - 1) / r


def step_traffic(var_sizes: Sequence[int], bits: Sequence[int], *,
                 global_batch: int, num_replicas: int) -> TrafficRow:
  """Payload bytes per replica per step for every `Transport`.

  Args:
    var_sizes: coordinates d_l of each trainable variable.
    bits: gradient bits b_l per variable (0 = exact float32: that variable
      always travels as float32).
    global_batch: examples per step over all replicas (B).
    num_replicas: R; each replica holds B / R examples (rounded up).

  Returns:
    A `TrafficRow` with `payload_bytes` and `ratio_vs_float32` keyed by the
    `Transport` value; `bits` is the common width or None when mixed.
  """
  sizes = [_validation.check_int("var_sizes[i]", d, low=0) for d in var_sizes]
  bits = [_validation.check_int("bits[i]", b, low=0, high=24) for b in bits]
  if len(sizes) != len(bits):
    _validation.fail("bits", bits, f"one entry per variable ({len(sizes)})")
  global_batch = _validation.check_int("global_batch", global_batch, low=1)
  num_replicas = _validation.check_int("num_replicas", num_replicas, low=1)
  n_local = int(math.ceil(global_batch / num_replicas))
  fp32 = FLOAT32_BYTES * sum(sizes)
  per_example = 0
  code_sum = 0
  packed = 0
  for d, b in zip(sizes, bits):
    if b == 0:
      per_example += FLOAT32_BYTES * d
      code_sum += FLOAT32_BYTES * d
      packed += FLOAT32_BYTES * d
    else:
      width = code_sum_bits(b, global_batch)
      per_example += int(math.ceil(d * b / 8))
      code_sum += int(math.ceil(d * width / 8))
      packed += 8 * int(math.ceil(d / (63 // width)))
  quantized = any(b > 0 for b in bits)
  payload = {
      Transport.FLOAT32_SUM.value: fp32,
      Transport.CODES_PER_EXAMPLE.value: n_local * (
          per_example + (SCALE_BYTES if quantized else 0)),
      Transport.CODE_SUM.value: code_sum,
      Transport.PACKED_CODE_SUM.value: packed,
  }
  distinct = set(bits)
  return TrafficRow(
      bits=distinct.pop() if len(distinct) == 1 else None,
      payload_bytes=payload,
      ratio_vs_float32={k: v / fp32 if fp32 else 1.0
                        for k, v in payload.items()})

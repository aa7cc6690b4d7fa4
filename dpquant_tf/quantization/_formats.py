"""Number formats of the quantizers: enums, grid parameters and level tables.

Every format is described by one family of grids. A tensor is first scaled so
that its range maps to the format's largest magnitude ``fmax``; each scaled
magnitude ``a`` is then rounded to one of the two neighbouring levels of the
format (stochastically or to the nearest one). The levels are

* uniform formats (``INT``, ``INT4_SAWB``): ``0, 1, ..., fmax`` with
  ``fmax = 2**(bits-1) - 1`` (signed, symmetric, max-abs or SAWB scale);
* floating-point formats (``FP4_E2M1``, ``FP8_E4M3``, ``FP8_E5M2``): all
  non-negative values of the format, with ``m`` mantissa bits, smallest normal
  exponent ``emin`` (subnormals below it) and largest finite value ``fmax``;
* ``LUQ_FP4``: radix-2 logarithmic levels ``0, 1, 2, 4, ..., 2**(n-1)`` with
  ``n = 2**(bits-1) - 1`` (1 sign and ``bits-1`` exponent bits, no mantissa);
  it is the floating-point family with ``m = 0`` and ``emin = 0``, so
  rounding between ``0`` and ``1`` is LUQ's stochastic underflow and rounding
  between ``2**k`` and ``2**(k+1)`` is its unbiased logarithmic rounding.

References:
  Chmiel et al., "Accurate Neural Training with 4-bit Matrix Multiplications
  at Standard Formats" (LUQ), ICLR 2023, https://arxiv.org/abs/2112.10769.
  Choi et al., "Bridging the Accuracy Gap for 2-bit Quantized Neural Networks"
  (SAWB), 2018, https://arxiv.org/abs/1807.06964.
  Micikevicius et al., "FP8 Formats for Deep Learning", 2022,
  https://arxiv.org/abs/2209.05433.
"""

import dataclasses
import enum
from typing import Dict, Tuple

import numpy as np

from dpquant_tf import _validation


class QuantFormat(enum.Enum):
  """Number formats. The value is the integer id stored in `tf.Variable`s."""
  INT = 0
  FP4_E2M1 = 1
  FP8_E4M3 = 2
  FP8_E5M2 = 3
  LUQ_FP4 = 4
  INT4_SAWB = 5

  @property
  def id(self) -> int:
    return self.value


class Rounding(enum.Enum):
  """Rounding modes: unbiased stochastic rounding or round-to-nearest."""
  STOCHASTIC = "stochastic"
  NEAREST = "nearest"


class ScaleMode(enum.Enum):
  """How a weight tensor's scale is shared: one per tensor or one per output channel."""
  PER_TENSOR = "per_tensor"
  PER_CHANNEL = "per_channel"


# Bits a format honours ([low, high], inclusive). Fixed-width formats ignore bits.
BITS_RANGE: Dict[QuantFormat, Tuple[int, int]] = {
    QuantFormat.INT: (2, 16),
    QuantFormat.FP4_E2M1: (4, 4),
    QuantFormat.FP8_E4M3: (8, 8),
    QuantFormat.FP8_E5M2: (8, 8),
    QuantFormat.LUQ_FP4: (2, 5),
    QuantFormat.INT4_SAWB: (2, 5),
}

# SAWB clip threshold alpha = c1 * sqrt(E[x^2]) - c2 * E[|x|] per bit width.
# 4 bits: (12.1, 12.2) as used by LUQ (Chmiel et al. 2023, after Choi et al.
# 2018); the other widths follow the commonly used fitted table.
SAWB_COEFFICIENTS: Dict[int, Tuple[float, float]] = {
    2: (3.212, 2.178),
    3: (7.509, 6.892),
    4: (12.1, 12.2),
    5: (17.74, 18.64),
}


@dataclasses.dataclass(frozen=True)
class GridParams:
  """Grid of one format at one bit width (see the module docstring)."""
  fmax: float
  mantissa_bits: int
  emin: int
  emax: int
  uniform: bool


_FP_SPECS = {
    # (mantissa bits, emin, emax, fmax)
    QuantFormat.FP4_E2M1: (1, 0, 2, 6.0),
    QuantFormat.FP8_E4M3: (3, -6, 8, 448.0),
    QuantFormat.FP8_E5M2: (2, -14, 15, 57344.0),
}


def clamp_bits(fmt: QuantFormat, bits: int) -> int:
  low, high = BITS_RANGE[fmt]
  return int(min(max(int(bits), low), high))


def grid_params(fmt: QuantFormat, bits: int) -> GridParams:
  """Returns the grid of `fmt` at `bits` (bits clamped to the format's range)."""
  bits = clamp_bits(fmt, bits)
  if fmt in (QuantFormat.INT, QuantFormat.INT4_SAWB):
    return GridParams(float(2**(bits - 1) - 1), 0, 0, 0, True)
  if fmt == QuantFormat.LUQ_FP4:
    emax = 2**(bits - 1) - 2
    return GridParams(float(2.0**emax), 0, 0, emax, False)
  m, emin, emax, fmax = _FP_SPECS[fmt]
  return GridParams(fmax, m, emin, emax, False)


def format_levels(fmt, bits: int) -> np.ndarray:
  """All non-negative levels of a format, scaled so the largest is `fmax`.

  Args:
    fmt: a `QuantFormat` (or its name).
    bits: bit width (clamped to the format's range; ignored by fixed formats).

  Returns:
    Sorted float64 array of the representable magnitudes, starting with 0.
  """
  fmt = _validation.check_enum("fmt", fmt, QuantFormat)
  p = grid_params(fmt, bits)
  if p.uniform:
    return np.arange(0.0, p.fmax + 1.0)
  levels = {0.0}
  for k in range(2**p.mantissa_bits):  # subnormals
    levels.add(k * 2.0**(p.emin - p.mantissa_bits))
  for e in range(p.emin, p.emax + 1):
    for k in range(2**p.mantissa_bits, 2**(p.mantissa_bits + 1)):
      levels.add(k * 2.0**(e - p.mantissa_bits))
  return np.array(sorted(v for v in levels if v <= p.fmax))


def check_format_bits(name: str, fmt, bits) -> Tuple[QuantFormat, int]:
  """Validates a (format, bits) pair at a public boundary.

  Bits 0 means "this direction is off". Otherwise bits must lie in the format's
  range (fixed-width formats accept exactly their width).
  """
  fmt = _validation.check_enum(f"{name}_format", fmt, QuantFormat)
  bits = _validation.check_int(f"{name}_bits", bits, low=0, high=16)
  low, high = BITS_RANGE[fmt]
  if bits != 0 and not low <= bits <= high:
    _validation.fail(f"{name}_bits", bits,
                     f"0 (off) or in [{low}, {high}] for format {fmt.name}")
  return fmt, bits

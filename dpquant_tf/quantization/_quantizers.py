"""Quantizers as pure TensorFlow functions (graph- and XLA-compatible).

`quantize(x, fmt, bits, ...)` scales `x` per slice (max-abs, or SAWB clipping
for `INT4_SAWB`), rounds every scaled magnitude to one of its two neighbouring
levels of the format's grid (see `_formats.py`) and scales back. The format and
the bit width may be Python values or integer tensors (for example
`tf.Variable`s): with tensors the grid parameters are gathered from
per-format tables (one small `tf.cond` picks the SAWB or max-abs scale), so
one traced or XLA-compiled function serves every setting with no retrace.

Formal guarantees (for every format, per element, given the scale):
  * the output lies on the format's grid times the slice's unit
    (``scale / fmax``), with the sign of the input;
  * it is one of the two grid points that bracket the (clipped) input, so the
    error is below one local grid step;
  * stochastic rounding is unbiased: ``E[q(x)] = clip(x, -scale, scale)``,
    which is ``x`` itself for max-abs scaled formats;
  * nearest rounding is idempotent on its own outputs.

Privacy (docs/METHOD.md invariant 1): scales are computed over `scale_axes` only.
For activations and gradients pass ``example_axes(x)`` (every axis but the
batch axis 0), so example i's output never depends on another example.
Randomness comes only from the `tf.random.Generator` passed in: one 32-bit
key per call, expanded per element by a counter-based hash
(`_precision.uniform_noise`; every element's noise exactly uniform on the
grid k / 2**24), not 32 generator bits per element.
"""

from typing import Optional, Sequence, Union

import tensorflow as tf

from dpquant_tf import _validation
from dpquant_tf.quantization import _formats
from dpquant_tf.quantization import _precision
from dpquant_tf.quantization._formats import QuantFormat, Rounding

_F32 = tf.float32


def example_axes(x) -> list:
  """Axes to reduce for per-example scales: all but the batch axis 0."""
  rank = x.shape.rank
  if rank is None:
    raise ValueError("Expected x to have a known rank for per-example scales.")
  return list(range(1, rank))


def _pow2(k):
  """Exact 2**k for int32 k in [-126, 127] (XLA-friendly, via the bit pattern)."""
  return tf.bitcast(tf.bitwise.left_shift(k + 127, 23), _F32)


def _floor_log2(a):
  """floor(log2(a)) for finite a > 0 (normal float32); -127 for 0."""
  return tf.bitwise.right_shift(tf.bitcast(a, tf.int32), 23) - 127


def _max_abs(x, axes):
  return tf.reduce_max(tf.abs(x), axis=axes, keepdims=True)


def _sawb_scale(x, bits, axes):
  """SAWB clip threshold per slice, never above the max-abs nor below 0."""
  table = _formats.SAWB_COEFFICIENTS
  low, high = min(table), max(table)
  c1 = tf.constant([table[b][0] for b in range(low, high + 1)], _F32)
  c2 = tf.constant([table[b][1] for b in range(low, high + 1)], _F32)
  idx = tf.clip_by_value(tf.cast(bits, tf.int32), low, high) - low
  ax = tf.abs(x)
  alpha = (tf.gather(c1, idx) * tf.sqrt(tf.reduce_mean(x * x, axis=axes, keepdims=True))
           - tf.gather(c2, idx) * tf.reduce_mean(ax, axis=axes, keepdims=True))
  amax = tf.reduce_max(ax, axis=axes, keepdims=True)
  # = where(alpha > 0, min(alpha, amax), amax), written without a select:
  # a select here trips TF's graph type inference inside tf.switch_case.
  alpha = tf.maximum(alpha, 0.0)
  return tf.minimum(alpha, amax) + amax * tf.cast(alpha <= 0, _F32)


def _format_table(fn, dtype):
  """A constant over format ids (index = `QuantFormat.id`)."""
  return tf.constant([fn(f) for f in sorted(QuantFormat, key=lambda f: f.id)],
                     dtype)


def _dynamic_params(x, fmt_id, bits, axes):
  """Scale and grid parameters for integer-tensor format and bits.

  Straight-line: the grid parameters are gathered from per-format constant
  tables and only the scale has a branch (SAWB or max-abs), so a traced or
  XLA-compiled step holds one small conditional per quantizer instead of a
  switch over every format (which XLA compiled, with its gradient, for
  every quantizer of every layer). Same values as `_static_params`.
  """
  bits = tf.cast(bits, tf.int32)
  fmt_id = tf.clip_by_value(tf.cast(fmt_id, tf.int32), 0, len(QuantFormat) - 1)
  low = tf.gather(_format_table(lambda f: _formats.BITS_RANGE[f][0], tf.int32),
                  fmt_id)
  high = tf.gather(_format_table(lambda f: _formats.BITS_RANGE[f][1], tf.int32),
                   fmt_id)
  b = tf.clip_by_value(bits, low, high)
  uniform_formats = (QuantFormat.INT, QuantFormat.INT4_SAWB)
  uniform = tf.gather(_format_table(lambda f: int(f in uniform_formats),
                                    tf.int32), fmt_id)
  fp = {f: _formats.grid_params(f, 8) for f in QuantFormat}
  is_fp = lambda f: f not in uniform_formats and f != QuantFormat.LUQ_FP4
  m = tf.gather(_format_table(lambda f: fp[f].mantissa_bits if is_fp(f) else 0,
                              tf.int32), fmt_id)
  emin = tf.gather(_format_table(lambda f: fp[f].emin if is_fp(f) else 0,
                                 tf.int32), fmt_id)
  emax_fp = tf.gather(_format_table(lambda f: fp[f].emax if is_fp(f) else 0,
                                    tf.int32), fmt_id)
  fmax_fp = tf.gather(_format_table(lambda f: fp[f].fmax if is_fp(f) else 0.0,
                                    _F32), fmt_id)
  half = tf.bitwise.left_shift(1, b - 1)
  is_luq = tf.equal(fmt_id, QuantFormat.LUQ_FP4.id)
  emax = tf.where(is_luq, half - 2, emax_fp)
  fmax = tf.where(tf.equal(uniform, 1), tf.cast(half - 1, _F32),
                  tf.where(is_luq, _pow2(emax), fmax_fp))
  scale = tf.cond(tf.equal(fmt_id, QuantFormat.INT4_SAWB.id),
                  lambda: _sawb_scale(x, b, axes), lambda: _max_abs(x, axes))
  return scale, fmax, m, emin, emax, uniform


def _static_params(x, fmt: QuantFormat, bits: int, axes):
  p = _formats.grid_params(fmt, bits)
  if fmt == QuantFormat.INT4_SAWB:
    scale = _sawb_scale(x, _formats.clamp_bits(fmt, bits), axes)
  else:
    scale = _max_abs(x, axes)
  return scale, p.fmax, p.mantissa_bits, p.emin, p.emax, p.uniform


def _round_to_grid(x, scale, fmax, m, emin, emax, uniform, noise):
  """Rounds x to sign * level * unit; noise=None means round to nearest."""
  fmax = tf.cast(fmax, _F32)
  unit = scale / fmax
  unit = tf.where(unit > 0, unit, tf.ones_like(unit))
  a = tf.minimum(tf.abs(x) / unit, fmax)
  if isinstance(uniform, bool) and uniform:
    step = tf.ones_like(a)
  else:
    e = tf.clip_by_value(_floor_log2(a), emin, emax)
    step = _pow2(e - m)
    if not isinstance(uniform, bool):  # int32 flag from tf.switch_case
      step = tf.where(tf.not_equal(uniform, 0), tf.ones_like(a), step)
  r = a / step
  lo = tf.floor(r)
  frac = r - lo
  up = (frac >= 0.5) if noise is None else (frac > noise)
  level = tf.minimum((lo + tf.cast(up, _F32)) * step, fmax)
  return tf.where(x < 0, -level, level) * unit


def _resolve_format(fmt):
  if isinstance(fmt, (tf.Tensor, tf.Variable)):
    return fmt
  if isinstance(fmt, int) and not isinstance(fmt, bool):
    return _validation.check_enum("fmt", QuantFormat(fmt) if fmt in
                                  [f.value for f in QuantFormat] else fmt,
                                  QuantFormat)
  return _validation.check_enum("fmt", fmt, QuantFormat)


def _params(x32, fmt, bits, axes):
  fmt = _resolve_format(fmt)
  if isinstance(fmt, QuantFormat) and not isinstance(bits, (tf.Tensor, tf.Variable)):
    return _static_params(x32, fmt, int(bits), axes)
  fmt_id = fmt.id if isinstance(fmt, QuantFormat) else fmt
  return _dynamic_params(x32, fmt_id, bits, axes)


def quantization_scale(x, fmt, bits, *, scale_axes=None) -> tf.Tensor:
  """The scale `quantize` uses (max-abs, or the SAWB clip), keepdims shape.

  The grid of a slice is ``format_levels(fmt, bits) * scale / fmax``.
  """
  axes = None if scale_axes is None else list(scale_axes)
  return _params(tf.cast(x, _F32), fmt, bits, axes)[0]


def _quantize_with_noise(x, fmt, bits, *, noise, scale_axes, scale=None):
  """`quantize` with explicit uniform noise (None = nearest); for tests."""
  x = tf.convert_to_tensor(x)
  dtype = x.dtype
  x32 = tf.cast(x, _F32)
  axes = None if scale_axes is None else list(scale_axes)
  params = _params(x32, fmt, bits, axes)
  if scale is not None:
    params = (tf.cast(scale, _F32),) + tuple(params[1:])
  q = _round_to_grid(x32, *params, noise=noise)
  return tf.cast(q, dtype)


def quantize(x: tf.Tensor,
             fmt: Union[QuantFormat, str, int, tf.Tensor],
             bits: Union[int, tf.Tensor],
             *,
             rounding: Union[Rounding, str] = Rounding.STOCHASTIC,
             generator: Optional[tf.random.Generator] = None,
             scale_axes: Optional[Sequence[int]] = None,
             scale: Optional[tf.Tensor] = None) -> tf.Tensor:
  """Quantizes `x` to a low-precision format (values stay in `x.dtype`).

  Args:
    x: floating-point tensor.
    fmt: a `QuantFormat`, its name, its integer id, or an integer tensor
      holding the id (selected with `tf.switch_case`, no retrace).
    bits: bit width, Python int or integer tensor; clamped to the format's
      range (fixed-width formats ignore it).
    rounding: `Rounding.STOCHASTIC` (unbiased, needs `generator`) or
      `Rounding.NEAREST`.
    generator: the `tf.random.Generator` that draws the rounding noise.
    scale_axes: axes over which one scale is shared (reduced with keepdims).
      None: one scale for the whole tensor. Use `example_axes(x)` for
      activations and gradients (per-example scales).
    scale: optional fixed (public) scale, broadcastable to `x`; replaces the
      computed max-abs or SAWB scale. Values beyond it are clipped.

  Returns:
    The quantized tensor, same shape and dtype as `x`. A slice of zeros stays
    zero.

  Raises:
    ValueError: stochastic rounding without a generator, or a bad format.
  """
  rounding = _validation.check_enum("rounding", rounding, Rounding)
  x = tf.convert_to_tensor(x)
  if not x.dtype.is_floating:
    _validation.fail("x.dtype", x.dtype, "a floating-point dtype", TypeError)
  noise = None
  if rounding == Rounding.STOCHASTIC:
    if generator is None:
      _validation.fail("generator", generator,
                       "a tf.random.Generator for stochastic rounding")
    noise = _precision.uniform_noise(tf.shape(x), generator)
  return _quantize_with_noise(x, fmt, bits, noise=noise, scale_axes=scale_axes,
                              scale=scale)

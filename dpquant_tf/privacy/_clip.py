"""The one clip: scale example i by min(1, C / u_i), u_i a proven bound.

Every path that forms a clipped sum (materialized per-example gradients, ghost
clipping, the jacobian path, the loss-sensitivity estimator, each replica under
``tf.distribute``) calls :func:`clip_scales`. Its input ``u_i`` must be an
upper bound, in the floating-point arithmetic actually executed, of the L2
norm of the tensor that is added for example i; the callers prove theirs
(docs/PRIVACY.md, "The clip bound, path by path"):

* materialized tensors: :func:`norm_bound`, a bound of the norm of the very
  tensors that are scaled and summed (float32 squares summed in blocks of at
  most 16, the blocks in float64, every rounding covered);
* ghost clipping (``dpquant_tf.perexample``): float64 Gram sums plus their
  rounding, plus ``gamma * S_i`` with ``S_i = sum_t |a_t| |g_t|`` for the
  rounding of the contraction that is actually executed.

The scale is computed in float64 and made smaller by ``(1 + 4 u)`` (``u`` the
unit roundoff of the output dtype), which covers rounding the scale to that
dtype and the one rounding of the product ``scale * x``: the scaled tensor has
norm at most C. A bound that is not finite, or an example marked invalid
(``valid``: an out-of-range Embedding id, say), gives scale exactly 0, and
:func:`clip_per_example` selects such rows away (``0 * NaN`` is NaN).
"""

from typing import List, Optional, Sequence

import tensorflow as tf

__all__ = ["clip_per_example", "clip_scales", "gamma", "norm_bound",
           "unit_roundoff"]

_UNIT = {tf.float64: 2.0 ** -53, tf.float32: 2.0 ** -24,
         tf.bfloat16: 2.0 ** -8, tf.float16: 2.0 ** -11}


def unit_roundoff(dtype) -> float:
  """``u`` of a floating dtype (round to nearest): half its machine epsilon."""
  return _UNIT[tf.as_dtype(dtype)]


def gamma(n, unit: float):
  """``gamma_n = n u / (1 - n u)``: relative rounding bound of n operations.

  Args:
    n: number of roundings (Python number or tensor).
    unit: unit roundoff ``u``.

  Returns:
    float64 (tensor when ``n`` is one); ``inf`` once ``n u >= 1``.
  """
  nu = tf.cast(n, tf.float64) * unit
  return tf.where(nu < 1.0, nu / (1.0 - nu),
                  tf.constant(float("inf"), tf.float64))


_BLOCK = 16   # float32 squares summed in float32 per block of <= 16


def _row_sq_sum(t: tf.Tensor):
  """``(sum of squares per row [M] float64, relative slack, absolute slack)``.

  Float64 rows: squared and summed in float64. Narrower rows: squared and
  summed in blocks of ``b <= 16`` consecutive entries in float32 (each
  square rounds once, relative ``u32``; a block sum of b non-negative terms
  is off by at most ``gamma_{b-1}`` relative, F3; entries in the subnormal
  range add at most ``2^-149`` absolute per operation), and the block sums
  in float64. An overflow gives ``inf``: a non-finite bound, scale 0.
  """
  m = tf.shape(t)[0]
  size = t.shape[1:].num_elements()
  if t.dtype == tf.float64 or size is None:
    flat = tf.reshape(tf.cast(t, tf.float64), [m, -1])
    n = size if size is not None else 1 << 40
    return (tf.reduce_sum(tf.square(flat), axis=1),
            gamma(n + 2, _UNIT[tf.float64]), 0.0)
  b = max(d for d in range(1, _BLOCK + 1) if size % d == 0)
  flat = tf.reshape(tf.cast(t, tf.float32), [m, size // b, b])
  blocks = tf.reduce_sum(tf.square(flat), axis=2)             # float32
  sq = tf.reduce_sum(tf.cast(blocks, tf.float64), axis=1)
  rel = ((1.0 + gamma(b + 1, _UNIT[tf.float32]))
         * (1.0 + gamma(size // b + 1, _UNIT[tf.float64])) - 1.0)
  return sq, rel, 2.0 * size * 2.0 ** -149


def norm_bound(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
  """Upper bound of each example's L2 norm over ``tensors`` ([M] float64).

  Args:
    tensors: ``[M, ...]`` tensors (any float dtype), row m is example m's part.

  Returns:
    ``sqrt(sq (1 + rel) + abs) (1 + 2 u64)`` with ``sq`` the computed sum of
    squares and ``rel``, ``abs`` its rounding bounds (``_row_sq_sum``): at
    least the exact norm of the rows, in float64.
  """
  total = None
  for t in tensors:
    sq, rel, absolute = _row_sq_sum(t)
    part = sq * (1.0 + rel) + absolute
    total = part if total is None else total + part
  n = len(tensors)
  return (tf.sqrt(total * (1.0 + gamma(n, _UNIT[tf.float64])))
          * (1.0 + 2.0 * _UNIT[tf.float64]))


def clip_scales(bound: tf.Tensor, l2_norm_clip, *, dtype=tf.float32,
                valid: Optional[tf.Tensor] = None) -> tf.Tensor:
  """Per-example clip scales ``min(1, C / u_i)``, rounded so they never exceed it.

  Args:
    bound: ``[M]`` upper bounds ``u_i`` of the norms of the tensors that the
      scales will multiply (any float dtype; used in float64).
    l2_norm_clip: scalar C > 0.
    dtype: dtype of the returned scales, the dtype in which ``scale * x`` is
      computed.
    valid: optional ``[M]`` bool; False gives scale 0.

  Returns:
    ``[M]`` scales in ``dtype``: 0 where ``u_i`` is not finite or the example
    is invalid; otherwise ``s`` with ``fl(s * x)`` of norm at most C for every
    ``x`` of norm at most ``u_i``.
  """
  u = tf.cast(bound, tf.float64)
  ok = tf.math.is_finite(u)
  if valid is not None:
    ok = tf.logical_and(ok, tf.cast(valid, tf.bool))
  safe = tf.where(ok, u, tf.ones_like(u))
  # A Python float stays exact (tf.cast would go through float32 first and
  # could round C up).
  clip = tf.cast(tf.convert_to_tensor(l2_norm_clip, dtype_hint=tf.float64),
                 tf.float64)
  # 4 units of roundoff cover the product's rounding; at least 2^-40 so that
  # a reader's own float64 norm of the result (numpy, another summation
  # order) also stays at or below C.
  slack = 1.0 + max(4.0 * unit_roundoff(dtype), 2.0 ** -40)
  scale = tf.minimum(tf.ones_like(safe), clip / (safe * slack))
  scale = tf.where(ok, scale, tf.zeros_like(scale))
  return _round_down(scale, dtype)


def _round_down(x64: tf.Tensor, dtype) -> tf.Tensor:
  """``x64`` (>= 0) in ``dtype``, never larger than ``x64`` (subnormals too)."""
  dtype = tf.as_dtype(dtype)
  if dtype == tf.float64:
    return x64
  y = tf.cast(x64, dtype)
  if dtype not in (tf.float32,):
    # Narrow dtypes: step down through float32 (nextafter needs float32/64).
    y32 = tf.cast(y, tf.float32)
    down = tf.math.nextafter(y32, tf.zeros_like(y32))
    return tf.where(tf.cast(y32, tf.float64) > x64,
                    tf.cast(tf.where(tf.cast(tf.cast(down, dtype), tf.float64)
                                     > x64, tf.zeros_like(down), down), dtype),
                    y)
  down = tf.math.nextafter(y, tf.zeros_like(y))
  return tf.where(tf.cast(y, tf.float64) > x64, down, y)


def _broadcast(v: tf.Tensor, t: tf.Tensor) -> tf.Tensor:
  return tf.reshape(v, [-1] + [1] * (t.shape.rank - 1))


def clip_per_example(grads: Sequence[tf.Tensor], l2_norm_clip,
                     valid: Optional[tf.Tensor] = None) -> List[tf.Tensor]:
  """Scales each example (all tensors together) to L2 norm at most C.

  Args:
    grads: one ``[M, ...]`` tensor per variable (same float dtype).
    l2_norm_clip: scalar C > 0.
    valid: optional ``[M]`` bool; invalid examples become exact zeros.

  Returns:
    The clipped tensors: row m has norm <= C, and is exactly 0 when its
    norm was not finite or the example is invalid.
  """
  grads = list(grads)
  scale = clip_scales(norm_bound(grads), l2_norm_clip, dtype=grads[0].dtype,
                      valid=valid)
  keep = scale > 0
  return [tf.where(_broadcast(keep, g), g * _broadcast(scale, g),
                   tf.zeros_like(g)) for g in grads]

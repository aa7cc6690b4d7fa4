"""Ghost clipping: per-example gradient norms without the per-example gradients.

For a layer whose per-example kernel gradient is ``A_b^T G_b`` (``A_b``:
``[T, K]``, the example's input rows or conv patches; ``G_b``: ``[T, O]``, the
gradient at the output positions), the squared Frobenius norm is

  ``|A_b^T G_b|^2 = sum_{t,u} (A_b A_b^T)_{tu} (G_b G_b^T)_{tu}``

(``|a_b|^2 |g_b|^2`` when ``T = 1``), which costs ``T^2 (K + O)`` instead of
materializing ``K * O`` numbers per example. The clipped sum
``sum_b s_b A_b^T G_b = A^T (s * G)`` is then one ordinary matmul over the
batch. Following mixed ghost clipping (Bu et al., 2022,
https://arxiv.org/abs/2210.00038; Li et al., 2021,
https://arxiv.org/abs/2110.05679) the ghost norm is used where
``T^2 < K * O`` and the gradient is materialized elsewhere.
Only for one example per microbatch.
"""

from typing import NamedTuple, Optional

import tensorflow as tf

from dpquant_tf import _layer_kinds
from dpquant_tf.perexample import _registry
from dpquant_tf.perexample import _rules

__all__ = ["conv_ghost_positions", "conv_positions", "ghost_operands",
           "ghost_part"]


# With T > 1 positions the rigorous ghost bound needs float64 Gram matrices
# and a float64 contraction (see ghost_part); below this many kernel entries
# per example, materializing the per-example gradient (float32, its norm
# bounded by privacy._clip.norm_bound) is faster. Tutorial CNN (second
# convolution: T = 25, K*O = 8192), DP step CPU time at batch 256: float32
# ghost (before) 42.5 ms, float64 ghost 65 ms, materialized 39.4 ms.
GHOST_MIN_KERNEL = 1 << 16


def _ghost_pays(t, kernel_size):
  if t == 1:
    return True
  return t * t < kernel_size and kernel_size >= GHOST_MIN_KERNEL


class GhostOperands(NamedTuple):
  a: tf.Tensor          # [B, T, K]
  g: tf.Tensor          # [B, T, O]
  kernel_shape: list


def conv_positions(kind, layer, g) -> Optional[int]:
  """Output positions T per example of an ungrouped Conv layer (static
  shapes only, no op built), else None."""
  if kind not in _layer_kinds.CONVS or (getattr(layer, "groups", 1) or 1) != 1:
    return None
  if getattr(layer, "data_format", "channels_last") == "channels_first":
    positions, channels = g.shape[2:], g.shape[1]
  else:
    positions, channels = g.shape[1:-1], g.shape[-1]
  t = positions.num_elements()
  return None if t is None or channels is None else t


def conv_ghost_positions(kind, layer, g) -> Optional[int]:
  """Positions T of a Conv layer whose ghost norm pays, else None: the
  layers whose `ghost_part` runs the float64 arithmetic when ``T > 1``."""
  t = conv_positions(kind, layer, g)
  if t is None:
    return None
  return t if _ghost_pays(t, layer.kernel.shape.num_elements()) else None


def ghost_operands(kind, layer, x, g) -> Optional[GhostOperands]:
  """(A, G) of a Dense or Conv layer when the ghost norm is cheaper, else None."""
  if kind is _registry.LayerKind.DENSE:
    k_in, out = x.shape[-1], g.shape[-1]
    t = x.shape[1:-1].num_elements()
    if t is None or k_in is None or not _ghost_pays(t, k_in * out):
      return None
    b = tf.shape(x)[0]
    return GhostOperands(tf.reshape(x, [b, t, k_in]),
                         tf.reshape(g, [b, t, out]),
                         layer.kernel.shape.as_list())
  t = conv_ghost_positions(kind, layer, g)
  if t is not None:
    x2, ks, st, dl, padding = _rules._conv_geometry(layer, x)  # pylint: disable=protected-access
    g2 = _rules._to_channels_last(layer, g)  # pylint: disable=protected-access
    k_in = ks[0] * ks[1] * x2.shape[-1]
    out = g2.shape[-1]
    b = tf.shape(x)[0]
    p = _rules._patches(x2, ks, st, dl, padding)  # pylint: disable=protected-access
    return GhostOperands(tf.reshape(p, [b, t, k_in]),
                         tf.reshape(g2, [b, t, out]),
                         layer.kernel.shape.as_list())
  return None


_U32 = 2.0 ** -24
_U64 = 2.0 ** -53
_CAP = 2.0 ** -12


def _gamma(n, unit):
  nu = tf.cast(n, tf.float64) * unit
  return tf.where(nu < 1.0, nu / (1.0 - nu),
                  tf.constant(float("inf"), tf.float64))


def ghost_part(ops: GhostOperands, entries):
  """``(sq [B], lin [B], finish(scale) -> {var index: clipped sum})``.

  ``sqrt(sq) + lin`` bounds, in the arithmetic ``finish`` executes, the norm
  of the tensor ``finish`` adds for each example per unit of scale
  (docs/PRIVACY.md, "The clip bound, path by path"), both float64:

  * The taps are used as float32 (bfloat16 taps are cast: exact). With
    ``S_b = sum_t |a_t| |g_t|`` (the triangle bound of the example's kernel
    gradient, plus ``sum_t |g_t|`` for the bias):
  * ``T == 1``: ``sq = |a|^2 |g|^2`` in float64 (squares of float32 values
    are exact there); ``finish`` computes ``a^T fl(s g)`` in float32, one
    product per entry and no sum within the example: two roundings,
    ``lin = 3 u32 S``.
  * ``T > 1``: ``sq`` from float64 Gram matrices, whose products are exact
    and whose sums are off by at most ``gamma_n S^2`` (``n = K + O + T^2``),
    added to ``sq``; ``finish`` multiplies ``s g`` and contracts over all
    ``B T`` rows in float64 (exact products; the sum's rounding is at most
    ``gamma_{BT} S`` per example): ``lin = gamma_{BT + ...} S``. Only the
    final cast of the batch sum to float32 rounds in float32.
  """
  roles = {role: i for i, role in entries}
  af = tf.cast(ops.a, tf.float32)
  gf = tf.cast(ops.g, tf.float32)
  single = af.shape[1] == 1      # statically one position per example
  k_in, out_dim = af.shape[-1], gf.shape[-1]
  a64, g64 = tf.cast(af, tf.float64), tf.cast(gf, tf.float64)
  na = tf.sqrt(tf.reduce_sum(tf.square(a64), axis=2))          # [B, T]
  ng = tf.sqrt(tf.reduce_sum(tf.square(g64), axis=2))
  t = tf.cast(tf.shape(af)[1], tf.float64)
  rows = tf.cast(tf.shape(af)[0], tf.float64) * t
  sq = tf.zeros_like(na[:, 0])
  s_tri = tf.zeros_like(na[:, 0])
  n_ops = k_in + out_dim + 8
  if "kernel" in roles:
    s_k = tf.reduce_sum(na * ng, axis=1)
    if single:
      sq += tf.square(s_k)
    else:
      gram_a = tf.matmul(a64, a64, transpose_b=True)            # [B, T, T]
      gram_g = tf.matmul(g64, g64, transpose_b=True)
      gram = tf.reduce_sum(gram_a * gram_g, axis=[1, 2])
      sq += (tf.maximum(gram, tf.zeros_like(gram))
             + _gamma(n_ops + t * t, _U64) * tf.square(s_k))
    s_tri += s_k
  if "bias" in roles:
    gsum = tf.reduce_sum(g64, axis=1)                            # [B, O]
    sq += tf.reduce_sum(tf.square(gsum), axis=1)
    s_tri += tf.reduce_sum(ng, axis=1)
  if single:
    coef = tf.constant(3.0 * _U32, tf.float64)
  else:
    coef = 2.0 * _gamma(rows + t + n_ops, _U64)
  # The norms, S and the Gram sum themselves round in float64: a relative
  # gamma_n on each (n: the operations along any one path).
  rel = 1.0 + 2.0 * _gamma(n_ops + t * t + 2 * t, _U64)
  sq = sq * rel
  lin = coef * s_tri * rel
  if not single:
    # Cap s_i S_i at 2^12 C: the float64 batch contraction's rounding that
    # is not the example's own (removing i can change how the rows of the
    # others round) stays below 2 gamma_{BT} 2^12 C per example. A benign
    # example is unaffected unless its positions cancel 4096-fold.
    lin = tf.maximum(lin, s_tri * rel * _CAP - tf.sqrt(sq))

  def finish(scale):
    # scale 0 marks an example whose bound was not finite or that is
    # invalid: select its rows away (0 * NaN is NaN, and the matmul below
    # sums over the batch), so it contributes exactly zero and cannot
    # poison the others (invariant 9).
    keep = tf.not_equal(scale, 0)[:, None, None]
    if single:
      a_w, g_w = af, gf * tf.cast(scale, tf.float32)[:, None, None]
    else:
      a_w, g_w = a64, g64 * tf.cast(scale, tf.float64)[:, None, None]
    gs = tf.where(keep, g_w, tf.zeros_like(g_w))
    a_safe = tf.where(keep, a_w, tf.zeros_like(a_w))
    result = {}
    if "kernel" in roles:
      k = tf.matmul(tf.reshape(a_safe, [-1, k_in]),
                    tf.reshape(gs, [-1, out_dim]), transpose_a=True)
      result[roles["kernel"]] = tf.reshape(tf.cast(k, tf.float32),
                                           ops.kernel_shape)
    if "bias" in roles:
      result[roles["bias"]] = tf.cast(tf.reduce_sum(gs, axis=[0, 1]),
                                      tf.float32)
    return result
  return sq, lin, finish

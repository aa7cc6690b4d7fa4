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

__all__ = ["ghost_operands", "ghost_part"]


class GhostOperands(NamedTuple):
  a: tf.Tensor          # [B, T, K]
  g: tf.Tensor          # [B, T, O]
  kernel_shape: list


def ghost_operands(kind, layer, x, g) -> Optional[GhostOperands]:
  """(A, G) of a Dense or Conv layer when the ghost norm is cheaper, else None."""
  if kind is _registry.LayerKind.DENSE:
    k_in, out = x.shape[-1], g.shape[-1]
    t = 1
    for d in x.shape[1:-1]:
      t = None if (d is None or t is None) else t * d
    if t is None or k_in is None or t * t >= k_in * out:
      return None
    b = tf.shape(x)[0]
    return GhostOperands(tf.reshape(x, [b, t, k_in]),
                         tf.reshape(g, [b, t, out]),
                         layer.kernel.shape.as_list())
  if kind in _layer_kinds.CONVS and (getattr(layer, "groups", 1) or 1) == 1:
    x2, ks, st, dl, padding = _rules._conv_geometry(layer, x)  # pylint: disable=protected-access
    g2 = _rules._to_channels_last(layer, g)  # pylint: disable=protected-access
    if layer.rank == 1:
      g2 = g2[:, None]
    t = g2.shape[1] * g2.shape[2] if None not in g2.shape[1:3] else None
    k_in = ks[0] * ks[1] * x2.shape[-1]
    out = g2.shape[-1]
    if t is None or t * t >= k_in * out:
      return None
    b = tf.shape(x)[0]
    p = _rules._patches(x2, ks, st, dl, padding)  # pylint: disable=protected-access
    return GhostOperands(tf.reshape(p, [b, t, k_in]),
                         tf.reshape(g2, [b, t, out]),
                         layer.kernel.shape.as_list())
  return None


def ghost_part(ops: GhostOperands, entries):
  """(squared norms [B], finish(scale) -> {var index: clipped sum})."""
  roles = {role: i for i, role in entries}
  a, g = ops.a, ops.g
  af, gf = tf.cast(a, tf.float32), tf.cast(g, tf.float32)
  gsum = tf.reduce_sum(gf, axis=1)                              # [B, O]
  sq = tf.zeros_like(gsum[:, 0])
  if "kernel" in roles:
    if a.shape[1] == 1:
      sq += (tf.reduce_sum(tf.square(af[:, 0]), axis=1)
             * tf.reduce_sum(tf.square(gf[:, 0]), axis=1))
    else:
      gram_a = tf.matmul(af, af, transpose_b=True)              # [B, T, T]
      gram_g = tf.matmul(gf, gf, transpose_b=True)
      sq += tf.reduce_sum(tf.reshape(gram_a * gram_g, [tf.shape(a)[0], -1]),
                          axis=1)
  if "bias" in roles:
    sq += tf.reduce_sum(tf.square(gsum), axis=1)

  def finish(scale):
    # scale 0 marks an example whose norm was not finite: select its rows
    # away (0 * NaN is NaN, and the matmul below sums over the batch), so it
    # contributes exactly zero and cannot poison the others (invariant 9).
    keep = tf.not_equal(scale, 0)[:, None, None]
    gs = tf.where(keep, g * tf.cast(scale, g.dtype)[:, None, None],
                  tf.zeros_like(g))
    a_safe = tf.where(keep, a, tf.zeros_like(a))
    out = {}
    if "kernel" in roles:
      k = tf.matmul(tf.reshape(a_safe, [-1, a.shape[-1]]),
                    tf.reshape(gs, [-1, g.shape[-1]]), transpose_a=True)
      out[roles["kernel"]] = tf.reshape(k, ops.kernel_shape)
    if "bias" in roles:
      out[roles["bias"]] = tf.reduce_sum(gs, axis=[0, 1])
    return out
  return sq, finish

"""GroupNormalization as fused programs: forward, backward, per-example rule.

Keras' ``GroupNormalization`` computes weighted moments with an all-ones mask
and differentiates through them: about twenty passes over the activation per
forward and backward pass, and the per-example rule recomputes the moments
once more. On the small GroupNorm ResNet these passes were 43% of the fp32
DP step's op time (docs/PERFORMANCE.md). Here the same function of the same
variables is written out:

    xhat = (x - mean_g(x)) * rsqrt(var_g(x) + eps)       (per example, group)
    y = xhat * gamma + beta
    dx = rsqrt(var_g + eps) * (d - mean_g(d) - xhat * mean_g(d * xhat)),
         d = dy * gamma
    dgamma_i = sum over positions of dy_i * xhat_i,  dbeta_i = sum of dy_i

The moments are sums over positions per channel (a column reduction over
``[B, positions, C]``), then over each group's channels; the backward pass
derives the group means it needs from the per-channel sums that are also
``dgamma`` and ``dbeta`` (two passes: 1.3-1.5x faster than reducing the
``[B, positions, groups, C / groups]`` view, measured 2026-12-05). Each part
is one XLA program (a cluster inside the ordinary graph,
compiled once per shape; inlined under an outer ``jit_compile``), which
fuses those passes into a few loops. A dynamic batch (Poisson sampling) is
padded with zero examples to a multiple of 16 first, so a run compiles a
handful of buckets, not one program per batch size; with another dynamic
dimension the same formulas run as ordinary ops. Numerics: the same float32
formulas in another order (outputs agree with Keras' to a few ulps; tested).

The per-example gradients of ``gamma`` and ``beta`` come out of the
backward program: ``TappedLayer`` passes the parameters as per-example
copies ``[B, C]``, whose gradient is each example's (``group_norm``);
``group_norm_param_sums`` (a third program that recomputes the moments)
serves a tap of the output instead.

Only the channels-last layout without a mask is fused; anything else runs the
layer's own ``call``.
"""

from typing import Optional, Tuple

import tensorflow as tf

__all__ = ["fusable", "group_norm", "group_norm_param_sums"]


def fusable(layer, inputs, mask=None) -> bool:
  """True when ``group_norm`` computes what ``layer(inputs)`` computes."""
  if not isinstance(layer, tf.keras.layers.GroupNormalization):
    return False
  rank = inputs.shape.rank
  return (mask is None and rank is not None and rank >= 2
          and layer.axis % rank == rank - 1
          and inputs.dtype == tf.float32
          and layer.compute_dtype == "float32")


def _flat(t):
  """[B, ..., C] -> [B, positions, C]."""
  return tf.reshape(t, tf.stack([tf.shape(t)[0], -1, t.shape[-1]]))


def _group_sums(s, groups):
  """[B, C] -> [B, groups]: sums over each group's channels."""
  c = s.shape[-1]
  return tf.reduce_sum(tf.reshape(s, tf.stack([tf.shape(s)[0], groups,
                                               c // groups])), 2)


def _per_channel(t, c):
  """[B, groups] -> [B, C]: each group's value on its channels."""
  return tf.repeat(t, c // t.shape[-1], axis=1)


def _count(xf, groups):
  """Values per example and group, as float32."""
  return tf.cast(tf.shape(xf)[1] * (xf.shape[-1] // groups), tf.float32)


def _moments(xf, groups, epsilon):
  """``(mean, rsqrt(var + eps))``, each ``[B, groups]``, of ``xf``
  ``[B, positions, C]``: sums over positions per channel (one column
  reduction), then over each group's channels; the variance from the
  deviations (two passes, as Keras)."""
  c, n = xf.shape[-1], _count(xf, groups)
  mean = _group_sums(tf.reduce_sum(xf, 1), groups) / n
  dev = xf - _per_channel(mean, c)[:, None, :]
  var = _group_sums(tf.reduce_sum(tf.square(dev), 1), groups) / n
  return mean, tf.math.rsqrt(var + epsilon)


def _forward_impl(x, gamma, beta, groups, epsilon):
  """``y = (x - mean) * rstd * gamma + beta`` as ``x * a + b`` per example
  and channel; ``gamma``/``beta`` ``[C]`` or per example ``[B, C]``; ``x``
  float32 or bfloat16 (read as float32: exact), ``y`` float32."""
  xf = tf.cast(_flat(x), tf.float32)
  c = xf.shape[-1]
  mean, rstd = _moments(xf, groups, epsilon)
  a = _per_channel(rstd, c)
  if gamma is not None:
    a = a * gamma
  b = -_per_channel(mean, c) * a
  if beta is not None:
    b = b + beta
  y = xf * a[:, None, :] + b[:, None, :]
  return tf.reshape(y, tf.shape(x)), mean, rstd


def _backward_impl(x, gamma, mean, rstd, dy, groups):
  """``dx`` and the per-example ``dgamma``, ``dbeta`` (``[B, C]`` each).

  With ``d = dy * gamma``, the group means of ``d`` and ``d * xhat`` are
  the group sums of ``gamma * dbeta`` and ``gamma * dgamma`` over ``n``:
  one pass reads ``x`` and ``dy`` for the sums, one more writes ``dx``
  (in ``x``'s dtype: a bfloat16 input gets its gradient rounded to bfloat16
  once, as the cast it replaces would round it).
  """
  xf, dyf = tf.cast(_flat(x), tf.float32), _flat(dy)
  c, n = xf.shape[-1], _count(xf, groups)
  r = _per_channel(rstd, c)
  xhat = (xf - _per_channel(mean, c)[:, None, :]) * r[:, None, :]
  dgamma = tf.reduce_sum(dyf * xhat, 1)
  dbeta = tf.reduce_sum(dyf, 1)
  scale = gamma if gamma is not None else tf.ones([c], dy.dtype)
  mean_d = _per_channel(_group_sums(dbeta * scale, groups) / n, c)
  mean_dx = _per_channel(_group_sums(dgamma * scale, groups) / n, c)
  if scale.shape.rank == 1:
    scale = scale[None]
  dx = r[:, None, :] * (dyf * scale[:, None, :] - mean_d[:, None, :]
                        - xhat * mean_dx[:, None, :])
  return tf.cast(tf.reshape(dx, tf.shape(x)), x.dtype), dgamma, dbeta


def _param_sums_impl(x, g, groups, epsilon):
  xf = tf.cast(_flat(x), tf.float32)
  c = xf.shape[-1]
  mean, rstd = _moments(xf, groups, epsilon)
  xhat = ((xf - _per_channel(mean, c)[:, None, :])
          * _per_channel(rstd, c)[:, None, :])
  gf = _flat(g)
  return tf.reduce_sum(gf * xhat, 1), tf.reduce_sum(gf, 1)


def _compiled(fn):
  # Traced per static shape (used only where every shape is static).
  return tf.function(fn, jit_compile=True, autograph=False)


_FORWARD_XLA = _compiled(_forward_impl)
_BACKWARD_XLA = _compiled(_backward_impl)
_PARAM_SUMS_XLA = _compiled(_param_sums_impl)


# A dynamic batch (Poisson sampling) is padded with zero examples to a
# multiple of this many, so XLA compiles one program per bucket, not per
# batch size. A zero example is exact padding: its statistics are mean 0 and
# rsqrt(eps), its xhat is 0, and with a zero output gradient it adds nothing
# to dgamma, dbeta or any other example's values (each example's
# normalization is its own).
_BUCKET = 16


def _mode(*tensors) -> Optional[str]:
  """"static": every shape known; "bucketed": all but the batch; else None."""
  shapes = [t.shape for t in tensors if t is not None]
  if all(s.is_fully_defined() for s in shapes):
    return "static"
  if all(s.rank is not None and s[1:].is_fully_defined() for s in shapes):
    return "bucketed"
  return None


def _pad_batch(t, size):
  pad = size - tf.shape(t)[0]
  return tf.pad(t, [[0, pad]] + [[0, 0]] * (t.shape.rank - 1))


def _bucket(t):
  b = tf.shape(t)[0]
  return b, (b + _BUCKET - 1) // _BUCKET * _BUCKET


def group_norm(x, gamma: Optional[tf.Tensor], beta: Optional[tf.Tensor], *,
               groups: int, epsilon: float) -> tf.Tensor:
  """Channels-last GroupNormalization of ``x`` with its analytic gradient.

  The gradients of ``gamma`` and ``beta`` come out of the backward program
  per example (sums over positions, ``[B, C]``); for ``[C]`` parameters they
  are then summed over the batch. Given per-example parameters (``[B, C]``,
  every row the layer's, as ``TappedLayer`` passes them), their gradient is
  each example's own: the per-example gradients of the layer's parameters,
  with no further pass over the activations.

  Args:
    x: float32 or bfloat16 ``[B, ..., C]`` (bfloat16: the normalization
      reads it as float32, exactly, and its gradient is bfloat16).
    gamma: ``[C]`` scale, per-example ``[B, C]``, or None (``scale=False``).
    beta: ``[C]`` offset, per-example ``[B, C]``, or None (``center=False``).
    groups: number of groups (divides ``C``).
    epsilon: added to the variance.

  Returns:
    float32 ``y`` of ``x``'s shape; differentiable in ``x``, ``gamma`` and
    ``beta``.
  """
  args = [tf.convert_to_tensor(t) for t in (gamma, beta) if t is not None]
  mode = _mode(x)
  has_gamma, has_beta = gamma is not None, beta is not None

  @tf.custom_gradient
  def fused(x, *params):
    params = list(params)
    scale = params.pop(0) if has_gamma else None
    offset = params.pop(0) if has_beta else None
    scale_p, offset_p = scale, offset
    if mode == "bucketed":
      b, size = _bucket(x)
      xp = _pad_batch(x, size)
      # Per-example parameters are padded with zero rows, as x is.
      scale_p, offset_p = [p if p is None or p.shape.rank == 1
                           else _pad_batch(p, size) for p in (scale, offset)]
      y, mean, rstd = _FORWARD_XLA(xp, scale_p, offset_p, groups, epsilon)
      y = y[:b]
    elif mode == "static":
      xp = x
      y, mean, rstd = _FORWARD_XLA(x, scale, offset, groups, epsilon)
    else:
      xp = x
      y, mean, rstd = _forward_impl(x, scale, offset, groups, epsilon)

    def grad(dy):
      if not tf.executing_eagerly():
        dy.set_shape(x.shape)
      if mode == "bucketed":
        dx, dgamma, dbeta = _BACKWARD_XLA(xp, scale_p, mean, rstd,
                                          _pad_batch(dy, size), groups)
        dx, dgamma, dbeta = dx[:b], dgamma[:b], dbeta[:b]
      else:
        backward = _BACKWARD_XLA if mode == "static" else _backward_impl
        dx, dgamma, dbeta = backward(xp, scale_p, mean, rstd, dy, groups)
      grads = [dx]
      for on, p, dp in ((has_gamma, scale, dgamma), (has_beta, offset, dbeta)):
        if on:   # per-example rows for [B, C] parameters, else their sum
          grads.append(dp if p.shape.rank == 2 else tf.reduce_sum(dp, 0))
      return grads
    return y, grad

  return fused(x, *args)


def group_norm_param_sums(x, g, *, groups: int,
                          epsilon: float) -> Tuple[tf.Tensor, tf.Tensor]:
  """Per-example ``(sum g * xhat, sum g)`` over positions, each ``[B, C]``.

  The gradients of one example's loss with respect to ``gamma`` and ``beta``
  when ``g`` is the gradient at the layer's output.
  """
  mode = _mode(x, g)
  if mode == "static":
    return _PARAM_SUMS_XLA(x, g, groups, epsilon)
  if mode == "bucketed":
    b, size = _bucket(x)
    gg, gb = _PARAM_SUMS_XLA(_pad_batch(x, size), _pad_batch(g, size), groups,
                             epsilon)
    return gg[:b], gb[:b]
  return _param_sums_impl(x, g, groups, epsilon)

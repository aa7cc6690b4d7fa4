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

and each part is one XLA program (a cluster inside the ordinary graph,
compiled once per shape; inlined under an outer ``jit_compile``), which
fuses those passes into a few loops. A dynamic batch (Poisson sampling) is
padded with zero examples to a multiple of 16 first, so a run compiles a
handful of buckets, not one program per batch size; with another dynamic
dimension the same formulas run as ordinary ops. Numerics: the same float32
formulas in another order (outputs agree with Keras' to a few ulps; tested).

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


def _grouped(t, groups):
  """[B, ..., C] -> [B, positions, groups, C / groups]."""
  shape = tf.shape(t)
  return tf.reshape(t, [shape[0], -1, groups, shape[-1] // groups])


def _moments(x, groups, epsilon):
  """(x grouped, mean, rsqrt(var + eps)), statistics [B, 1, groups, 1]."""
  xg = _grouped(x, groups)
  mean = tf.reduce_mean(xg, [1, 3], keepdims=True)
  var = tf.reduce_mean(tf.square(xg - mean), [1, 3], keepdims=True)
  return xg, mean, tf.math.rsqrt(var + epsilon)


def _per_example(p, x):
  """A parameter ``[C]`` as is; per-example ``[B, C]`` as ``[B, 1, .., C]``."""
  if p is None or p.shape.rank == 1:
    return p
  return tf.reshape(p, tf.concat([tf.shape(p)[:1],
                                  tf.ones([x.shape.rank - 2], tf.int32),
                                  tf.shape(p)[1:]], 0))


def _forward_impl(x, gamma, beta, groups, epsilon):
  xg, mean, rstd = _moments(x, groups, epsilon)
  y = tf.reshape((xg - mean) * rstd, tf.shape(x))
  if gamma is not None:
    y = y * _per_example(gamma, x)
  if beta is not None:
    y = y + _per_example(beta, x)
  return y, mean, rstd


def _backward_impl(x, gamma, mean, rstd, dy, groups):
  """``dx`` and the per-example ``dgamma``, ``dbeta`` (``[B, C]`` each)."""
  xhat = (_grouped(x, groups) - mean) * rstd
  d = _grouped(dy * _per_example(gamma, x) if gamma is not None else dy,
               groups)
  dx = rstd * (d - tf.reduce_mean(d, [1, 3], keepdims=True)
               - xhat * tf.reduce_mean(d * xhat, [1, 3], keepdims=True))
  positions = list(range(1, dy.shape.rank - 1))
  dgamma = tf.reduce_sum(dy * tf.reshape(xhat, tf.shape(x)), positions)
  dbeta = tf.reduce_sum(dy, positions)
  return tf.reshape(dx, tf.shape(x)), dgamma, dbeta


def _param_sums_impl(x, g, groups, epsilon):
  xg, mean, rstd = _moments(x, groups, epsilon)
  xhat = tf.reshape((xg - mean) * rstd, tf.shape(x))
  positions = list(range(1, g.shape.rank - 1))
  return (tf.reduce_sum(g * xhat, positions),
          tf.reduce_sum(g, positions))


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
    x: float32 ``[B, ..., C]``.
    gamma: ``[C]`` scale, per-example ``[B, C]``, or None (``scale=False``).
    beta: ``[C]`` offset, per-example ``[B, C]``, or None (``center=False``).
    groups: number of groups (divides ``C``).
    epsilon: added to the variance.

  Returns:
    ``y`` of ``x``'s shape; differentiable in ``x``, ``gamma`` and ``beta``.
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

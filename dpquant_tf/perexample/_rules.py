"""Per-example (per-microbatch) gradient rules, one pure function per layer kind.

Every rule takes the layer's tap input ``x`` (batch first, ``B`` examples), the
gradient ``g`` of the *summed* per-example loss at the layer's tap output (one
backward pass gives every example's row, because example ``b``'s loss depends
only on row ``b``), and the number of microbatches ``M`` (``B`` divisible by
``M``; microbatch ``j`` holds examples ``j*k .. (j+1)*k - 1`` with ``k = B/M``,
as in TF-Privacy). It returns ``{role: [M, *var.shape]}``: the gradient of the
*summed* loss over each microbatch; dividing by ``k`` (done by the caller, once,
or folded into the clip scale) gives TF-Privacy's per-microbatch gradient, that
of the mean loss.

Math (per microbatch ``m`` of ``k`` examples, before the 1/k; sums run over the examples of ``m``
and over positions ``t`` such as sequence steps or output pixels):

* Dense ``z = x W + b``: ``dW_m = sum_{b,t} x_{b,t}^T g_{b,t}``.
* Conv: the same with ``x`` replaced by its patches (a one-hot-kernel
  convolution or ``tf.image.extract_patches`` with the layer's strides,
  dilation and padding; Conv1D as a 1xL image); at stride 1 with deep
  patches, equivalently, one contraction per kernel tap of the input window
  that tap reads (no patches written). For ``padding="causal"`` the
  tap input is the already left-padded input (what the VALID convolution
  sees), as ``QuantizedLayer`` and ``TappedLayer`` record it.
* DepthwiseConv2D: patches per channel, contracted channel by channel.
* EinsumDense: the layer's equation with the batch letter kept in the output.
* Embedding: rows of ``g`` scatter-added at the looked-up ids.
* LayerNormalization / GroupNormalization: ``dgamma = sum g * xhat``,
  ``dbeta = sum g`` with ``xhat`` recomputed from ``x``.
"""

import re
from typing import Dict

import tensorflow as tf

from dpquant_tf.perexample import _norms

__all__ = ["UnsupportedLayerError", "conv_grads", "dense_grads",
           "depthwise_conv2d_grads", "einsum_dense_grads",
           "expanded_param_grads", "embedding_grads", "group_norm_grads",
           "layer_norm_grads"]


class UnsupportedLayerError(ValueError):
  """A layer configuration the fast path has no rule for (falls back)."""


def _batch(t):
  b = t.shape[0]
  return b if b is not None else tf.shape(t)[0]


def _per_mb(t, m, last_dims: int):
  """[B, ..., *last] -> [M, T, *last] (k examples and positions merged into T)."""
  last = t.shape[t.shape.rank - last_dims:].as_list() if last_dims else []
  if any(d is None for d in last):
    dyn = tf.shape(t)[t.shape.rank - last_dims:]
    return tf.reshape(t, tf.concat([[m, -1], dyn], 0))
  return tf.reshape(t, [m, -1] + last)


def _scale(t, x, m):  # pylint: disable=unused-argument
  """Rules return per-microbatch sums; the caller divides by k = B / M."""
  return t


def _bias_grad(g, m, x):
  return _scale(tf.reduce_sum(_per_mb(g, m, 1), axis=1), x, m)


def _contract(xa, ga):
  """[M, T, I], [M, T, O] -> [M, I, O] (sum over T)."""
  if xa.shape[1] == 1 and ga.shape[1] == 1:
    return xa[:, 0, :, None] * ga[:, 0, None, :]
  return tf.linalg.matmul(xa, ga, transpose_a=True)


def dense_grads(layer, x, g, m) -> Dict[str, tf.Tensor]:
  """Dense: kernel [in, out], bias [out]."""
  out = {"kernel": _scale(_contract(_per_mb(x, m, 1), _per_mb(g, m, 1)), x, m)}
  if getattr(layer, "bias", None) is not None:
    out["bias"] = _bias_grad(g, m, x)
  return out


def _to_channels_last(layer, t):
  if getattr(layer, "data_format", "channels_last") == "channels_first":
    perm = [0] + list(range(2, t.shape.rank)) + [1]
    return tf.transpose(t, perm)
  return t


_IDENTITY_CONV_MAX_DEPTH = 128


def _identity_conv_max_depth(dtype) -> int:
  """Largest patch depth copied by the one-hot convolution (`_patches`).

  In bfloat16 (AMX) the one-hot convolution stays faster than
  ``extract_patches`` up to depth 256 (ms per call, extract / one-hot:
  batch 64, 28x28, 3x3/2 from 16 channels, depth 144: 2.07 / 0.73; batch
  256, 13x13, 4x4/2 from 16 channels, depth 256: 3.07 / 1.92; batch 64,
  14x14, 3x3/2 from 32 channels, depth 288: 1.76 / 1.77; float32 at depth
  144: 3.02 / 2.96, at 256: 3.36 / 7.16). The copy is exact in either
  dtype: each output is one input times 1.
  """
  return 256 if dtype == tf.bfloat16 else _IDENTITY_CONV_MAX_DEPTH


def _patches(x, kernel_size, strides, dilation, padding):
  """x [B, H, W, C] -> patches [B, OH, OW, KH*KW*C] ordered (kh, kw, c)."""
  kh, kw = kernel_size
  if kh == 1 and kw == 1 and tuple(dilation) == (1, 1):
    sh, sw = strides
    return x[:, ::sh, ::sw, :] if (sh, sw) != (1, 1) else x
  depth = kh * kw * x.shape[-1]
  if depth <= _identity_conv_max_depth(x.dtype):
    # A convolution with a one-hot kernel copies each patch into the output
    # channels in (kh, kw, c) order. On CPU (oneDNN) this is 3-4x faster
    # than tf.image.extract_patches for small patch depths; its cost grows
    # as depth^2, so large depths use extract_patches.
    eye = tf.reshape(tf.eye(depth, dtype=x.dtype), [kh, kw, x.shape[-1], depth])
    return tf.nn.conv2d(x, eye, strides=list(strides), padding=padding,
                        dilations=list(dilation))
  return tf.image.extract_patches(
      x, sizes=[1, kh, kw, 1], strides=[1, strides[0], strides[1], 1],
      rates=[1, dilation[0], dilation[1], 1], padding=padding)


def _conv_geometry(layer, x):
  """Channels-last 2-D view of a Conv1D/2D/DepthwiseConv2D input."""
  x = _to_channels_last(layer, x)
  ks, st, dl = (tuple(layer.kernel_size), tuple(layer.strides),
                tuple(layer.dilation_rate))
  padding = layer.padding.upper()
  if layer.rank == 1:
    if padding == "CAUSAL":  # taps of causal convs hold the padded input
      padding = "VALID"
    x = x[:, None]
    ks, st, dl = (1,) + ks, (1,) + st, (1,) + dl
  elif layer.rank != 2:
    raise UnsupportedLayerError(f"Conv rank {layer.rank}")
  if padding not in ("SAME", "VALID"):
    raise UnsupportedLayerError(f"padding {layer.padding!r}")
  return x, ks, st, dl, padding


def _use_shifted(ks, st, cin) -> bool:
  """Stride 1 and a patch deeper than the one-hot convolution serves.

  There the per-example kernel gradient is cheaper as one contraction per
  kernel offset of a shifted view of the input (`_shifted_contract`) than
  through ``extract_patches``, which writes ``kh*kw`` copies of the input.
  Measured (batch 64, 3x3, float32, quiet 2-core CPU with oneDNN; ms per
  call, patches then shifted): 28x28, 16->16 channels 10.3 / 4.0;
  14x14, 32->32 5.5 / 3.1; 7x7, 64->64 4.2 / 3.7. With stride 2 the strided
  slices made it 2-3x slower, so strided convolutions keep the patches.
  """
  return (tuple(st) == (1, 1) and ks[0] * ks[1] > 1
          and ks[0] * ks[1] * cin > _IDENTITY_CONV_MAX_DEPTH)


def _shifted_contract(x, g, ks, dl, padding, m):
  """[M, kh, kw, cin, cout]: sum over each microbatch's examples and positions
  of ``x[b, t + offset(i, j)] (x) g[b, t]`` for a stride-1 convolution.

  Output position ``t = (r, c)`` of a stride-1 convolution reads input
  position ``(r + i*dh, c + j*dw)`` (after SAME padding) with kernel tap
  ``(i, j)``. The ``kh`` row windows ``x[:, i*dh : i*dh + oh, :]`` (full
  padded width ``Wp = ow + (kw-1)*dw``) are stacked on the channel axis, and
  so are the ``kw`` copies of ``g`` shifted right by ``j*dw`` columns within
  width ``Wp`` (zeros elsewhere): then block ``(i, j)`` of one batched
  contraction ``[M, Wp*oh*k, kh*cin]^T x [M, Wp*oh*k, kw*cout]`` is
  ``sum_(r, c) x[b, r + i*dh, c + j*dw] g[b, r, c]``, tap ``(i, j)``'s
  gradient: the same sums as the patches' contraction, in another order,
  with ``kh + kw`` copies instead of ``kh*kw`` and one larger matmul
  (faster than one contraction per tap: 1.1-1.5x in bf16, up to 1.1x in
  float32, batch 64 3x3 16-64 channels, 2026-12-05).
  """
  kh, kw = ks
  dh, dw = dl
  if padding == "SAME":
    ph, pw = (kh - 1) * dh, (kw - 1) * dw
    x = tf.pad(x, [[0, 0], [ph // 2, ph - ph // 2], [pw // 2, pw - pw // 2],
                   [0, 0]])
  oh = g.shape[1] if g.shape[1] is not None else tf.shape(g)[1]
  cin, cout = x.shape[-1], g.shape[-1]
  rows = tf.concat([x[:, i * dh:i * dh + oh] for i in range(kh)], axis=-1)
  cols = tf.concat([tf.pad(g, [[0, 0], [0, 0], [j * dw, (kw - 1 - j) * dw],
                               [0, 0]]) for j in range(kw)], axis=-1)
  dk = _contract(_per_mb(rows, m, 1), _per_mb(cols, m, 1))  # [M, kh*cin, kw*cout]
  dk = tf.reshape(dk, [m, kh, cin, kw, cout])
  return tf.transpose(dk, [0, 1, 3, 2, 4])                  # [M, kh, kw, cin, cout]


def conv_grads(layer, x, g, m) -> Dict[str, tf.Tensor]:
  """Conv1D / Conv2D (any strides, dilation, SAME/VALID/causal, groups)."""
  x, ks, st, dl, padding = _conv_geometry(layer, x)
  g = _to_channels_last(layer, g)
  if layer.rank == 1:
    g = g[:, None]
  cin = x.shape[-1]
  groups = getattr(layer, "groups", 1) or 1
  kk = ks[0] * ks[1]
  if groups == 1 and _use_shifted(ks, st, cin):
    dk = _shifted_contract(x, g, ks, dl, padding, m)
  elif groups == 1:
    p = _patches(x, ks, st, dl, padding)
    dk = _contract(_per_mb(p, m, 1), _per_mb(g, m, 1))   # [M, kk*cin, cout]
  else:
    cout = g.shape[-1]
    p = _patches(x, ks, st, dl, padding)
    pa = tf.reshape(_per_mb(p, m, 1), [m, -1, kk, groups, cin // groups])
    ga = tf.reshape(_per_mb(g, m, 1), [m, -1, groups, cout // groups])
    dk = tf.einsum("mtkgc,mtgd->mkcgd", pa, ga)
  out = {"kernel": _scale(tf.reshape(dk, [m] + layer.kernel.shape.as_list()),
                          g, m)}
  if getattr(layer, "bias", None) is not None:
    out["bias"] = _bias_grad(g, m, g)
  return out


def depthwise_conv2d_grads(layer, x, g, m) -> Dict[str, tf.Tensor]:
  """DepthwiseConv2D: depthwise_kernel [kh, kw, C, mult], bias [C * mult]."""
  x, ks, st, dl, padding = _conv_geometry(layer, x)
  g = _to_channels_last(layer, g)
  cin = x.shape[-1]
  mult = layer.depth_multiplier
  kk = ks[0] * ks[1]
  pa = tf.reshape(_per_mb(_patches(x, ks, st, dl, padding), m, 1),
                  [m, -1, kk, cin])
  ga = tf.reshape(_per_mb(g, m, 1), [m, -1, cin, mult])
  dk = tf.einsum("mtkc,mtcd->mkcd", pa, ga)
  out = {"kernel": _scale(
      tf.reshape(dk, [m] + layer.depthwise_kernel.shape.as_list()), g, m)}
  if getattr(layer, "bias", None) is not None:
    out["bias"] = _bias_grad(g, m, g)
  return out


def _split_equation(equation: str):
  match = re.match(r"^([a-zA-Z.]+),([a-zA-Z]+)->([a-zA-Z.]+)$",
                   equation.replace(" ", ""))
  if not match:
    raise UnsupportedLayerError(f"EinsumDense equation {equation!r}")
  return match.groups()


def einsum_dense_grads(layer, x, g, m) -> Dict[str, tf.Tensor]:
  """EinsumDense: the equation with the batch letter kept in the output.

  Supported: equations whose input starts with a batch letter (or a leading
  ``...``) that the kernel does not use.
  """
  ins, kern, outs = _split_equation(layer.equation)
  if ins.startswith("..."):
    if not outs.startswith("..."):
      raise UnsupportedLayerError(f"EinsumDense equation {layer.equation!r}")
    free = [c for c in "ZYXWVU" if c not in ins + kern + outs][:2]
    n_in, n_out = len(ins) - 3, len(outs) - 3
    xs, gs = tf.shape(x), tf.shape(g)
    x = tf.reshape(x, tf.concat([xs[:1], [-1], xs[x.shape.rank - n_in:]], 0))
    g = tf.reshape(g, tf.concat([gs[:1], [-1], gs[g.shape.rank - n_out:]], 0))
    ins, outs = free[0] + free[1] + ins[3:], free[0] + free[1] + outs[3:]
  if "." in ins + outs:
    raise UnsupportedLayerError(f"EinsumDense equation {layer.equation!r}")
  bl = ins[0]
  if bl in kern or not outs.startswith(bl):
    raise UnsupportedLayerError(f"EinsumDense equation {layer.equation!r}")
  b = _batch(x)
  gk = tf.einsum(f"{ins},{outs}->{bl}{kern}", x, g)    # [B, *kernel]
  out = {"kernel": _mean_mb(gk, m)}
  bias = getattr(layer, "bias", None)
  if bias is not None:
    # Bias covers the output dims from the first bias axis on (1 elsewhere).
    letters = outs
    pos = [i for i, c in enumerate(letters) if c in layer.bias_axes]
    first = min(pos)
    keep = [i for i in range(first, len(letters))
            if letters[i] not in layer.bias_axes]
    gb = tf.reduce_sum(g, axis=keep, keepdims=True) if keep else g
    drop = list(range(1, first))
    gb = tf.reduce_sum(gb, axis=drop) if drop else gb
    gb = tf.reshape(gb, tf.concat([[b], bias.shape.as_list()], 0))
    out["bias"] = _mean_mb(gb, m)
  return out


def _mean_mb(t, m):
  """[B, *s] -> [M, *s], the sum over each microbatch's k examples."""
  shape = t.shape.as_list()[1:]
  if t.shape[0] is not None and isinstance(m, int) and t.shape[0] == m:
    return t
  return tf.reduce_sum(tf.reshape(t, [m, -1] + shape), axis=1)


def embedding_grads(layer, x, g, m) -> Dict[str, tf.Tensor]:
  """Embedding: ``g`` rows scatter-added at the ids, per microbatch.

  An example with any id outside ``[0, input_dim)`` contributes zero here:
  its rows are masked and its ids clamped before the scatter. Without this,
  ``id + offset`` of an out-of-range id lands in another microbatch's slot
  (XLA accepts such ids silently in the forward pass), and one example would
  add its rows to gradients that are clipped separately (docs/METHOD.md
  invariant 8). Same on the eager, ``tf.function`` and XLA paths.
  """
  vocab, dim = layer.embeddings.shape.as_list()
  ids = tf.cast(x, tf.int32)
  in_range = tf.logical_and(ids >= 0, ids < vocab)
  if ids.shape.rank > 1:
    in_range = tf.reduce_all(in_range, axis=list(range(1, ids.shape.rank)),
                             keepdims=True)
  ids = tf.where(in_range, ids, tf.zeros_like(ids))
  keep = tf.cast(tf.reshape(in_range, tf.concat(
      [tf.shape(in_range), tf.ones([g.shape.rank - in_range.shape.rank],
                                   tf.int32)], 0)), g.dtype)
  g = g * keep
  ids = _per_mb(ids[..., None], m, 1)[..., 0]                       # [M, T]
  offsets = tf.range(m, dtype=tf.int32)[:, None] * vocab
  seg = tf.reshape(ids + offsets, [-1])
  rows = tf.reshape(_per_mb(g, m, 1), [-1, dim])
  summed = tf.math.unsorted_segment_sum(rows, seg, m * vocab)
  return {"embeddings": _scale(tf.reshape(summed, [m, vocab, dim]), x, m)}


def _affine_norm_grads(layer, xhat, g, m, channel_axes):
  """gamma/beta grads of z = xhat * gamma + beta: sums over non-param axes."""
  rank = g.shape.rank
  red = [a for a in range(1, rank) if a not in channel_axes]
  out = {}
  if getattr(layer, "gamma", None) is not None and layer.scale:
    gg = tf.reduce_sum(g * xhat, axis=red) if red else g * xhat
    out["gamma"] = _mean_mb(tf.reshape(gg, [-1] + layer.gamma.shape.as_list()),
                            m)
  if getattr(layer, "beta", None) is not None and layer.center:
    gb = tf.reduce_sum(g, axis=red) if red else g
    out["beta"] = _mean_mb(tf.reshape(gb, [-1] + layer.beta.shape.as_list()), m)
  return out


def layer_norm_grads(layer, x, g, m) -> Dict[str, tf.Tensor]:
  """LayerNormalization: xhat over ``layer.axis`` (never the batch axis)."""
  rank = x.shape.rank
  axes = sorted(a % rank for a in (layer.axis if isinstance(
      layer.axis, (list, tuple)) else [layer.axis]))
  if 0 in axes:
    raise UnsupportedLayerError("LayerNormalization over the batch axis")
  xf = tf.cast(x, tf.float32)
  mean, var = tf.nn.moments(xf, axes=axes, keepdims=True)
  xhat = tf.cast((xf - mean) * tf.math.rsqrt(var + layer.epsilon), g.dtype)
  return _affine_norm_grads(layer, xhat, g, m, axes)


def expanded_param_grads(layer, x, g, m) -> Dict[str, tf.Tensor]:  # pylint: disable=unused-argument
  """Normalization parameters used as per-example copies (an expanded tap).

  ``g`` is the gradient at the ``[B, P]`` copies (``gamma`` then ``beta``,
  those the layer has, as ``TappedLayer`` concatenates them): row ``b`` is
  example ``b``'s gradient, so the rule only splits and sums microbatches.
  """
  out, start = {}, 0
  for role, on in (("gamma", layer.scale), ("beta", layer.center)):
    if on:
      size = getattr(layer, role).shape.num_elements()
      out[role] = _mean_mb(g[:, start:start + size], m)
      start += size
  if g.shape[-1] is not None and g.shape[-1] != start:
    raise UnsupportedLayerError(
        f"an expanded tap of {g.shape[-1]} values for {start} parameters")
  return out


def group_norm_grads(layer, x, g, m) -> Dict[str, tf.Tensor]:
  """GroupNormalization (no mask): xhat per example and group."""
  rank = x.shape.rank
  axis = layer.axis % rank
  if axis == 0:
    raise UnsupportedLayerError("GroupNormalization over the batch axis")
  x = tf.cast(x, tf.float32)   # a bf16 input (after a pinned layer): exact
  if _norms.fusable(layer, x) and g.dtype == tf.float32:
    gg, gb = _norms.group_norm_param_sums(x, g, groups=layer.groups,
                                          epsilon=layer.epsilon)
    out = {}
    if layer.scale:
      out["gamma"] = _mean_mb(gg, m)
    if layer.center:
      out["beta"] = _mean_mb(gb, m)
    return out
  shape = tf.shape(x)
  c = x.shape[axis]
  grouped = [shape[i] for i in range(rank)]
  grouped[axis] = c // layer.groups
  grouped.insert(axis, layer.groups)
  xg = tf.reshape(x, tf.stack(grouped))
  red = [a for a in range(1, rank + 1) if a != axis]
  mean, var = tf.nn.moments(xg, axes=red, keepdims=True)
  xhat = tf.reshape((xg - mean) * tf.math.rsqrt(var + layer.epsilon), shape)
  return _affine_norm_grads(layer, xhat, g, m, [axis])

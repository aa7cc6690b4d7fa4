"""A BERT-like encoder classifier whose every variable has a per-example rule.

The model is a Functional Keras model built only from layers the fast
per-example path (``dpquant_tf.perexample``) and ``quantize_model`` see at the
top level of the model:

* token and position embeddings: two ``Embedding`` layers (the position ids
  come from :class:`PositionIds`, a layer without weights), summed and
  normalised by a ``LayerNormalization``;
* ``num_layers`` post-LN blocks: query, key and value projections and the
  attention output projection are ``Dense`` layers on ``[B, T, D]`` inputs,
  the weight-free :class:`MultiHeadDotProductAttention` splits them into heads
  and computes ``softmax(Q K^T / sqrt(d) + mask) V``; residual +
  ``LayerNormalization``; a two-layer feed-forward (``Dense`` GELU, ``Dense``);
  residual + ``LayerNormalization``;
* pooled output: the mean of the non-padding positions
  (:class:`MaskedMeanPooling`), a ``Dense`` tanh pooler, a ``Dense`` classifier
  head returning logits.

Keras' ``MultiHeadAttention`` is not used: its projections are
``EinsumDense`` sublayers *inside* the attention layer, which
``quantize_model`` and ``tap_model`` (they clone the model's top-level layers)
cannot wrap, so its variables would take the jacobian path. Here every
projection is a top-level layer called once per step.

Padding: token id ``pad_id`` (0) is padding. The attention mask and the
pooling mask are computed per example from that example's ids
(:class:`PaddingMask`), so no example's output depends on another example of
the batch (no batch statistics anywhere: LayerNorm normalises each position).

Presets (``preset=``): ``"tiny"`` (2 layers, hidden 64, 4 heads, feed-forward
128: minutes on 2 CPU cores) and ``"mini"`` (BERT-mini's shape: 4 layers,
hidden 256, 4 heads, feed-forward 1024).
"""

import dataclasses
import math
from typing import Optional, Sequence

import tensorflow as tf

from dpquant_tf import _validation

__all__ = ["MaskedMeanPooling", "MultiHeadDotProductAttention", "PaddingMask",
           "PositionIds", "TRANSFORMER_PRESETS", "TransformerConfig",
           "transformer_classifier"]


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Sizes of the encoder (a preset, or your own)."""
  num_layers: int
  hidden: int
  num_heads: int
  ff_dim: int


TRANSFORMER_PRESETS = {
    "tiny": TransformerConfig(num_layers=2, hidden=64, num_heads=4, ff_dim=128),
    "mini": TransformerConfig(num_layers=4, hidden=256, num_heads=4,
                              ff_dim=1024),
}


@tf.keras.utils.register_keras_serializable(package="dpquant_tf")
class PaddingMask(tf.keras.layers.Layer):
  """``ids [B, T]`` -> float mask ``[B, T]``: 1 for tokens, 0 for ``pad_id``."""

  def __init__(self, pad_id: int = 0, **kwargs):
    super().__init__(**kwargs)
    self.pad_id = int(pad_id)

  def call(self, ids):
    return tf.cast(tf.not_equal(ids, tf.cast(self.pad_id, ids.dtype)),
                   tf.float32)

  def get_config(self):
    return {**super().get_config(), "pad_id": self.pad_id}


@tf.keras.utils.register_keras_serializable(package="dpquant_tf")
class PositionIds(tf.keras.layers.Layer):
  """``ids [B, T]`` -> positions ``[B, T]`` (0 .. T-1 in every row)."""

  def call(self, ids):
    t = tf.shape(ids)[1]
    return tf.broadcast_to(tf.range(t, dtype=tf.int32)[None, :], tf.shape(ids))


@tf.keras.utils.register_keras_serializable(package="dpquant_tf")
class MultiHeadDotProductAttention(tf.keras.layers.Layer):
  """Weight-free multi-head scaled dot-product attention with a key mask.

  Inputs ``[q, k, v, mask]``: projections ``[B, T, D]`` (``D`` divisible by
  ``num_heads``) and the per-example key mask ``[B, T]`` (1 = attend). Output
  ``[B, T, D]``: the heads' ``softmax(q k^T / sqrt(D / H) + bias) v``
  concatenated, ``bias = -1e9`` at masked keys. Every operation is per example.
  """

  def __init__(self, num_heads: int, **kwargs):
    super().__init__(**kwargs)
    self.num_heads = int(num_heads)

  def _heads(self, x):
    b, t = tf.shape(x)[0], tf.shape(x)[1]
    d = x.shape[-1]
    x = tf.reshape(x, [b, t, self.num_heads, d // self.num_heads])
    return tf.transpose(x, [0, 2, 1, 3])   # [B, H, T, dh]

  def call(self, inputs):
    q, k, v, mask = inputs
    d = q.shape[-1]
    qh, kh, vh = self._heads(q), self._heads(k), self._heads(v)
    scores = tf.matmul(qh, kh, transpose_b=True) / tf.cast(
        math.sqrt(d // self.num_heads), q.dtype)            # [B, H, T, T]
    bias = (1.0 - tf.cast(mask, scores.dtype))[:, None, None, :] * -1e9
    weights = tf.nn.softmax(scores + bias, axis=-1)
    out = tf.matmul(weights, vh)                            # [B, H, T, dh]
    out = tf.transpose(out, [0, 2, 1, 3])
    return tf.reshape(out, [tf.shape(q)[0], tf.shape(q)[1], d])

  def compute_output_shape(self, input_shape):
    return input_shape[0]

  def attention_macs(self) -> int:
    """Forward multiply-adds per example of ``Q K^T`` and ``A V``: ``2 T^2 D``.

    Used by the cost model (``dpquant_tf.costmodel``): these matrix products
    have no weights and are never quantized.
    """
    shape = self.get_input_shape_at(0)[0]
    t, d = shape[1] or 1, shape[2] or 1
    return 2 * int(t) * int(t) * int(d)

  def get_config(self):
    return {**super().get_config(), "num_heads": self.num_heads}


@tf.keras.utils.register_keras_serializable(package="dpquant_tf")
class MaskedMeanPooling(tf.keras.layers.Layer):
  """``[x [B, T, D], mask [B, T]]`` -> mean of ``x`` over unmasked positions."""

  def call(self, inputs):
    x, mask = inputs
    m = tf.cast(mask, x.dtype)[:, :, None]
    return tf.reduce_sum(x * m, axis=1) / tf.maximum(
        tf.reduce_sum(m, axis=1), tf.cast(1.0, x.dtype))

  def compute_output_shape(self, input_shape):
    return (input_shape[0][0], input_shape[0][2])


def _config(preset, num_layers, hidden, num_heads, ff_dim) -> TransformerConfig:
  if preset not in TRANSFORMER_PRESETS:
    _validation.fail("preset", preset, f"one of {sorted(TRANSFORMER_PRESETS)}")
  base = TRANSFORMER_PRESETS[preset]
  cfg = TransformerConfig(
      num_layers=base.num_layers if num_layers is None else num_layers,
      hidden=base.hidden if hidden is None else hidden,
      num_heads=base.num_heads if num_heads is None else num_heads,
      ff_dim=base.ff_dim if ff_dim is None else ff_dim)
  _validation.check_int("num_layers", cfg.num_layers, low=1)
  _validation.check_int("hidden", cfg.hidden, low=1)
  _validation.check_int("num_heads", cfg.num_heads, low=1)
  _validation.check_int("ff_dim", cfg.ff_dim, low=1)
  if cfg.hidden % cfg.num_heads:
    _validation.fail("hidden", cfg.hidden,
                     f"a multiple of num_heads={cfg.num_heads}")
  return cfg


def transformer_classifier(input_shape: Sequence[int] = (32,),
                           num_classes: int = 2, *, vocab_size: int,
                           preset: str = "tiny",
                           num_layers: Optional[int] = None,
                           hidden: Optional[int] = None,
                           num_heads: Optional[int] = None,
                           ff_dim: Optional[int] = None, pad_id: int = 0,
                           name: str = "transformer"):
  """A BERT-like encoder classifier on token ids (Functional, logits out).

  Args:
    input_shape: ``(max_length,)``: token ids per example (int32, ``pad_id``
      pads).
    num_classes: number of classes.
    vocab_size: size of the token vocabulary (ids in ``[0, vocab_size)``).
    preset: ``"tiny"`` or ``"mini"`` (see the module docstring).
    num_layers, hidden, num_heads, ff_dim: override the preset's sizes.
    pad_id: the padding id (masked in attention and pooling).
    name: model name.

  Returns:
    A ``tf.keras.Model`` ``token_ids [B, T] -> logits [B, num_classes]`` with
    ``6 * num_layers + 2`` quantizable Dense layers (per block: query, key,
    value, attention output, feed-forward in and out; plus pooler and
    logits).
  """
  shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else (
      input_shape,)
  if len(shape) != 1 or isinstance(shape[0], bool) or not isinstance(
      shape[0], int) or shape[0] < 1:
    _validation.fail("input_shape", input_shape, "(max_length,) with a positive int")
  max_length = shape[0]
  num_classes = _validation.check_int("num_classes", num_classes, low=2)
  vocab_size = _validation.check_int("vocab_size", vocab_size, low=2)
  pad_id = _validation.check_int("pad_id", pad_id, low=0, high=vocab_size - 1)
  cfg = _config(preset, num_layers, hidden, num_heads, ff_dim)
  layers = tf.keras.layers
  d = cfg.hidden
  ids = tf.keras.Input(shape=(max_length,), dtype=tf.int32, name="token_ids")
  mask = PaddingMask(pad_id, name="padding_mask")(ids)
  tok = layers.Embedding(vocab_size, d, name="token_embedding")(ids)
  pos = layers.Embedding(max_length, d, name="position_embedding")(
      PositionIds(name="position_ids")(ids))
  x = layers.Add(name="embed_add")([tok, pos])
  x = layers.LayerNormalization(epsilon=1e-6, name="embed_ln")(x)
  for i in range(1, cfg.num_layers + 1):
    p = f"b{i}"
    q = layers.Dense(d, name=f"{p}_query")(x)
    # No key bias: q.(k + c) shifts every score of a query by the same
    # amount, which the softmax cancels (its gradient is exactly zero).
    k = layers.Dense(d, use_bias=False, name=f"{p}_key")(x)
    v = layers.Dense(d, name=f"{p}_value")(x)
    a = MultiHeadDotProductAttention(cfg.num_heads, name=f"{p}_attention")(
        [q, k, v, mask])
    a = layers.Dense(d, name=f"{p}_attn_out")(a)
    x = layers.LayerNormalization(epsilon=1e-6, name=f"{p}_attn_ln")(
        layers.Add(name=f"{p}_attn_add")([x, a]))
    f = layers.Dense(cfg.ff_dim, activation="gelu", name=f"{p}_ffn_in")(x)
    f = layers.Dense(d, name=f"{p}_ffn_out")(f)
    x = layers.LayerNormalization(epsilon=1e-6, name=f"{p}_ffn_ln")(
        layers.Add(name=f"{p}_ffn_add")([x, f]))
  pooled = MaskedMeanPooling(name="pool")([x, mask])
  pooled = layers.Dense(d, activation="tanh", name="pooler")(pooled)
  logits = layers.Dense(num_classes, name="logits")(pooled)
  return tf.keras.Model(ids, logits, name=name)

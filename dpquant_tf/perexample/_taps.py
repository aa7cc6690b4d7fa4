"""TappedLayer and tap_model: the fast per-example path for plain Keras models.

``QuantizedLayer`` (dpquant_tf.quantization) taps the layers it wraps. For
layers it does not wrap (unquantized models, Embedding, LayerNormalization,
GroupNormalization), :func:`tap_model` clones a Sequential or Functional model
and wraps every layer that has a per-example rule in a :class:`TappedLayer`.
The wrapper computes what the layer computes, with the same variables and
ops, except GroupNormalization (channels last, no mask), whose forward and
backward pass it runs as fused programs of the same formulas
(``perexample._norms``: about 1.5-1.8x faster there); it only records the
tensors the rules need and applies the activation itself so that the tap
output is the pre-activation ``z``.
"""


import tensorflow as tf

from dpquant_tf import _validation
from dpquant_tf.perexample import _norms
from dpquant_tf.perexample import _registry

__all__ = ["TappedLayer", "safe_ids", "tap_model"]


@tf.keras.utils.register_keras_serializable(package="dpquant_tf")
class TappedLayer(tf.keras.layers.Wrapper):
  """Runs a Keras layer and records its tap input and pre-activation output.

  After each call, ``tap_input`` is the layer's input and ``tap_output`` the
  output before the activation (for layers with an ``activation``) or the
  layer's output (Embedding, normalization layers). The wrapped layer must be
  called once per forward pass (a second call in the same trace makes the
  fast path fall back to the jacobian for it, with a log line).

  Args:
    layer: a Dense, Conv1D, Conv2D, DepthwiseConv2D, EinsumDense, Embedding,
      LayerNormalization or GroupNormalization layer.
    **kwargs: passed to ``tf.keras.layers.Wrapper``.
  """

  def __init__(self, layer, **kwargs):
    if _registry.kind_of(layer) is None:
      _validation.fail("layer", layer,
                       "a layer with a per-example gradient rule (Dense, Conv1D, "
                       "Conv2D, DepthwiseConv2D, EinsumDense, Embedding, "
                       "LayerNormalization, GroupNormalization)", TypeError)
    kwargs.setdefault("name", f"tap_{layer.name}")
    super().__init__(layer, **kwargs)
    activation = getattr(layer, "activation", None)
    self.activation = tf.keras.activations.get(activation) if activation else None
    if activation is not None:
      layer.activation = tf.keras.activations.linear
    self.tap_input = None
    self.tap_output = None
    self.supports_masking = bool(getattr(layer, "supports_masking", False))
    _registry.register_tapped_layer(self)

  def build(self, input_shape):
    if not self.layer.built:
      self.layer.build(input_shape)
    super().build(input_shape)

  def call(self, inputs, *args, **kwargs):
    valid = None
    if isinstance(self.layer, tf.keras.layers.Embedding):
      inputs, valid = safe_ids(inputs, self.layer.input_dim)
    if (not args and set(kwargs) <= {"mask", "training"}
        and _norms.fusable(self.layer, inputs, kwargs.get("mask"))):
      return self._fused_group_norm(inputs)
    z = self.layer(inputs, *args, **kwargs)
    if getattr(self.layer, "padding", None) == "causal":
      # The op sees the left-padded input; the rule expects that tensor.
      inputs = tf.pad(inputs, self.layer._compute_causal_padding(inputs))  # pylint: disable=protected-access
    _registry.record_tap(self, inputs, z, valid)
    return self.activation(z) if self.activation is not None else z

  def _fused_group_norm(self, inputs):
    """The wrapped GroupNormalization, fused (``perexample._norms``).

    Its parameters enter as per-example copies ``[B, P]`` (``gamma`` then
    ``beta``, those the layer has): the same values in every row, so the
    output is the layer's. The gradient at that tensor is each example's
    gradient of ``gamma`` and ``beta``, which the fused backward program
    computes on its way (``_norms.group_norm``), so the tap records it as an
    expanded-parameter tap (``_registry.Tap.expanded``) and the per-example
    rule only reads it (``_rules.expanded_param_grads``): no pass over the
    activations beyond the backward pass itself.
    """
    layer = self.layer
    if not layer.built:
      layer.build(inputs.shape)
    source = bf16_source(inputs)
    if source is not None:
      inputs = source
    if not expand_norm_params(layer):
      z = _norms.group_norm(inputs, layer.gamma if layer.scale else None,
                            layer.beta if layer.center else None,
                            groups=layer.groups, epsilon=layer.epsilon)
      _registry.record_tap(self, inputs, z)
      return z
    params = [p for p, on in ((layer.gamma, layer.scale),
                              (layer.beta, layer.center)) if on]
    c = inputs.shape[-1]
    batch = inputs.shape[0]
    rows = batch if batch is not None else tf.shape(inputs)[0]
    flat = tf.concat([tf.convert_to_tensor(p) for p in params], 0)
    expanded = tf.broadcast_to(flat[None], tf.stack([rows, flat.shape[0]]))
    if not tf.executing_eagerly():
      expanded.set_shape([batch, flat.shape[0]])
    split = iter([expanded[:, :c], expanded[:, c:]])
    gamma = next(split) if layer.scale else None
    beta = next(split) if layer.center else None
    z = _norms.group_norm(inputs, gamma, beta, groups=layer.groups,
                          epsilon=layer.epsilon)
    _registry.record_tap(self, inputs, expanded, expanded=True)
    return z

  def compute_output_shape(self, input_shape):
    return self.layer.compute_output_shape(input_shape)

  def compute_mask(self, inputs, mask=None):
    # The wrapped layer's mask (Embedding(mask_zero=True)) passes through.
    return self.layer.compute_mask(inputs, mask)

  def get_config(self):
    config = super().get_config()
    config["activation"] = tf.keras.activations.serialize(self.activation) if (
        self.activation is not None) else None
    return config

  @classmethod
  def from_config(cls, config, custom_objects=None):
    config = dict(config)
    activation = config.pop("activation", None)
    layer = super().from_config(config, custom_objects=custom_objects)
    if activation is not None:
      layer.activation = tf.keras.activations.get(activation)
    return layer


def bf16_source(t):
  """The bfloat16 tensor ``t`` is a cast of, else None (graph mode only).

  A pinned bf16 layer (``QuantizedLayer(switchable=False)``) casts its
  bfloat16 output to float32 for the next layer. A fused GroupNorm reading
  that output reads the bfloat16 tensor instead, inside its XLA program:
  the same values (every bfloat16 is a float32), without the separate cast
  pass, and its backward program writes the input gradient in bfloat16,
  which the float32 cast's gradient would have rounded it to (if the float32
  output has other consumers, their gradient and this one are then summed
  in bfloat16). ``tools/benchmark_switch.py --switch=bf16_group_norm_input``
  turns this off.
  """
  if tf.executing_eagerly() or not isinstance(t, tf.Tensor):
    return None
  op = t.op
  if op.type != "Cast" or len(op.inputs) != 1:
    return None
  source = op.inputs[0]
  return source if source.dtype == tf.bfloat16 else None


def expand_norm_params(layer) -> bool:
  """Whether a fused GroupNorm takes its parameters as per-example copies
  (``TappedLayer._fused_group_norm``): when it has any. Without them
  (``tools/benchmark_switch.py --switch=expanded_norm_params`` turns this
  off) the tap is the output and the rule recomputes the normalization from
  the input (``_norms.group_norm_param_sums``): one more fused program per
  layer."""
  return bool(layer.scale or layer.center)


def safe_ids(ids, input_dim):
  """``(ids with out-of-range entries replaced by 0, [B] validity)``.

  An Embedding fed an id outside ``[0, input_dim)`` fails on CPU without XLA
  (a data-dependent crash of the step) and reads or scatters out of bounds
  under XLA. The tapped Embedding looks up 0 instead and records the example
  as invalid: every clip of the step gives it scale 0, so it contributes
  exactly zero on every path (fast, ghost, jacobian; with or without
  ``jit_compile``). Ids are cast to int32 as ``Embedding`` does (int64 ids
  are compared before any narrowing).

  Args:
    ids: the Embedding's input, batch first.
    input_dim: the vocabulary size.

  Returns:
    The ids to look up (same dtype as Embedding uses) and a ``[B]`` bool.
  """
  ids = tf.convert_to_tensor(ids)
  if ids.dtype not in (tf.int32, tf.int64):
    ok = tf.math.is_finite(tf.cast(ids, tf.float64)) if ids.dtype.is_floating \
        else None
    wide = tf.cast(ids, tf.float64) if ids.dtype.is_floating else tf.cast(
        ids, tf.int64)
    in_range = tf.logical_and(wide >= 0, wide < input_dim)
    if ok is not None:
      in_range = tf.logical_and(in_range, ok)
    ids = tf.cast(tf.where(in_range, ids, tf.zeros_like(ids)), tf.int32)
  else:
    in_range = tf.logical_and(ids >= 0, ids < tf.cast(input_dim, ids.dtype))
    ids = tf.where(in_range, ids, tf.zeros_like(ids))
  if ids.shape.rank and ids.shape.rank > 1:
    valid = tf.reduce_all(in_range, axis=list(range(1, ids.shape.rank)))
  else:
    valid = in_range
  return ids, valid


def tap_model(model, *, layers=None):
  """Clones ``model`` with every supported layer wrapped in a TappedLayer.

  The clone computes exactly what ``model`` computes; its weights are copied.
  Layers that already tap (a ``QuantizedLayer`` or ``TappedLayer``) are kept.

  Args:
    model: a Sequential or Functional ``tf.keras.Model``.
    layers: optional collection of layer names to wrap (default: all
      supported layers).

  Returns:
    The tapped clone.
  """
  if not isinstance(model, tf.keras.Model):
    _validation.fail("model", model, "a tf.keras.Model", TypeError)
  if not (isinstance(model, tf.keras.Sequential)
          or getattr(model, "_is_graph_network", False)):
    _validation.fail("model", model.name,
                     "a Sequential or Functional model (subclassed models cannot "
                     "be cloned; wrap their layers in TappedLayer directly)")
  wanted = None if layers is None else set(layers)

  def clone(layer):
    new = layer.__class__.from_config(layer.get_config())
    if hasattr(layer, "tap_output") or _registry.kind_of(layer) is None:
      return new
    if wanted is not None and layer.name not in wanted:
      return new
    return TappedLayer(new, name="tap_" + layer.name)

  tapped = tf.keras.models.clone_model(model, clone_function=clone)
  tapped.set_weights(model.get_weights())
  return tapped

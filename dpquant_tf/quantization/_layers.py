"""QuantizedLayer: a Keras wrapper that runs one layer in low precision.

Forward: ``z = op(q(x), q(W)) + b`` with per-example scales for the input ``x``
and per-tensor or per-channel scales for the kernel ``W`` (straight-through
gradients for both roundings). Backward: the gradient arriving at ``z`` is
quantized per example before it flows into ``op`` (so both the weight gradient
and the gradient passed to earlier layers use it). Then the layer's activation.

Whether and how a layer quantizes lives in non-trainable variables
(``enabled``, ``fwd_format``, ``fwd_bits``, ``bwd_format``, ``bwd_bits``), so a
traced or XLA-compiled train step serves every setting: schedules only assign.
Bits 0 switches one direction off. Quantization applies whenever enabled in
training (and when ``training`` is not given); a call with ``training=False``
(``predict``, ``evaluate``, a serving export) runs the plain layer in float32,
unless ``quantize_in_inference`` is set (the loss-sensitivity estimator sets
it while it traces; a Python attribute read at trace time).

Taps (contract with dpquant_tf.perexample): every call sets ``tap_input`` (the
tensor fed to ``op``: ``q(x)``, or ``x`` when the forward direction is off; for
``padding='causal'`` Conv1D, after the causal padding, with ``op`` a VALID
convolution) and ``tap_output`` (``z`` before the backward-quantization
identity and before the activation). ``layer`` is the wrapped Keras layer whose
``kernel``/``depthwise_kernel`` and ``bias`` are the variables used.

Execution precision (``precision`` variable, a `Precision` id): the op
itself runs in float32, in bfloat16 (input and kernel cast: the input
rounded as ``bf16_rounding`` says, to nearest by default or stochastically
with 16 counter-based random bits per element, the kernel to nearest; the
backward pass through the
casts runs in bfloat16 too; the output is cast back to float32 before the
bias, except in a pinned layer whose activation runs in bf16:
``bf16_epilogue``) or simulated FP8 E4M3 (an extra fake quantization to the FP8 grid, the
op in float32). Every setting is in the graph as ``tf.cond`` branches, so
switching does not retrace, also under ``jit_compile``; the outer branch is
the ``enabled`` switch, so a disabled layer runs its plain float32 op and no
quantization op. With ``fixed_structure=True`` only the plain op and the
initial config's structure are built (smaller graphs; XLA compiles only what
can run), and ``assign_config`` refuses an enabled config of another one. The taps are float32 (the bfloat16 input cast back):
per-example norms, clipping and noise stay float32.

Why not tfmot's ``quantize_apply``: its quantizers act on forward tensors only
and cannot quantize the gradient at a layer's output, which DPQuant needs.
"""


import numpy as np
import tensorflow as tf

from dpquant_tf import _layer_kinds
from dpquant_tf import _validation
from dpquant_tf.privacy import _random
from dpquant_tf.perexample import _registry as _perexample_registry
from dpquant_tf.quantization import _formats
from dpquant_tf.quantization import _precision
from dpquant_tf.quantization import _quantizers
from dpquant_tf.quantization._formats import QuantFormat, Rounding, ScaleMode
from dpquant_tf.quantization._precision import Precision

_layers = tf.keras.layers


LayerKind = _layer_kinds.LayerKind
kernel_of = _layer_kinds.kernel_of
kernel_output_axes = _layer_kinds.kernel_output_axes

SUPPORTED = "Dense, Conv1D, Conv2D, DepthwiseConv2D or EinsumDense"


def quantizable_kind(layer):
  """The `LayerKind` of a layer QuantizedLayer can wrap, else None."""
  kind = _layer_kinds.layer_kind(layer)
  return kind if kind in _layer_kinds.QUANTIZABLE else None


def _structure_of(precision, fwd_bits, bwd_bits):
  """(precision, forward quantization on, backward quantization on)."""
  return (precision, fwd_bits > 0, bwd_bits > 0)


def _trains(training):
  """True or False when ``training`` says so at trace time (None counts as
  training, as for quantization); None for a tensor known only at run time."""
  if training is None:
    return True
  if isinstance(training, (bool, np.bool_, int)):
    return bool(training)
  value = tf.get_static_value(training)
  return None if value is None else bool(value)


# The one structure a layer can be pinned to (``switchable=False``).
_PINNABLE = (Precision.BFLOAT16, False, False)


def _describe(structure):
  precision, fwd, bwd = structure
  return (f"precision={precision.name.lower()}, forward quantization "
          f"{'on' if fwd else 'off'}, backward quantization "
          f"{'on' if bwd else 'off'}")


@tf.custom_gradient
def _straight_through(x, k, qx, qk):
  """Returns (qx, qk); gradients flow to x and k unchanged (straight-through)."""
  def grad(dqx, dqk):
    return dqx, dqk, None, None
  return (tf.identity(qx), tf.identity(qk)), grad


# Activations a pinned layer applies in bfloat16, after a bf16 bias add
# (``bf16_epilogue``): elementwise functions that keep their input's dtype.
_BF16_ACTIVATIONS = (
    tf.keras.activations.relu, tf.keras.activations.gelu,
    tf.keras.activations.tanh, tf.keras.activations.sigmoid,
    tf.keras.activations.swish, tf.keras.activations.elu)


def bf16_epilogue(layer) -> bool:
  """Whether a pinned layer adds its bias and applies its activation in bf16.

  True for an activation in ``_BF16_ACTIVATIONS``: then the bias (cast to
  nearest), the activation and, in the backward pass, the activation's
  gradient run on the bf16 output of the op, and one cast to float32
  follows, as under Keras' mixed-precision policy. The float32 epilogue
  after a bf16 convolution cost more than the float32 layer's whole fused
  convolution, bias and ReLU (tutorial CNN, first convolution at batch
  256: 0.97 vs 0.77 ms; bf16 epilogue 0.60 ms; docs/PERFORMANCE.md). The
  forward pass rounds once more (the sum after the bias, to bf16); the
  DP step's bound is unaffected: it is computed from the tensors summed.
  """
  activation = getattr(layer, "activation", None)
  return activation is not None and any(
      activation is f for f in _BF16_ACTIVATIONS)


@tf.keras.utils.register_keras_serializable(package="dpquant_tf")
class QuantizedLayer(_layers.Wrapper):
  """Runs a Dense/Conv/DepthwiseConv2D/EinsumDense layer in low precision.

  Args:
    layer: the Keras layer to wrap (Dense, Conv1D, Conv2D, DepthwiseConv2D,
      EinsumDense).
    enabled: initial value of the on/off variable.
    fwd_format, fwd_bits: format of weights and input activations (bits 0:
      forward off).
    bwd_format, bwd_bits: format of the gradient at the layer output (bits 0:
      backward off).
    precision: execution precision of the op while enabled (`Precision` or
      ``"float32"``, ``"bf16"``, ``"fp8_e4m3"``; default float32).
    rounding: rounding of the quantization formats: `Rounding.STOCHASTIC`
      (default, unbiased) or `Rounding.NEAREST` (deterministic; for
      inference and tests).
    bf16_rounding: rounding of the input's cast to bfloat16 when the layer
      runs in bfloat16: `Rounding.NEAREST` (default; what mixed-precision
      training does, relative error at most 2^-9, and the method needs no
      unbiased bf16 cast: its unbiased rounding is that of the low-bit
      formats) or `Rounding.STOCHASTIC` (unbiased, about 10% slower steps
      on the benchmark's small ResNet and CNN).
    weight_scale: `ScaleMode.PER_CHANNEL` (default) or `ScaleMode.PER_TENSOR`.
    seed: None draws the rounding noise from
      `privacy._random.make_generator()` (OS entropy); an int seeds it.
    fixed_structure: False (default): every setting is in the graph
      (``tf.cond`` branches), so any config can be assigned without a
      retrace. True: only the plain op (disabled) and the *initial* config's
      structure (its precision, forward quantization on/off, backward
      quantization on/off) are built; formats and bit widths inside it stay
      variables. An enabled config with another structure is then refused by
      `assign_config`. Smaller graphs: a float32 layer without quantization
      has no branch at all, a pure bf16 layer one ``tf.cond``, and XLA
      compiles only what can run.
    switchable: True (default): the ``enabled`` variable switches the layer
      on and off. False (a *pinned* layer; only for a pure bf16 layer:
      ``fixed_structure=True``, ``enabled=True``, precision bf16, forward
      and backward bits 0): the layer runs in bf16 whenever it trains, with
      no switch in the graph, and its taps are the bf16 tensors themselves
      (the input cast once, and the op's output for a layer without bias),
      which saves three of the seven casts a switchable bf16 layer makes
      per step (``docs/PERFORMANCE.md``). For plans that keep every such
      layer on (a bf16 plan at ratio 1.0); `assign_config` refuses to switch
      it off. Inference (``training=False``) still runs the float32 op.
    **kwargs: passed to `tf.keras.layers.Wrapper` (e.g. `name`).
  """

  def __init__(self, layer, *, enabled=True,
               fwd_format=QuantFormat.INT4_SAWB, fwd_bits=4,
               bwd_format=QuantFormat.LUQ_FP4, bwd_bits=4,
               precision=Precision.FLOAT32,
               rounding=Rounding.STOCHASTIC,
               bf16_rounding=Rounding.NEAREST,
               weight_scale=ScaleMode.PER_CHANNEL, seed=None,
               fixed_structure=False, switchable=True, **kwargs):
    kind = quantizable_kind(layer)
    if kind is None:
      _validation.fail("layer", layer, f"a {SUPPORTED} layer", TypeError)
    if kind == LayerKind.CONV1D and layer.data_format == "channels_first" and (
        layer.padding == "causal"):
      _validation.fail("layer.padding", layer.padding,
                       "not 'causal' with channels_first")
    self._initial = {
        "enabled": bool(_validation.check_type("enabled", enabled, bool)),
    }
    fwd_format, fwd_bits = _formats.check_format_bits("fwd", fwd_format, fwd_bits)
    bwd_format, bwd_bits = _formats.check_format_bits("bwd", bwd_format, bwd_bits)
    self._initial.update(fwd_format=fwd_format, fwd_bits=fwd_bits,
                         bwd_format=bwd_format, bwd_bits=bwd_bits,
                         precision=_precision.check_precision("precision",
                                                              precision))
    self.rounding = _validation.check_enum("rounding", rounding, Rounding)
    self.bf16_rounding = _validation.check_enum("bf16_rounding", bf16_rounding,
                                                Rounding)
    self.weight_scale = _validation.check_enum("weight_scale", weight_scale,
                                               ScaleMode)
    self.seed = None if seed is None else _validation.check_int("seed", seed)
    self.fixed_structure = bool(_validation.check_type(
        "fixed_structure", fixed_structure, bool))
    self._structure = _structure_of(self._initial["precision"],
                                    self._initial["fwd_bits"],
                                    self._initial["bwd_bits"])
    self.switchable = bool(_validation.check_type("switchable", switchable,
                                                  bool))
    if not self.switchable and not (
        self.fixed_structure and self._initial["enabled"]
        and self._structure == _PINNABLE):
      _validation.fail(
          "switchable", switchable,
          "True unless the layer is a pure bf16 layer built for it "
          "(fixed_structure=True, enabled=True, precision='bf16', fwd_bits=0,"
          f" bwd_bits=0); got fixed_structure={self.fixed_structure}, "
          f"enabled={self._initial['enabled']}, {_describe(self._structure)}")
    self.quantize_in_inference = False
    kwargs.setdefault("name", f"quant_{layer.name}")
    super().__init__(layer, **kwargs)
    self.kind = kind
    self.tap_input = None
    self.tap_output = None
    _perexample_registry.register_tapped_layer(self)

  def build(self, input_shape):
    if not self.layer.built:
      self.layer.build(input_shape)
    init = self._initial

    def var(name, value, dtype):
      return self.add_weight(
          name=name, shape=(), dtype=dtype, trainable=False,
          initializer=tf.keras.initializers.Constant(value))

    self.enabled = var("enabled", init["enabled"], tf.bool)
    self.fwd_format = var("fwd_format", init["fwd_format"].id, tf.int32)
    self.fwd_bits = var("fwd_bits", init["fwd_bits"], tf.int32)
    self.bwd_format = var("bwd_format", init["bwd_format"].id, tf.int32)
    self.bwd_bits = var("bwd_bits", init["bwd_bits"], tf.int32)
    self.precision = var("precision", init["precision"].id, tf.int32)
    with tf.init_scope():
      self.generator = _random.make_generator(seed=self.seed)
    super().build(input_shape)

  # -- quantization helpers -------------------------------------------------

  def _quantize(self, x, fmt, bits, axes):
    return _quantizers.quantize(x, fmt, bits, rounding=self.rounding,
                                generator=self.generator, scale_axes=axes)

  def _quantize_pair(self, x, kernel, fmt, bits, weight_axes):
    """Input (per-example scales) and kernel rounded to ``fmt`` with ``bits``."""
    return (self._quantize(x, fmt, bits, _quantizers.example_axes(x)),
            self._quantize(kernel, fmt, bits, weight_axes))

  def _backward_quantizer(self, z, on):
    """Identity whose gradient is quantized per example."""

    @tf.custom_gradient
    def identity(z):
      def grad(dy):
        return tf.cond(
            on, lambda: self._quantize(dy, self.bwd_format, self.bwd_bits,
                                       _quantizers.example_axes(dy)),
            lambda: dy)
      return tf.identity(z), grad

    return identity(z)

  def _weight_axes(self, kernel):
    if self.weight_scale == ScaleMode.PER_TENSOR:
      return None
    keep = kernel_output_axes(self.layer)
    return [i for i in range(kernel.shape.rank) if i not in keep]

  # -- the wrapped op (mirrors the Keras layers' call) -----------------------

  def _linear(self, x, kernel):
    """The wrapped layer's op without the bias, in the dtype of its inputs."""
    layer, kind = self.layer, self.kind
    if kind == LayerKind.DENSE:
      rank = x.shape.rank
      if rank == 2 or rank is None:
        return tf.matmul(a=x, b=kernel)
      # tf.tensordot's ops (reshape, matmul, reshape) without its transpose:
      # with a dynamic batch, tensordot computes the (identity) permutation
      # at run time, and inside this layer's conds XLA cannot compile the
      # gradient of that transpose ("0 is duplicated in the input").
      units = kernel.shape[-1]
      z = tf.matmul(tf.reshape(x, [-1, kernel.shape[0]]), kernel)
      z = tf.reshape(z, tf.concat([tf.shape(x)[:-1], [units]], 0))
      if not tf.executing_eagerly():
        z.set_shape(x.shape.as_list()[:-1] + [units])
      return z
    if kind == LayerKind.EINSUM_DENSE:
      return tf.einsum(layer.equation, x, kernel)
    if kind == LayerKind.DEPTHWISE_CONV2D:
      return tf.keras.backend.depthwise_conv2d(
          x, kernel, strides=layer.strides, padding=layer.padding,
          dilation_rate=layer.dilation_rate, data_format=layer.data_format)
    if layer.groups > 1:
      return layer._jit_compiled_convolution_op(x, tf.convert_to_tensor(kernel))  # pylint: disable=protected-access
    if kind == LayerKind.CONV1D and x.shape.rank == 4:
      # Conv1D on the input `call` expanded to 2-D (see `_conv1d_axis`).
      return tf.nn.convolution(
          x, kernel, strides=[1] + list(layer.strides),
          padding="VALID" if layer.padding == "causal" else layer.padding.upper(),
          dilations=[1] + list(layer.dilation_rate),
          data_format="NHWC" if layer.data_format == "channels_last" else "NCHW")
    return layer.convolution_op(x, kernel)

  def _conv1d_axis(self):
    """The axis a Conv1D's input gets (size 1) so that the op in the layer's
    conds is a 2-D convolution, else None.

    ``tf.nn.convolution`` runs a 1-D convolution as expand, conv2d, squeeze;
    with the squeeze inside the conds, the jacobian (``pfor``) of the step
    under XLA with a dynamic batch failed ("Input to reshape is a tensor with
    N values, but the requested shape has 0"). The expand and the squeeze are
    done outside the conds instead: the same arithmetic.
    """
    if self.kind != LayerKind.CONV1D or self.layer.groups > 1:
      return None
    return 1 if self.layer.data_format == "channels_last" else 2

  def _add_bias(self, z, cast=None):
    """``z`` plus the layer's bias (cast to ``cast`` first when given)."""
    layer, kind = self.layer, self.kind
    bias = getattr(layer, "bias", None)
    if bias is None or (kind != LayerKind.EINSUM_DENSE and not layer.use_bias):
      return z
    bias = tf.convert_to_tensor(bias)
    if cast is not None:
      bias = tf.cast(bias, cast)
    if kind == LayerKind.DENSE:
      return tf.nn.bias_add(z, bias)
    if kind == LayerKind.EINSUM_DENSE:
      return z + bias
    if kind == LayerKind.DEPTHWISE_CONV2D:
      return tf.keras.backend.bias_add(z, bias, data_format=layer.data_format)
    if layer.rank == 1 and layer._channels_first:  # pylint: disable=protected-access
      return z + tf.reshape(bias, (1, layer.filters, 1))
    return tf.nn.bias_add(z, bias, data_format=layer._tf_data_format)  # pylint: disable=protected-access

  def _with_output_shape(self, inputs, z):
    """``z`` with a Conv layer's static output shape set (in a graph)."""
    if not tf.executing_eagerly() and self.kind in (LayerKind.CONV1D,
                                                     LayerKind.CONV2D):
      z.set_shape(self.layer.compute_output_shape(inputs.shape))
    return z

  def _forward_quant(self, x, kernel, fwd_on, fp8_on, weight_axes):
    """Fake quantization of input and kernel (the forward format, then the
    simulated FP8 grid when that is the precision), straight-through.

    ``fwd_on``/``fp8_on``: bool tensors (a ``tf.cond`` each) or Python bools
    (a fixed structure: the step is built or left out)."""

    def step(on, a, b, fmt, bits):
      if on is False:
        return a, b
      quant = lambda: self._quantize_pair(a, b, fmt, bits, weight_axes)
      return quant() if on is True else tf.cond(on, quant, lambda: (a, b))

    qx, qk = step(fwd_on, x, kernel, self.fwd_format, self.fwd_bits)
    qx, qk = step(fp8_on, qx, qk,
                  tf.constant(QuantFormat.FP8_E4M3.id, tf.int32),
                  tf.constant(8, tf.int32))
    return _straight_through(x, kernel, tf.stop_gradient(qx),
                             tf.stop_gradient(qk))

  def _bfloat16_op(self, x, kernel):
    """The op in bfloat16 (oneDNN / AMX accumulate in float32), float32 out.

    Only the input follows ``bf16_rounding`` (stochastic or nearest): the
    kernel is the float32 master weight, cast to nearest.

    Returns:
      (the bfloat16 input as float32, the op's output as float32).
    """
    xb = _precision.to_bfloat16(x, rounding=self.bf16_rounding,
                                generator=self.generator)
    kb = _precision.to_bfloat16(kernel)
    # The tap needs no gradient: without stop_gradient the backward pass
    # adds its zero gradient to the op's (a bf16 AddN per layer, 4% of the
    # encoder's step).
    return (tf.cast(tf.stop_gradient(xb), tf.float32),
            tf.cast(self._linear(xb, kb), tf.float32))

  def _enabled_op(self, x, kernel, fwd_on, fp8_on, bf16_on, weight_axes):
    """The op of an enabled layer: fake quantization, then float32 or bf16."""
    qx, qk = tf.cond(tf.logical_or(fwd_on, fp8_on),
                     lambda: self._forward_quant(x, kernel, fwd_on, fp8_on,
                                                 weight_axes),
                     lambda: (x, kernel))
    return tf.cond(bf16_on, lambda: self._bfloat16_op(qx, qk),
                   lambda: (qx, self._linear(qx, qk)))

  def _fixed_enabled_op(self, x, kernel, weight_axes):
    """The enabled op of a fixed structure: only the steps it uses."""
    precision, fwd, _ = self._structure
    fp8 = precision == Precision.FP8_E4M3
    qx, qk = x, kernel
    if fwd or fp8:
      qx, qk = self._forward_quant(x, kernel, fwd, fp8, weight_axes)
    if precision == Precision.BFLOAT16:
      return self._bfloat16_op(qx, qk)
    return qx, self._linear(qx, qk)

  def _pinned_call(self, inputs, x, kernel, axis):
    """A pinned layer in training: the bf16 op with no switch, bf16 taps.

    The tap input is the bf16 input the op reads. The tap output is the
    op's bf16 output when the layer has no bias; with a bias and an
    activation that runs in bf16 (``bf16_epilogue``), the bf16 sum after
    the bias (cast to nearest), whose activation is cast to float32 once;
    with a bias and no such activation, the float32 output after the bias.
    """
    xb = _precision.to_bfloat16(x, rounding=self.bf16_rounding,
                                generator=self.generator)
    zb = self._linear(xb, _precision.to_bfloat16(kernel))
    if axis is not None:
      xb, zb = tf.squeeze(xb, axis), tf.squeeze(zb, axis)
    has_bias = getattr(self.layer, "bias", None) is not None
    if has_bias and bf16_epilogue(self.layer):
      zb = self._with_output_shape(inputs,
                                   self._add_bias(zb, cast=tf.bfloat16))
      _perexample_registry.record_tap(self, xb, zb)
      return tf.cast(self.layer.activation(zb), tf.float32)
    z = self._with_output_shape(inputs,
                                self._add_bias(tf.cast(zb, tf.float32)))
    _perexample_registry.record_tap(self, xb, z if has_bias else zb)
    return z if self.layer.activation is None else self.layer.activation(z)

  @property
  def bf16_taps(self) -> bool:
    """True when the layer's structure is fixed to bf16 execution.

    Then, whenever the layer is enabled, its tap input is bfloat16-exact
    (the bf16 input cast back to float32): the per-example path may run its
    contractions on bfloat16 operands (``dpquant_tf.perexample``).
    """
    return (self.fixed_structure
            and self._structure[0] == Precision.BFLOAT16)

  def call(self, inputs, training=None):
    layer = self.layer
    x = inputs
    if x.dtype.base_dtype != layer.compute_dtype:
      x = tf.cast(x, layer.compute_dtype)
    if self.kind == LayerKind.CONV1D and layer._is_causal:  # pylint: disable=protected-access
      x = tf.pad(x, layer._compute_causal_padding(x))  # pylint: disable=protected-access
    kernel = tf.convert_to_tensor(kernel_of(layer))
    weight_axes = self._weight_axes(kernel)
    axis = self._conv1d_axis()
    if axis is not None:
      # Per-example and per-channel scales are unchanged: the new axes have
      # size 1 (and the kernel's is reduced with the others).
      x, kernel = tf.expand_dims(x, axis), tf.expand_dims(kernel, 0)
      if weight_axes is not None:
        weight_axes = [0] + [a + 1 for a in weight_axes]
    if not self.switchable and not self.quantize_in_inference:
      trains = _trains(training)
      if trains is True:
        return self._pinned_call(inputs, x, kernel, axis)
      if trains is False:   # inference: only the float32 op in the graph
        tap_x, z = x, self._linear(x, kernel)
        if axis is not None:
          tap_x, z = tf.squeeze(tap_x, axis), tf.squeeze(z, axis)
        return self._finish(inputs, tap_x, z, None)
    elif not self.switchable:
      return self._pinned_call(inputs, x, kernel, axis)
    # A pinned layer given a training *tensor* takes the switch below, on
    # whatever its variable holds (a restore may have written False):
    # float32 taps, the same values.
    enabled = (tf.convert_to_tensor(self.enabled) if self.switchable
               else tf.constant(True))
    if training is not None and not self.quantize_in_inference:
      # Inference (training=False) never runs the training plan.
      enabled = tf.logical_and(enabled, tf.cast(training, tf.bool))
    if self.fixed_structure:
      precision, fwd, bwd = self._structure
      if fwd or precision != Precision.FLOAT32:
        tap_x, z = tf.cond(
            enabled, lambda: self._fixed_enabled_op(x, kernel, weight_axes),
            lambda: (x, self._linear(x, kernel)))
      else:   # enabled or not, the forward op is the plain one
        tap_x, z = x, self._linear(x, kernel)
      bwd_on = tf.logical_and(enabled, self.bwd_bits > 0) if bwd else None
      if axis is not None:
        tap_x, z = tf.squeeze(tap_x, axis), tf.squeeze(z, axis)
      return self._finish(inputs, tap_x, z, bwd_on)
    precision = tf.convert_to_tensor(self.precision)
    fwd_on = tf.logical_and(enabled, self.fwd_bits > 0)
    bwd_on = tf.logical_and(enabled, self.bwd_bits > 0)
    fp8_on = tf.logical_and(enabled,
                            tf.equal(precision, Precision.FP8_E4M3.id))
    bf16_on = tf.logical_and(enabled,
                             tf.equal(precision, Precision.BFLOAT16.id))
    # One branch per layer: a disabled layer runs the plain float32 op and
    # no quantization op (the enabled branch is not executed).
    tap_x, z = tf.cond(
        enabled,
        lambda: self._enabled_op(x, kernel, fwd_on, fp8_on, bf16_on,
                                 weight_axes),
        lambda: (x, self._linear(x, kernel)))
    if axis is not None:
      tap_x, z = tf.squeeze(tap_x, axis), tf.squeeze(z, axis)
    return self._finish(inputs, tap_x, z, bwd_on)

  def _finish(self, inputs, tap_x, z, bwd_on):
    """Bias, taps, the backward quantizer (None: none built), activation."""
    layer = self.layer
    z = self._with_output_shape(inputs, self._add_bias(z))
    _perexample_registry.record_tap(self, tap_x, z)
    out = z if bwd_on is None else self._backward_quantizer(z, bwd_on)
    if layer.activation is not None:
      out = layer.activation(out)
    return out

  def compute_output_shape(self, input_shape):
    return self.layer.compute_output_shape(input_shape)

  # -- configuration ----------------------------------------------------------

  def current_config(self):
    """The layer's current settings as a `LayerQuantConfig` (reads variables)."""
    from dpquant_tf.quantization import _plan  # pylint: disable=g-import-not-at-top
    return _plan.LayerQuantConfig(
        # A pinned layer runs whatever its variable says (a restore may
        # have written it): report what runs.
        enabled=bool(self.enabled.numpy()) or not self.switchable,
        fwd_format=QuantFormat(int(self.fwd_format.numpy())),
        fwd_bits=int(self.fwd_bits.numpy()),
        bwd_format=QuantFormat(int(self.bwd_format.numpy())),
        bwd_bits=int(self.bwd_bits.numpy()),
        precision=Precision(int(self.precision.numpy())))

  def execution(self):
    """How the layer runs with its current settings (reads variables).

    Returns:
      A dict: ``precision`` (the op's execution precision, lower-case name;
      ``float32`` while disabled), ``native`` (True when the op really runs
      in that precision; False for simulated FP8), ``hardware_accelerated``
      (this machine has units for it), ``simulated_formats`` (the formats
      rounded in float32 on the way in and out, e.g. ``["int4_sawb"]``).
    """
    config = self.current_config()
    precision = config.precision if config.enabled else Precision.FLOAT32
    simulated = []
    if config.enabled and config.fwd_bits > 0:
      simulated.append(f"fwd:{config.fwd_format.name.lower()}")
    if config.enabled and config.bwd_bits > 0:
      simulated.append(f"bwd:{config.bwd_format.name.lower()}")
    return {"precision": precision.name.lower(),
            "native": _precision.runs_natively(precision),
            "hardware_accelerated": _precision.hardware_accelerated(precision),
            "simulated_formats": simulated}

  def assign_config(self, config):
    """Assigns a `LayerQuantConfig` to the variables (no retrace)."""
    self.check_config(config)
    self.enabled.assign(config.enabled)
    self.fwd_format.assign(config.fwd_format.id)
    self.fwd_bits.assign(config.fwd_bits)
    self.bwd_format.assign(config.bwd_format.id)
    self.bwd_bits.assign(config.bwd_bits)
    self.precision.assign(config.precision.id)

  def check_config(self, config):
    """Raises (changing nothing) if `assign_config` would refuse ``config``."""
    if not self.built:
      raise ValueError(f"Expected layer {self.name!r} to be built before "
                       "assigning a quantization config.")
    if not self.switchable and not config.enabled:
      _validation.fail(
          "config", config,
          f"an enabled config: layer {self.name!r} is pinned "
          "(switchable=False) and runs in bf16 whenever it trains; rebuild it "
          "with switchable=True to switch it off")
    if self.fixed_structure and config.enabled:
      got = _structure_of(config.precision, config.fwd_bits, config.bwd_bits)
      if got != self._structure:
        _validation.fail(
            "config", config,
            f"an enabled config of the structure layer {self.name!r} was "
            f"built with (fixed_structure=True: {_describe(self._structure)}); "
            f"got {_describe(got)}. Rebuild the model with that config, or "
            "with fixed_structure=False")

  def get_config(self):
    config = super().get_config()
    init = self._initial
    config.update(
        enabled=init["enabled"],
        fwd_format=init["fwd_format"].name.lower(), fwd_bits=init["fwd_bits"],
        bwd_format=init["bwd_format"].name.lower(), bwd_bits=init["bwd_bits"],
        precision=init["precision"].name.lower(),
        rounding=self.rounding.value, bf16_rounding=self.bf16_rounding.value,
        weight_scale=self.weight_scale.value,
        seed=self.seed, fixed_structure=self.fixed_structure,
        switchable=self.switchable)
    return config

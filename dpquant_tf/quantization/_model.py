"""Model-level API: wrap a model's layers, list them, set and read plans."""

import dataclasses
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Union

import tensorflow as tf

from dpquant_tf import _layer_kinds
from dpquant_tf import _validation
from dpquant_tf.quantization import _layers
from dpquant_tf.privacy import _model_checks
from dpquant_tf.quantization import _plan
from dpquant_tf.quantization._formats import Rounding, ScaleMode
from dpquant_tf.quantization._layers import LayerKind, QuantizedLayer

SUPPORTED_MODELS = ("Sequential and Functional tf.keras models (subclassed "
                    "models: wrap their layers with QuantizedLayer yourself)")


@dataclasses.dataclass(frozen=True)
class LayerInfo:
  """One quantizable layer of a model.

  Attributes:
    name: the wrapped (inner) layer's name; the key of `QuantPlan`s.
    index: position in `quantizable_layers(model)` (stable).
    kind: the `LayerKind`.
    fwd_macs: forward multiply-adds per example (unknown dimensions count 1).
    bwd_macs: backward multiply-adds per example: gradients with respect to
      the input and to the kernel, ``2 * fwd_macs``.
  """
  name: str
  index: int
  kind: LayerKind
  fwd_macs: int
  bwd_macs: int


def _check_graph_model(model, what):
  if not isinstance(model, tf.keras.Model):
    _validation.fail("model", model, f"a tf.keras.Model ({SUPPORTED_MODELS})",
                     TypeError)
  if not getattr(model, "_is_graph_network", False):
    kind = ("an unbuilt Sequential model (give it an Input or build it)"
            if isinstance(model, tf.keras.Sequential) else
            f"a subclassed model ({type(model).__name__})")
    raise ValueError(f"{what} supports {SUPPORTED_MODELS}; got {kind}.")


def _check_float32_policy(model) -> None:
  """Refuses Keras mixed precision: the wrappers tap float32 values only."""
  policy = tf.keras.mixed_precision.global_policy()
  if policy.compute_dtype != "float32" or policy.variable_dtype != "float32":
    _validation.fail(
        "tf.keras.mixed_precision.global_policy()", policy.name,
        "'float32' while quantize_model runs and during DP training: a "
        "mixed-precision policy computes activations and gradients in "
        "float16/bfloat16, which does not bound one example's contribution by "
        "the clip norm; call tf.keras.mixed_precision.set_global_policy("
        "'float32') and rebuild the model (low-precision arithmetic is what "
        "quantize_model's QuantizedLayer precisions are for)")
  low = _model_checks.low_precision_layers(model)
  if low:
    raise ValueError("quantize_model needs a float32 model: " +
                     _model_checks.mixed_precision_message(low[0]))


def _walk(model) -> List[tf.keras.layers.Layer]:
  """Layers in stable order, descending into nested models."""
  out = []
  for layer in model.layers:
    if isinstance(layer, tf.keras.Model):
      out.extend(_walk(layer))
    else:
      out.append(layer)
  return out


def quantized_layers(model) -> List[QuantizedLayer]:
  """The model's `QuantizedLayer`s in stable order."""
  return [l for l in _walk(model) if isinstance(l, QuantizedLayer)]


def quantizable_layers(model) -> List[LayerInfo]:
  """Lists the model's quantizable layers in a stable order.

  If the model holds `QuantizedLayer`s, those are listed (the layers a plan
  can control); otherwise every layer `quantize_model` could wrap is.

  Args:
    model: a built Sequential or Functional model.

  Returns:
    `LayerInfo`s in the order of `model.layers` (nested models in place).
  """
  _check_graph_model(model, "quantizable_layers")
  layers = quantized_layers(model)
  if not layers:
    layers = [l for l in _walk(model) if _layers.quantizable_kind(l) is not None]
  infos = []
  for i, layer in enumerate(layers):
    inner = layer.layer if isinstance(layer, QuantizedLayer) else layer
    macs = _layer_kinds.layer_macs(layer)
    infos.append(LayerInfo(inner.name, i, _layers.quantizable_kind(inner), macs, 2 * macs))
  return infos


def clone_with(model, replace: Callable[[tf.keras.layers.Layer], Optional[tf.keras.layers.Layer]],
               copy_weights: Callable[[tf.keras.layers.Layer, tf.keras.layers.Layer], None]):
  """Clones a graph model, replacing layers, and copies the weights over.

  Args:
    model: a built Sequential or Functional model.
    replace: returns a new layer for a layer to replace, or None to clone it.
    copy_weights: `copy_weights(old, new)` for replaced layers.

  Returns:
    The clone (not compiled).
  """
  pairs: Dict[int, tuple] = {}

  def clone_fn(layer):
    if isinstance(layer, tf.keras.Model) and getattr(layer, "_is_graph_network", False):
      new = clone_with(layer, replace, copy_weights)
      pairs[id(layer)] = (layer, new, "nested")
      return new
    new = replace(layer)
    if new is None:
      new = layer.__class__.from_config(layer.get_config())
      pairs[id(layer)] = (layer, new, "clone")
    else:
      pairs[id(layer)] = (layer, new, "replaced")
    return new

  clone = tf.keras.models.clone_model(model, clone_function=clone_fn)
  for old, new, how in pairs.values():
    if how == "clone":
      new.set_weights(old.get_weights())
    elif how == "replaced":
      copy_weights(old, new)
  return clone


def quantize_model(model, *, layers: Optional[Iterable[str]] = None,
                   config: Optional[_plan.LayerQuantConfig] = None,
                   rounding: Union[Rounding, str] = Rounding.STOCHASTIC,
                   bf16_rounding: Union[Rounding, str] = Rounding.NEAREST,
                   weight_scale: Union[ScaleMode, str] = ScaleMode.PER_CHANNEL,
                   seed: Optional[int] = None, fixed_structure: bool = False,
                   switchable: bool = True):
  """Clones a model with its quantizable layers wrapped in `QuantizedLayer`.

  Args:
    model: a built Sequential or Functional model (not modified).
    layers: names of the layers to wrap (default: every Dense, Conv1D,
      Conv2D, DepthwiseConv2D and EinsumDense layer).
    config: initial `LayerQuantConfig` of every wrapped layer (default: on,
      INT4-SAWB forward, LUQ-FP4 backward).
    rounding: rounding of every wrapped layer's quantization formats.
    bf16_rounding: rounding of the input's bfloat16 cast where a layer runs
      in bfloat16 (default nearest; see `QuantizedLayer`).
    weight_scale: per-channel (default) or per-tensor weight scales.
    seed: None for non-deterministic rounding noise; an int seeds layer i with
      `seed + i` (tests).
    fixed_structure: build every wrapper for ``config``'s structure only
      (see `QuantizedLayer`): plans may switch layers on and off and change
      formats and bits, not the precision or which directions quantize.
    switchable: False pins every wrapped layer on (see `QuantizedLayer`):
      only with ``fixed_structure=True`` and a pure bf16 ``config``
      (precision bf16, bits 0, enabled); for plans that keep every wrapped
      layer in bf16 (ratio 1.0). Saves three casts per layer and step.

  Returns:
    The clone, with the original weights; compile it before training.

  Raises:
    ValueError: subclassed or unbuilt models, unknown or unsupported names,
      a Keras mixed-precision policy (global or on a layer of `model`).
  """
  _check_graph_model(model, "quantize_model")
  _check_float32_policy(model)
  config = config or _plan.LayerQuantConfig()
  _validation.check_type("config", config, _plan.LayerQuantConfig,
                         "a LayerQuantConfig")
  rounding = _validation.check_enum("rounding", rounding, Rounding)
  bf16_rounding = _validation.check_enum("bf16_rounding", bf16_rounding,
                                         Rounding)
  weight_scale = _validation.check_enum("weight_scale", weight_scale, ScaleMode)
  if seed is not None:
    seed = _validation.check_int("seed", seed)
  _validation.check_type("fixed_structure", fixed_structure, bool)
  _validation.check_type("switchable", switchable, bool)
  candidates = [l for l in _walk(model) if _layers.quantizable_kind(l) is not None]
  names = [l.name for l in candidates]
  if layers is None:
    chosen = set(names)
  else:
    layers = [layers] if isinstance(layers, str) else list(layers)
    all_names = {l.name for l in _walk(model)}
    for name in layers:
      if name not in all_names:
        _validation.fail("layers", name, f"one of the model's layers {sorted(all_names)}")
      if name not in names:
        _validation.fail("layers", name,
                         f"a {_layers.SUPPORTED} layer; quantizable: {names}")
    chosen = set(layers)

  def replace(layer):
    if layer.name not in chosen or isinstance(layer, QuantizedLayer):
      return None
    inner = layer.__class__.from_config(layer.get_config())
    layer_seed = None if seed is None else seed + names.index(layer.name)
    return QuantizedLayer(
        inner, enabled=config.enabled, fwd_format=config.fwd_format,
        fwd_bits=config.fwd_bits, bwd_format=config.bwd_format,
        bwd_bits=config.bwd_bits, precision=config.precision,
        rounding=rounding, bf16_rounding=bf16_rounding,
        weight_scale=weight_scale, seed=layer_seed,
        fixed_structure=fixed_structure, switchable=switchable)

  def copy_weights(old, new):
    new.layer.set_weights(old.get_weights())

  return clone_with(model, replace, copy_weights)


def _by_name(model) -> Dict[str, QuantizedLayer]:
  _check_graph_model(model, "set_plan/get_plan")
  wrappers = quantized_layers(model)
  if not wrappers:
    raise ValueError("Expected model to contain QuantizedLayers; call "
                     "dpquant_tf.quantization.quantize_model(model) first.")
  return {w.layer.name: w for w in wrappers}


def set_plan(model, plan: Union[_plan.QuantPlan, Mapping[str, _plan.LayerQuantConfig]],
             *, partial: bool = False) -> None:
  """Applies a plan to a quantized model by assigning variables (no retrace).

  Args:
    model: a model returned by `quantize_model` (or holding QuantizedLayers).
    plan: a `QuantPlan` (or a mapping name -> `LayerQuantConfig`).
    partial: False (default): layers missing from the plan are disabled (the
      plan is the complete description). True: they are left unchanged.

  Raises:
    ValueError: the plan names a layer the model does not quantize, or a
      layer refuses its config (see `QuantizedLayer.assign_config`); then
      no layer is changed.
  """
  if not isinstance(plan, _plan.QuantPlan):
    plan = _plan.QuantPlan(plan)
  wrappers = _by_name(model)
  unknown = sorted(set(plan.layers) - set(wrappers))
  if unknown:
    _validation.fail("plan", unknown,
                     f"names of quantized layers of the model {sorted(wrappers)}")
  # Every layer's config is checked before any is assigned: a refused plan
  # changes nothing.
  off = [] if partial else [n for n in wrappers if n not in plan.layers]
  for name, config in plan.layers.items():
    wrappers[name].check_config(config)
  for name in off:   # a layer the plan leaves out is switched off
    wrappers[name].check_config(_plan.OFF)
  for name, config in plan.layers.items():
    wrappers[name].assign_config(config)
  for name in off:
    wrappers[name].enabled.assign(False)


def get_plan(model) -> _plan.QuantPlan:
  """Reads the current plan from a quantized model's variables."""
  return _plan.QuantPlan({n: w.current_config() for n, w in _by_name(model).items()})


def execution_report(model) -> Dict[str, Dict[str, object]]:
  """How each quantized layer runs now: natively or simulated (reads variables).

  Args:
    model: a model holding QuantizedLayers.

  Returns:
    Layer name -> ``QuantizedLayer.execution()`` (``precision``, ``native``,
    ``hardware_accelerated``, ``simulated_formats``), in model order.
  """
  return {n: w.execution() for n, w in _by_name(model).items()}

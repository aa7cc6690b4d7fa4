"""The schedule's bridge to ``dpquant_tf.quantization`` (Contract 1).

Turns policy decisions into ``QuantPlan``s and reads the model's quantized
layers. All model changes go through ``set_plan`` (variable assignments only).
"""

import dataclasses
from typing import Dict, List, Optional, Sequence

from dpquant_tf import _validation as v
from dpquant_tf import quantization as q


def default_config() -> "q.LayerQuantConfig":
  """The paper's LUQ-FP4 setting: INT4-SAWB forward, LUQ-FP4 backward."""
  return q.LayerQuantConfig()


def check_base_config(base_config) -> "q.LayerQuantConfig":
  return v.check_type("base_config", base_config, q.LayerQuantConfig,
                      "None or a dpquant_tf.quantization.LayerQuantConfig")


def _base(base_config) -> "q.LayerQuantConfig":
  if base_config is None:
    return default_config()
  return check_base_config(base_config)


def plan_from_decision(decision, *, base_config=None) -> "q.QuantPlan":
  """The ``QuantPlan`` of a ``Decision``.

  Every layer gets `base_config` with its ``enabled`` flag from the decision;
  with ``decision.layer_bits`` the layer instead runs uniform INT at those
  bits, forward and backward.
  """
  base = _base(base_config)
  layers = {}
  for name, on in decision.enabled.items():
    cfg = dataclasses.replace(base, enabled=bool(on))
    if decision.layer_bits is not None and name in decision.layer_bits:
      b = int(decision.layer_bits[name])
      cfg = dataclasses.replace(cfg, fwd_format=q.QuantFormat.INT, fwd_bits=b,
                                bwd_format=q.QuantFormat.INT, bwd_bits=b)
    layers[name] = cfg
  return q.QuantPlan(layers)


def quantizable_layers(model) -> List["q.LayerInfo"]:
  """The ``LayerInfo`` of the model's ``QuantizedLayer``s ([] if none)."""
  if not q.quantized_layers(model):
    return []
  return q.quantizable_layers(model)


def layer_names(model) -> List[str]:
  names = [info.name for info in quantizable_layers(model)]
  if not names:
    v.fail("model", getattr(model, "name", model), "a model with QuantizedLayers"
           " (dpquant_tf.quantization.quantize_model)")
  return names


def get_plan(model):
  return q.get_plan(model)


def set_plan(model, plan) -> None:
  q.set_plan(model, plan)


def set_only(model, names: Sequence[str], name: Optional[str],
             base_config=None) -> None:
  """Quantizes only layer `name` (None: no layer) with `base_config`."""
  enabled = [] if name is None else [name]
  q.set_plan(model, q.QuantPlan.select(names, enabled, config=_base(base_config)))


def forward_bits(plan, names: Sequence[str]) -> Dict[str, int]:
  """Layer name -> forward bits in use (0 when the layer is not quantized)."""
  out = {}
  for name in names:
    cfg = plan[name]
    out[name] = int(cfg.fwd_bits) if cfg.quantizes else 0
  return out


def _wrappers(model) -> Dict[str, "q.QuantizedLayer"]:
  return {w.layer.name: w for w in q.quantized_layers(model)}


def kernel_of(model, info):
  """The kernel variable of the layer named by `info` (None if absent)."""
  wrapper = _wrappers(model).get(info.name)
  if wrapper is None:
    return None
  inner = wrapper.layer
  for attr in ("kernel", "depthwise_kernel"):
    kernel = getattr(inner, attr, None)
    if kernel is not None:
      return kernel
  return None


def gradient_bit_keys(model, bits: Dict[str, int]) -> Dict[str, int]:
  """Layer name -> bits, expanded to the layer's trainable variable names.

  ``DPQuantOptimizer.set_gradient_bits`` keys bits by variable name; the plan
  keys layers by the wrapped layer's name, which is not a prefix of the
  wrapper's variable names, so the names are expanded here.
  """
  wrappers = _wrappers(model)
  out = {}
  for name, b in bits.items():
    if name not in wrappers:
      v.fail("gradient_bits", name, f"a quantized layer name among {sorted(wrappers)}")
    for var in wrappers[name].trainable_variables:
      out[var.name] = int(b)
  return out

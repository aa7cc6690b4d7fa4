"""DPQuant's theoretical cost model (Gao et al., arXiv:2509.03472, section 5).

The paper estimates the time of a training run with quantized layers as

    T = T_analysis + (1 - p + p / s) (T_train - T_overhead) + T_overhead,

with ``p`` the quantized fraction of the matrix-multiply compute, ``s`` the
speed-up of the low-precision format over FP16 (4 for FP4/INT4, 2 for
FP8/INT8) and ``T_overhead`` the time that quantization does not touch. The
theoretical speed-up is ``T_train / T``.

Here ``p`` is computed from the per-layer multiply-accumulates (MACs, forward
and backward, per example) of the plan that was actually run, not from the
layer count: quantizing the largest conv counts for more than quantizing the
classifier. When layers of one plan use different formats (or the forward and
backward passes of a layer do), ``(1 - p + p / s)`` generalises to the
MAC-weighted mean of ``1 / s_l`` (with ``s = 1`` for full-precision work).
All times are relative to ``T_train = 1`` for an epoch.

Execution precision (``precision`` of a plan's layer config): a layer whose
op runs natively in bfloat16 is modelled at the speed-up the *hardware* gives
bfloat16 over float32 (:func:`native_speedups`: 1.75 on a CPU with
AVX512_BF16/AMX or a GPU, measured on a 2048x2048 matmul; 1.0 on a CPU
without bf16 units, where oneDNN emulates it). :class:`EpochCost` keeps the
two apart: ``speedup`` is the modelled speed-up of everything in the plan
(simulated formats at the paper's s), ``hardware_speedup`` counts only what
this hardware runs natively (simulated formats at s = 1), and the layers are
listed as ``native_layers`` / ``simulated_layers``.

MACs come from the library's one MAC counter: the ``fwd_macs`` / ``bwd_macs``
of ``dpquant_tf.quantization.quantizable_layers(model)`` (see
:func:`model_layer_costs`). Attention: the weight-free matrix products of a
self-attention layer (``Q K^T`` and ``A V``, ``2 T^2 D`` forward MACs per
example, twice that backward) are matrix-multiply compute too, but no plan
quantizes them: :func:`attention_costs` lists them (from the layer's own
``attention_macs()``), :func:`model_layer_costs` appends them, and
:func:`epoch_cost` counts them at full precision.

Example:
  >>> from dpquant_tf import costmodel, models
  >>> layers = costmodel.model_layer_costs(models.tutorial_cnn())
  >>> costmodel.epoch_cost(layers, {"conv1": "fp4", "conv2": "fp4"}).speedup
"""

import dataclasses
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

from dpquant_tf import _validation

__all__ = ["BF16_HARDWARE_SPEEDUP", "DEFAULT_SPEEDUPS", "EpochCost", "LayerCost",
           "attention_costs", "cost_model_time", "epoch_cost", "format_key", "layer_costs",
           "model_layer_costs", "native_speedups", "plan_to_dict",
           "run_hardware_speedup", "run_speedup", "speedup_for"]

# Speed-up of each format over FP16 (the paper: s = 4 for FP4, 2 for FP8).
DEFAULT_SPEEDUPS: Dict[str, float] = {
    "fp4": 4.0, "int4": 4.0, "luq_fp4": 4.0, "fp8": 2.0, "int8": 2.0,
}

# bfloat16 over float32 on hardware with bf16 units (docs/ENVIRONMENT.md:
# 2048x2048 matmul 96 ms float32, 55 ms bfloat16 on an AVX512_BF16 CPU).
BF16_HARDWARE_SPEEDUP = 1.75

# Execution precisions (dpquant_tf.quantization.Precision names) -> keys.
_PRECISION_KEYS = {"float32": None, "fp32": None, "bfloat16": "bf16",
                   "bf16": "bf16", "fp8_e4m3": "fp8", "fp8": "fp8"}

# Names of dpquant_tf.quantization.QuantFormat members -> speed-up keys.
_FORMAT_KEYS = {
    "fp4_e2m1": "fp4", "fp4": "fp4", "luq_fp4": "luq_fp4", "int4_sawb": "int4",
    "fp8_e4m3": "fp8", "fp8_e5m2": "fp8", "fp8": "fp8", "int4": "int4",
    "int8": "int8",
}


@dataclasses.dataclass(frozen=True)
class LayerCost:
  """Per-example MACs of one quantizable layer."""
  name: str
  fwd_macs: float
  bwd_macs: float

  @property
  def total(self) -> float:
    return self.fwd_macs + self.bwd_macs


@dataclasses.dataclass(frozen=True)
class EpochCost:
  """The cost model evaluated for one epoch's plan.

  Attributes:
    quantized_fraction: p, the MAC-weighted fraction of compute that runs in
      low precision (forward and backward counted separately).
    compute_factor: (1 - p + p / s) generalised to mixed formats.
    relative_time: T / T_train.
    speedup: T_train / T.
    quantized_layers: names of the layers quantized in this epoch.
    hardware_speedup: T_train / T counting only the work this hardware runs
      natively in low precision (simulated formats at s = 1).
    native_layers: layers whose op runs natively in a low precision (bf16).
    simulated_layers: layers with simulated formats or simulated FP8.
  """
  quantized_fraction: float
  compute_factor: float
  relative_time: float
  speedup: float
  quantized_layers: List[str]
  hardware_speedup: float = 1.0
  native_layers: List[str] = dataclasses.field(default_factory=list)
  simulated_layers: List[str] = dataclasses.field(default_factory=list)


def native_speedups() -> Dict[str, float]:
  """Speed-up over float32 of each execution precision on this machine.

  ``bf16``: :data:`BF16_HARDWARE_SPEEDUP` when
  ``dpquant_tf.quantization.hardware_accelerated("bf16")`` (AVX512_BF16/AMX
  CPU or a GPU), else 1.0. ``fp8``: 1.0 (FP8 is simulated on every device).
  """
  from dpquant_tf import quantization  # pylint: disable=g-import-not-at-top
  bf16 = (BF16_HARDWARE_SPEEDUP if quantization.hardware_accelerated("bf16")
          else 1.0)
  return {"bf16": bf16, "fp8": 1.0}


def _precision_key(cfg: Mapping[str, Any]) -> Optional[str]:
  name = cfg.get("precision")
  if name is None:
    return None
  name = str(getattr(name, "name", name)).lower()
  if name not in _PRECISION_KEYS:
    _validation.fail("precision", name, f"one of {sorted(_PRECISION_KEYS)}")
  return _PRECISION_KEYS[name]


def cost_model_time(*, t_analysis: float, t_train: float, t_overhead: float,
                    p: float, s: float) -> float:
  """The paper's formula, literally: T_analysis + (1-p+p/s)(T_train-T_overhead) + T_overhead."""
  _validation.check_non_negative("t_analysis", t_analysis)
  _validation.check_positive("t_train", t_train)
  _validation.check_non_negative("t_overhead", t_overhead)
  if t_overhead > t_train:
    _validation.fail("t_overhead", t_overhead, f"<= t_train={t_train}")
  _validation.check_probability("p", p, allow_zero=True)
  _validation.check_positive("s", s)
  return t_analysis + (1 - p + p / s) * (t_train - t_overhead) + t_overhead


def format_key(fmt: Any, bits: Optional[int] = None) -> Optional[str]:
  """Maps a format (QuantFormat member, its name, or a flag name) to a speed-up key.

  ``INT`` with ``bits`` maps to ``int<bits>``. Returns None for "no format".
  """
  if fmt is None:
    return None
  name = getattr(fmt, "name", fmt)
  name = str(name).lower()
  if name in ("none", "fp32", "fp16", "float"):
    return None
  if name == "int":
    if bits is None:
      _validation.fail("bits", bits, "an integer for the INT format")
    return f"int{int(bits)}"
  return _FORMAT_KEYS.get(name, name)


def speedup_for(fmt: Any, bits: Optional[int] = None,
                speedups: Optional[Mapping[str, float]] = None) -> float:
  """Speed-up s of a format over FP16 (1.0 for no format).

  Unknown INT widths fall back to 16 / bits (e.g. int2 -> 8).
  """
  table = dict(DEFAULT_SPEEDUPS)
  table.update(speedups or {})
  key = format_key(fmt, bits)
  if key is None:
    return 1.0
  if key in table:
    return _validation.check_positive(f"speedups[{key!r}]", table[key])
  if key.startswith("int") and key[3:].isdigit():
    return 16.0 / int(key[3:])
  _validation.fail("format", fmt, f"one of {sorted(table)} (or add it to speedups)")


def layer_costs(layers: Iterable[Any]) -> List[LayerCost]:
  """LayerCost list from ``quantizable_layers(model)`` infos or dicts.

  Args:
    layers: ``LayerInfo``s (``dpquant_tf.quantization.quantizable_layers``),
      ``LayerCost``s, or mappings with ``name``, ``fwd_macs``, ``bwd_macs``.

  Returns:
    One :class:`LayerCost` per entry, in order.
  """
  out = []
  for info in layers:
    if isinstance(info, LayerCost):
      out.append(info)
    elif isinstance(info, Mapping):
      out.append(LayerCost(str(info["name"]), float(info["fwd_macs"]),
                           float(info["bwd_macs"])))
    else:
      out.append(LayerCost(str(info.name), float(info.fwd_macs),
                           float(info.bwd_macs)))
  return out


def attention_costs(model) -> List[LayerCost]:
  """Per-example MACs of the model's attention products (never quantized).

  Every layer with an ``attention_macs()`` method (such as
  ``dpquant_tf.models.MultiHeadDotProductAttention``, built and called)
  gives one entry ``<layer name>`` with ``fwd_macs`` = its ``Q K^T`` plus
  ``A V`` multiply-adds (``2 T^2 D``) and ``bwd_macs = 2 * fwd_macs`` (the
  gradients with respect to both operands of each product). Nested models
  are searched; tapping wrappers are seen through.

  Args:
    model: a built Keras model.

  Returns:
    One :class:`LayerCost` per attention layer, in model order (empty for
    models without attention).
  """
  out = []

  def walk(layers):
    for layer in layers:
      inner = getattr(layer, "layer", None) if hasattr(layer, "tap_output") else None
      layer = inner or layer
      if hasattr(layer, "layers") and not hasattr(layer, "attention_macs"):
        walk(layer.layers)
      elif callable(getattr(layer, "attention_macs", None)):
        fwd = float(layer.attention_macs())
        out.append(LayerCost(layer.name, fwd, 2 * fwd))
  walk(getattr(model, "layers", []))
  return out


def model_layer_costs(model) -> List[LayerCost]:
  """Per-example MACs of a model's quantizable layers and attention products.

  The counts are those of ``dpquant_tf.quantization.quantizable_layers``
  (the library's one MAC counter): wrapped ``QuantizedLayer``s if the model
  has any, otherwise every layer ``quantize_model`` could wrap; followed by
  :func:`attention_costs` (full-precision work no plan names).

  Args:
    model: a built Sequential or Functional Keras model.

  Returns:
    One :class:`LayerCost` per quantizable layer, in model order, then one
    per attention layer.
  """
  from dpquant_tf import quantization  # pylint: disable=g-import-not-at-top
  return (layer_costs(quantization.quantizable_layers(model))
          + attention_costs(model))


def plan_to_dict(plan: Any) -> Dict[str, Dict[str, Any]]:
  """Normalises a plan to {layer: {enabled, fwd/bwd_format, fwd/bwd_bits, precision}}.

  Accepts a ``dpquant_tf.quantization.QuantPlan`` (a mapping of layer name ->
  ``LayerQuantConfig``, or an object with such a mapping), a mapping of layer
  name -> dict with those keys, or a mapping of layer name -> format name
  (both passes in that format; None/False = full precision).
  """
  items = None
  if isinstance(plan, Mapping):
    items = plan.items()
  else:
    for attr in ("layers", "configs", "items"):
      candidate = getattr(plan, attr, None)
      if callable(candidate):
        candidate = candidate()
      if candidate is not None:
        items = candidate.items() if isinstance(candidate, Mapping) else candidate
        break
  if items is None:
    _validation.fail("plan", plan, "a QuantPlan or a mapping of layer name -> config")
  out = {}
  for name, cfg in items:
    if cfg is None or cfg is False:
      out[name] = {"enabled": False}
    elif isinstance(cfg, str):
      out[name] = {"enabled": True, "fwd_format": cfg, "fwd_bits": None,
                   "bwd_format": cfg, "bwd_bits": None, "precision": None}
    else:
      get = (cfg.get if isinstance(cfg, Mapping)
             else lambda k, d=None, c=cfg: getattr(c, k, d))
      def _fmt(value):
        if value is None:
          return None
        return str(getattr(value, "name", value)).lower()
      out[name] = {"enabled": bool(get("enabled", True)),
                   "fwd_format": _fmt(get("fwd_format")),
                   "fwd_bits": get("fwd_bits"),
                   "bwd_format": _fmt(get("bwd_format")),
                   "bwd_bits": get("bwd_bits"),
                   "precision": _fmt(get("precision"))}
  return out


def epoch_cost(layers: Sequence[Any], plan: Any, *,
               speedups: Optional[Mapping[str, float]] = None,
               hardware: Optional[Mapping[str, float]] = None,
               analysis_fraction: float = 0.0,
               overhead_fraction: float = 0.0) -> EpochCost:
  """Evaluates the cost model for one epoch's plan.

  Args:
    layers: the model's quantizable layers with per-example MACs
      (``quantizable_layers(model)``, ``LayerCost``s or dicts).
    plan: the plan run in the epoch (see :func:`plan_to_dict`). Layers not in
      the plan run in full precision.
    speedups: format key -> s, overriding :data:`DEFAULT_SPEEDUPS`.
    hardware: execution precision key (``bf16``, ``fp8``) -> speed-up of the
      op over float32 on the hardware that runs it (default
      :func:`native_speedups` of this machine). A direction with bits 0 and
      a low execution precision runs at that speed-up; a simulated format
      on top keeps the format's modelled s.
    analysis_fraction: T_analysis / T_train for this epoch.
    overhead_fraction: T_overhead / T_train (work quantization does not touch).

  Returns:
    An :class:`EpochCost`.
  """
  costs = layer_costs(layers)
  a = _validation.check_non_negative("analysis_fraction", analysis_fraction)
  o = _validation.check_probability("overhead_fraction", overhead_fraction,
                                    allow_zero=True)
  total = sum(c.total for c in costs)
  if total <= 0:
    _validation.fail("layers", [c.name for c in costs],
                     "layers with positive MACs")
  plan_d = plan_to_dict(plan)
  unknown = sorted(set(plan_d) - {c.name for c in costs})
  if unknown:
    _validation.fail("plan", unknown, "names of the model's quantizable layers")
  hw = dict(native_speedups() if hardware is None else hardware)
  quantized_macs, weighted, hw_weighted = 0.0, 0.0, 0.0
  quantized_layers, native_layers, simulated_layers = [], [], []
  for c in costs:
    cfg = plan_d.get(c.name, {"enabled": False})
    if not cfg.get("enabled"):
      weighted += c.total
      hw_weighted += c.total
      continue
    prec = _precision_key(cfg)
    # The op's own precision: native bf16 at the hardware's speed-up;
    # simulated FP8 at the modelled FP8 s (the hardware gains nothing).
    s_native = hw.get(prec, 1.0) if prec == "bf16" else 1.0
    s_prec = (s_native if prec != "fp8"
              else speedup_for("fp8", None, speedups))
    sims = []

    def direction(fmt, bits, s_prec=s_prec, sims=sims):
      if bits == 0:
        return s_prec
      sims.append(fmt)
      return speedup_for(fmt, bits, speedups)

    s_f = direction(cfg.get("fwd_format"), cfg.get("fwd_bits"))
    s_b = direction(cfg.get("bwd_format"), cfg.get("bwd_bits"))
    quantized_macs += (c.fwd_macs if s_f != 1.0 else 0.0) + (
        c.bwd_macs if s_b != 1.0 else 0.0)
    weighted += c.fwd_macs / s_f + c.bwd_macs / s_b
    hw_weighted += c.total / s_native
    if s_f != 1.0 or s_b != 1.0:
      quantized_layers.append(c.name)
    if prec == "bf16":
      native_layers.append(c.name)
    if sims or prec == "fp8":
      simulated_layers.append(c.name)
  factor = weighted / total
  rel = a + factor * (1 - o) + o
  hw_rel = a + hw_weighted / total * (1 - o) + o
  return EpochCost(quantized_fraction=quantized_macs / total,
                   compute_factor=factor, relative_time=rel,
                   speedup=1.0 / rel, quantized_layers=quantized_layers,
                   hardware_speedup=1.0 / hw_rel, native_layers=native_layers,
                   simulated_layers=simulated_layers)


def _weighted_speedup(epochs, weights, relative_time) -> float:
  """sum(weights) / sum(w * relative_time(epoch)), with the arguments checked."""
  if not epochs:
    _validation.fail("epochs", epochs, "a non-empty sequence of EpochCost")
  weights = [1.0] * len(epochs) if weights is None else [float(w) for w in weights]
  if len(weights) != len(epochs):
    _validation.fail("weights", weights, f"of length {len(epochs)}")
  return sum(weights) / sum(w * relative_time(e) for w, e in zip(weights, epochs))


def run_speedup(epochs: Sequence[EpochCost],
                weights: Optional[Sequence[float]] = None) -> float:
  """Whole-run speed-up: sum of baseline epoch times over sum of modelled times.

  Args:
    epochs: the per-epoch costs.
    weights: relative baseline length of each epoch (e.g. steps); equal by default.
  """
  return _weighted_speedup(epochs, weights, lambda e: e.relative_time)


def run_hardware_speedup(epochs: Sequence[EpochCost],
                         weights: Optional[Sequence[float]] = None) -> float:
  """Like :func:`run_speedup` with each epoch's ``hardware_speedup``."""
  return _weighted_speedup(epochs, weights, lambda e: 1.0 / e.hardware_speedup)

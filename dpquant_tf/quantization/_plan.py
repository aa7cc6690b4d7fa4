"""Quantization plans: which layers quantize, in which formats.

A `QuantPlan` maps layer names (the wrapped layers' own names, as listed by
`quantizable_layers`) to `LayerQuantConfig`s. Plans are plain immutable data;
`set_plan` turns one into variable assignments (no retrace).
"""

import dataclasses
from typing import Dict, Iterable, Mapping, Optional

from dpquant_tf import _validation
from dpquant_tf.quantization import _formats
from dpquant_tf.quantization import _precision
from dpquant_tf.quantization._formats import QuantFormat
from dpquant_tf.quantization._precision import Precision


@dataclasses.dataclass(frozen=True)
class LayerQuantConfig:
  """How one layer quantizes.

  Attributes:
    enabled: master switch of the layer.
    fwd_format: format of the weights and input activations.
    fwd_bits: forward bit width (0: forward off).
    bwd_format: format of the gradient at the layer output.
    bwd_bits: backward bit width (0: backward off).
    precision: execution precision of the layer's op (`Precision`:
      float32, bfloat16 run natively, FP8 E4M3 simulated). A layer with
      bits 0 both ways and ``precision=BFLOAT16`` is a pure bf16 layer.

  Defaults are the paper's LUQ-FP4 setting: INT4 with SAWB forward, radix-2
  FP4 (LUQ) backward.
  """
  enabled: bool = True
  fwd_format: QuantFormat = QuantFormat.INT4_SAWB
  fwd_bits: int = 4
  bwd_format: QuantFormat = QuantFormat.LUQ_FP4
  bwd_bits: int = 4
  precision: Precision = Precision.FLOAT32

  def __post_init__(self):
    _validation.check_type("enabled", self.enabled, bool, "a bool")
    fwd_format, fwd_bits = _formats.check_format_bits(
        "fwd", self.fwd_format, self.fwd_bits)
    bwd_format, bwd_bits = _formats.check_format_bits(
        "bwd", self.bwd_format, self.bwd_bits)
    object.__setattr__(self, "fwd_format", fwd_format)
    object.__setattr__(self, "fwd_bits", fwd_bits)
    object.__setattr__(self, "bwd_format", bwd_format)
    object.__setattr__(self, "bwd_bits", bwd_bits)
    object.__setattr__(self, "precision", _precision.check_precision(
        "precision", self.precision))

  @property
  def quantizes(self) -> bool:
    """True when the layer does any quantization or low-precision execution."""
    return self.enabled and (self.fwd_bits > 0 or self.bwd_bits > 0 or
                             self.precision != Precision.FLOAT32)

  def to_dict(self) -> Dict[str, object]:
    return {"enabled": self.enabled, "fwd_format": self.fwd_format.name.lower(),
            "fwd_bits": self.fwd_bits, "bwd_format": self.bwd_format.name.lower(),
            "bwd_bits": self.bwd_bits,
            "precision": self.precision.name.lower()}

  @classmethod
  def from_dict(cls, d: Mapping[str, object]) -> "LayerQuantConfig":
    return cls(**dict(d))

  def disabled(self) -> "LayerQuantConfig":
    """The same formats with `enabled=False`."""
    return dataclasses.replace(self, enabled=False)


OFF = LayerQuantConfig(enabled=False)


@dataclasses.dataclass(frozen=True)
class QuantPlan:
  """An immutable map from layer name to `LayerQuantConfig`.

  Attributes:
    layers: mapping layer name -> `LayerQuantConfig`.
  """
  layers: Mapping[str, LayerQuantConfig] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    layers = dict(_validation.check_type("layers", self.layers, Mapping, "a mapping"))
    for name, cfg in layers.items():
      _validation.check_type("layer name", name, str, "a str")
      _validation.check_type(f"layers[{name!r}]", cfg, LayerQuantConfig,
                             "a LayerQuantConfig")
    object.__setattr__(self, "layers", dict(sorted(layers.items())))

  @classmethod
  def select(cls, names: Iterable[str], enabled: Iterable[str], *,
             config: Optional[LayerQuantConfig] = None) -> "QuantPlan":
    """Plan over `names` where exactly the layers in `enabled` quantize.

    Args:
      names: all layer names the plan covers.
      enabled: the names to quantize (a subset of `names`).
      config: formats for every layer (default `LayerQuantConfig()`); its
        `enabled` flag is overridden.
    """
    names = list(names)
    enabled = set(enabled)
    unknown = sorted(enabled - set(names))
    if unknown:
      _validation.fail("enabled", unknown, f"a subset of {names}")
    config = config or LayerQuantConfig()
    return cls({n: dataclasses.replace(config, enabled=n in enabled)
                for n in names})

  def __getitem__(self, name: str) -> LayerQuantConfig:
    return self.layers[name]

  def __iter__(self):
    return iter(self.layers)

  def __len__(self):
    return len(self.layers)

  def enabled_layers(self):
    """Sorted names of the layers that quantize."""
    return [n for n, c in self.layers.items() if c.quantizes]

  def to_dict(self) -> Dict[str, Dict[str, object]]:
    """JSON-friendly form (for logs and checkpoints)."""
    return {n: c.to_dict() for n, c in self.layers.items()}

  @classmethod
  def from_dict(cls, d: Mapping[str, Mapping[str, object]]) -> "QuantPlan":
    return cls({n: LayerQuantConfig.from_dict(c) for n, c in d.items()})

"""Quantized compute: stochastic quantizers and per-layer quantized Keras layers.

See docs/QUANTIZATION.md.
"""

from dpquant_tf._layer_kinds import layer_kind
from dpquant_tf._layer_kinds import layer_macs
from dpquant_tf.quantization._formats import BITS_RANGE
from dpquant_tf.quantization._formats import format_levels
from dpquant_tf.quantization._formats import QuantFormat
from dpquant_tf.quantization._formats import Rounding
from dpquant_tf.quantization._formats import ScaleMode
from dpquant_tf.quantization._layers import LayerKind
from dpquant_tf.quantization._layers import QuantizedLayer
from dpquant_tf.quantization._model import execution_report
from dpquant_tf.quantization._model import get_plan
from dpquant_tf.quantization._model import LayerInfo
from dpquant_tf.quantization._model import quantizable_layers
from dpquant_tf.quantization._model import quantize_model
from dpquant_tf.quantization._model import quantized_layers
from dpquant_tf.quantization._model import set_plan
from dpquant_tf.quantization._plan import LayerQuantConfig
from dpquant_tf.quantization._plan import QuantPlan
from dpquant_tf.quantization._precision import hardware_accelerated
from dpquant_tf.quantization._precision import Precision
from dpquant_tf.quantization._precision import to_bfloat16
from dpquant_tf.quantization._quantizers import example_axes
from dpquant_tf.quantization._quantizers import quantization_scale
from dpquant_tf.quantization._quantizers import quantize
from dpquant_tf.quantization._validate import fix_model
from dpquant_tf.quantization._validate import UnsupportedModelError
from dpquant_tf.quantization._validate import validate_model

__all__ = [
    "BITS_RANGE",
    "LayerInfo",
    "LayerKind",
    "LayerQuantConfig",
    "Precision",
    "QuantFormat",
    "QuantPlan",
    "QuantizedLayer",
    "Rounding",
    "ScaleMode",
    "UnsupportedModelError",
    "example_axes",
    "fix_model",
    "format_levels",
    "execution_report",
    "get_plan",
    "hardware_accelerated",
    "layer_kind",
    "layer_macs",
    "quantizable_layers",
    "quantization_scale",
    "quantize",
    "quantize_model",
    "quantized_layers",
    "set_plan",
    "to_bfloat16",
    "validate_model",
]

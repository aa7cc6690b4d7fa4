"""Quantized compute: stochastic quantizers and per-layer quantized Keras layers.

See docs/QUANTIZATION.md.
"""

from dpquant_tf.quantization._formats import BITS_RANGE
from dpquant_tf.quantization._formats import format_levels
from dpquant_tf.quantization._formats import QuantFormat
from dpquant_tf.quantization._formats import Rounding
from dpquant_tf.quantization._formats import ScaleMode
from dpquant_tf.quantization._quantizers import example_axes
from dpquant_tf.quantization._quantizers import quantization_scale
from dpquant_tf.quantization._quantizers import quantize

__all__ = [
    "BITS_RANGE",
    "QuantFormat",
    "Rounding",
    "ScaleMode",
    "example_axes",
    "format_levels",
    "quantization_scale",
    "quantize",
]

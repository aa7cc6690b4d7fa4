"""Named presets: quantization formats and schedule policies by name.

Public names: `FormatPreset`, `layer_config`, `PolicyName`, `make_policy`.
"""

from dpquant_tf.presets._presets import FormatPreset
from dpquant_tf.presets._presets import layer_config
from dpquant_tf.presets._presets import make_policy
from dpquant_tf.presets._presets import PolicyName

__all__ = [
    "FormatPreset",
    "PolicyName",
    "layer_config",
    "make_policy",
]

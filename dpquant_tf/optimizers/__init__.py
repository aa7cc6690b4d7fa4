"""DP optimizers with quantized per-example gradients (TF-Privacy classes)."""

from dpquant_tf.optimizers._adamw import DPQuantAdamWOptimizer
from dpquant_tf.optimizers._dp_quant import DPQuantAdamOptimizer
from dpquant_tf.optimizers._dp_quant import DPQuantOptimizer
from dpquant_tf.optimizers._dp_quant import PerExampleMethod
from dpquant_tf.optimizers._guards import UnrecordedUpdateError
from dpquant_tf.privacy._mechanisms import SensitivityMode

__all__ = [
    "DPQuantAdamOptimizer",
    "DPQuantAdamWOptimizer",
    "DPQuantOptimizer",
    "PerExampleMethod",
    "SensitivityMode",
    "UnrecordedUpdateError",
]

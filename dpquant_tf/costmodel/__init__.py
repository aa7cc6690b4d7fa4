"""DPQuant's theoretical cost model (Gao et al., arXiv:2509.03472, section 5).

The modelled speed-up of a run from the per-layer MACs of the plans it ran.
MACs come from `dpquant_tf.quantization.quantizable_layers` (the library's one
MAC counter). Public names: `LayerCost`, `EpochCost`, `DEFAULT_SPEEDUPS`,
`cost_model_time`, `epoch_cost`, `format_key`, `layer_costs`,
`model_layer_costs` (with `attention_costs`: the attention products), `plan_to_dict`, `run_speedup`, `speedup_for`, and for
native execution precisions `BF16_HARDWARE_SPEEDUP`, `native_speedups`,
`run_hardware_speedup` (EpochCost.hardware_speedup / native_layers /
simulated_layers); `StepTimeCallback` measures each epoch's step time.
"""

from dpquant_tf.costmodel._costmodel import attention_costs
from dpquant_tf.costmodel._costmodel import BF16_HARDWARE_SPEEDUP
from dpquant_tf.costmodel._costmodel import cost_model_time
from dpquant_tf.costmodel._costmodel import DEFAULT_SPEEDUPS
from dpquant_tf.costmodel._costmodel import epoch_cost
from dpquant_tf.costmodel._costmodel import EpochCost
from dpquant_tf.costmodel._costmodel import format_key
from dpquant_tf.costmodel._costmodel import layer_costs
from dpquant_tf.costmodel._costmodel import LayerCost
from dpquant_tf.costmodel._costmodel import model_layer_costs
from dpquant_tf.costmodel._costmodel import native_speedups
from dpquant_tf.costmodel._costmodel import plan_to_dict
from dpquant_tf.costmodel._costmodel import run_hardware_speedup
from dpquant_tf.costmodel._costmodel import run_speedup
from dpquant_tf.costmodel._costmodel import speedup_for
from dpquant_tf.costmodel._timing import StepTimeCallback

__all__ = [
    "BF16_HARDWARE_SPEEDUP",
    "DEFAULT_SPEEDUPS",
    "EpochCost",
    "LayerCost",
    "StepTimeCallback",
    "attention_costs",
    "cost_model_time",
    "epoch_cost",
    "format_key",
    "layer_costs",
    "model_layer_costs",
    "native_speedups",
    "plan_to_dict",
    "run_hardware_speedup",
    "run_speedup",
    "speedup_for",
]

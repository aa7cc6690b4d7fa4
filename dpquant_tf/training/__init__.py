"""The owned entry and training step (``make_private``, ``DPTraining``)."""

from dpquant_tf.training._entry import DPTraining
from dpquant_tf.training._entry import make_private
from dpquant_tf.training._entry import planned_analysis_count
from dpquant_tf.training._step import install_dp_train_step
from dpquant_tf.training._step import owned_train_step
from dpquant_tf.training._step import per_example_loss
from dpquant_tf.training._step import prepare_first_step

__all__ = [
    "DPTraining",
    "install_dp_train_step",
    "make_private",
    "owned_train_step",
    "per_example_loss",
    "planned_analysis_count",
    "prepare_first_step",
]

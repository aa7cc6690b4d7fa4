"""Model builders: TF-Privacy tutorial CNN, ResNets with GroupNorm (no BatchNorm)."""

from dpquant_tf.models._models import ModelName
from dpquant_tf.models._models import build_model
from dpquant_tf.models._models import resnet18_gn
from dpquant_tf.models._models import small_resnet_gn
from dpquant_tf.models._models import tutorial_cnn

__all__ = [
    "ModelName",
    "build_model",
    "resnet18_gn",
    "small_resnet_gn",
    "tutorial_cnn",
]

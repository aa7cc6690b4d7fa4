"""Model builders: TF-Privacy tutorial CNN, ResNets with GroupNorm (no BatchNorm),
a BERT-like transformer encoder classifier."""

from dpquant_tf.models._models import ModelName
from dpquant_tf.models._models import build_model
from dpquant_tf.models._models import resnet18_gn
from dpquant_tf.models._models import small_resnet_gn
from dpquant_tf.models._models import tutorial_cnn
from dpquant_tf.models._transformer import MaskedMeanPooling
from dpquant_tf.models._transformer import MultiHeadDotProductAttention
from dpquant_tf.models._transformer import PaddingMask
from dpquant_tf.models._transformer import PositionIds
from dpquant_tf.models._transformer import TRANSFORMER_PRESETS
from dpquant_tf.models._transformer import TransformerConfig
from dpquant_tf.models._transformer import transformer_classifier

__all__ = [
    "MaskedMeanPooling",
    "ModelName",
    "MultiHeadDotProductAttention",
    "PaddingMask",
    "PositionIds",
    "TRANSFORMER_PRESETS",
    "TransformerConfig",
    "build_model",
    "resnet18_gn",
    "small_resnet_gn",
    "transformer_classifier",
    "tutorial_cnn",
]

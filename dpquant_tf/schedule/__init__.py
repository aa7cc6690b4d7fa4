"""Dynamic quantization schedule: policies, the DP loss-sensitivity estimator, the callback.

See docs/SCHEDULE.md and Contract 4 in docs/DESIGN.md.
"""

from dpquant_tf.schedule._base import BitsTarget
from dpquant_tf.schedule._base import Decision
from dpquant_tf.schedule._base import Policy
from dpquant_tf.schedule._base import Releases
from dpquant_tf.schedule._base import SensitivityRelease
from dpquant_tf.schedule._base import deserialize_policy
from dpquant_tf.schedule._base import serialize_policy
from dpquant_tf.schedule._bits import BitRampPolicy
from dpquant_tf.schedule._bits import BitsPolicy
from dpquant_tf.schedule._bits import CombinedPolicy
from dpquant_tf.schedule._bits import DepthBitsPolicy
from dpquant_tf.schedule._bits import NormAdaptiveBitsPolicy
from dpquant_tf.schedule._bits import RampMode
from dpquant_tf.schedule._estimator import LossSensitivityEstimator
from dpquant_tf.schedule._estimator import clip_per_example
from dpquant_tf.schedule._scheduler import DPQuantScheduler
from dpquant_tf.schedule._selection import LossAwarePolicy
from dpquant_tf.schedule._selection import RotationPolicy
from dpquant_tf.schedule._selection import StaticPolicy

__all__ = [
    "BitRampPolicy",
    "BitsPolicy",
    "BitsTarget",
    "CombinedPolicy",
    "DPQuantScheduler",
    "Decision",
    "DepthBitsPolicy",
    "LossAwarePolicy",
    "LossSensitivityEstimator",
    "NormAdaptiveBitsPolicy",
    "Policy",
    "RampMode",
    "Releases",
    "RotationPolicy",
    "SensitivityRelease",
    "StaticPolicy",
    "clip_per_example",
    "deserialize_policy",
    "serialize_policy",
]

"""dpquant_tf: differentially private training in Keras with dynamic per-layer quantization.

Importing this package switches ``tf.keras`` to Keras 2 (tf-keras) when
TensorFlow has not been imported yet, and refuses a process where Keras 3 is
already active (see ``dpquant_tf/_env.py``). That is its only side effect.

Subpackages (the architecture, one concern each):

* ``dpquant_tf.quantization``: quantizer formats and quantized Keras layers.
* ``dpquant_tf.privacy``: DP mechanisms, the privacy ledger, calibration,
  Poisson sampling, the privacy callback.
* ``dpquant_tf.optimizers``: ``DPQuantOptimizer`` / ``DPQuantAdamOptimizer``.
* ``dpquant_tf.perexample``: fast per-example gradients from layer taps.
* ``dpquant_tf.schedule``: quantization policies, the DP loss-sensitivity
  estimator, the ``DPQuantScheduler`` callback.
* ``dpquant_tf.data``, ``dpquant_tf.models``: offline datasets, model builders.
* ``dpquant_tf.distribute``: ``tf.distribute`` support.
* ``dpquant_tf.training``: the owned entry ``make_private`` and the owned
  train step every DP step goes through.
* ``dpquant_tf.export``: ``export_for_serving``, a deterministic SavedModel.
"""

from dpquant_tf import _env

_env.setup()

# pylint: disable=g-import-not-at-top,wrong-import-position
from dpquant_tf._version import __version__
from dpquant_tf.export import export_for_serving
from dpquant_tf.optimizers import DPQuantAdamOptimizer
from dpquant_tf.optimizers import DPQuantOptimizer
from dpquant_tf.optimizers import PerExampleMethod
from dpquant_tf.perexample import tap_model
from dpquant_tf.privacy import Accountant
from dpquant_tf.privacy import calibrate_noise_multiplier
from dpquant_tf.privacy import poisson_dataset
from dpquant_tf.privacy import PrivacyCallback
from dpquant_tf.privacy import PrivacyLedger
from dpquant_tf.privacy import SamplingMethod
from dpquant_tf.privacy import SensitivityMode
from dpquant_tf.quantization import fix_model
from dpquant_tf.quantization import get_plan
from dpquant_tf.quantization import LayerQuantConfig
from dpquant_tf.quantization import QuantFormat
from dpquant_tf.quantization import QuantizedLayer
from dpquant_tf.quantization import QuantPlan
from dpquant_tf.quantization import quantizable_layers
from dpquant_tf.quantization import quantize_model
from dpquant_tf.quantization import Rounding
from dpquant_tf.quantization import set_plan
from dpquant_tf.quantization import validate_model
from dpquant_tf.schedule import BitRampPolicy
from dpquant_tf.schedule import CombinedPolicy
from dpquant_tf.schedule import DepthBitsPolicy
from dpquant_tf.schedule import DPQuantScheduler
from dpquant_tf.schedule import LossAwarePolicy
from dpquant_tf.schedule import LossSensitivityEstimator
from dpquant_tf.schedule import NormAdaptiveBitsPolicy
from dpquant_tf.schedule import RotationPolicy
from dpquant_tf.schedule import StaticPolicy
from dpquant_tf.training import DPTraining
from dpquant_tf.training import install_dp_train_step
from dpquant_tf.training import make_private

__all__ = [
    "Accountant",
    "BitRampPolicy",
    "CombinedPolicy",
    "DPQuantAdamOptimizer",
    "DPQuantOptimizer",
    "DPQuantScheduler",
    "DPTraining",
    "DepthBitsPolicy",
    "LayerQuantConfig",
    "LossAwarePolicy",
    "LossSensitivityEstimator",
    "NormAdaptiveBitsPolicy",
    "PerExampleMethod",
    "PrivacyCallback",
    "PrivacyLedger",
    "QuantFormat",
    "QuantPlan",
    "QuantizedLayer",
    "RotationPolicy",
    "Rounding",
    "SamplingMethod",
    "SensitivityMode",
    "StaticPolicy",
    "__version__",
    "calibrate_noise_multiplier",
    "export_for_serving",
    "fix_model",
    "get_plan",
    "install_dp_train_step",
    "make_private",
    "poisson_dataset",
    "quantizable_layers",
    "quantize_model",
    "set_plan",
    "tap_model",
    "validate_model",
]

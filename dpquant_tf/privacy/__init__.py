"""Privacy mechanisms, the privacy ledger, calibration and sampling."""

from dpquant_tf.privacy._accounting import Accountant
from dpquant_tf.privacy._events import EventTableOverflowError
from dpquant_tf.privacy._events import UnknownSamplingProbabilityError
from dpquant_tf.privacy._ledger import EventKind
from dpquant_tf.privacy._ledger import PrivacyLedger
from dpquant_tf.privacy._ledger import SamplingMethod
from dpquant_tf.privacy._mechanisms import SensitivityMode
from dpquant_tf.privacy._mechanisms import add_gaussian_noise
from dpquant_tf.privacy._mechanisms import clip_per_example
from dpquant_tf.privacy._mechanisms import quantization_error_bound
from dpquant_tf.privacy._mechanisms import quantize_per_example
from dpquant_tf.privacy._mechanisms import quantize_update

__all__ = [
    "Accountant",
    "EventKind",
    "EventTableOverflowError",
    "PrivacyLedger",
    "SamplingMethod",
    "SensitivityMode",
    "UnknownSamplingProbabilityError",
    "add_gaussian_noise",
    "clip_per_example",
    "quantization_error_bound",
    "quantize_per_example",
    "quantize_update",
]

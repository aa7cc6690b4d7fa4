"""Privacy mechanisms, the privacy ledger, calibration and sampling."""

from dpquant_tf.privacy._accounting import Accountant
from dpquant_tf.privacy._calibration import calibrate_noise_multiplier
from dpquant_tf.privacy._calibration import planned_epsilon
from dpquant_tf.privacy._calibration import planned_steps
from dpquant_tf.privacy._callback import budget_guards
from dpquant_tf.privacy._callback import BudgetExceededError
from dpquant_tf.privacy._callback import PrivacyCallback
from dpquant_tf.privacy._events import EventTableOverflowError
from dpquant_tf.privacy._events import gaussian_event
from dpquant_tf.privacy._events import sampled_gaussian_event
from dpquant_tf.privacy._events import UnknownSamplingProbabilityError
from dpquant_tf.privacy._independence import check_batch_independence
from dpquant_tf.privacy._ledger import EventKind
from dpquant_tf.privacy._ledger import PrivacyLedger
from dpquant_tf.privacy._ledger import SamplingMethod
from dpquant_tf.privacy._mechanisms import SensitivityMode
from dpquant_tf.privacy._model_checks import check_model_privacy
from dpquant_tf.privacy._model_checks import UnsupportedModelError
from dpquant_tf.privacy._sampling import poisson_dataset
from dpquant_tf.privacy._sampling import poisson_max_batch_size
from dpquant_tf.privacy._sampling import steps_per_epoch
from dpquant_tf.privacy._mechanisms import add_gaussian_noise
from dpquant_tf.privacy._mechanisms import clip_per_example
from dpquant_tf.privacy._mechanisms import quantization_error_bound
from dpquant_tf.privacy._mechanisms import quantize_per_example
from dpquant_tf.privacy._mechanisms import quantize_update

__all__ = [
    "Accountant",
    "BudgetExceededError",
    "EventKind",
    "EventTableOverflowError",
    "PrivacyCallback",
    "PrivacyLedger",
    "SamplingMethod",
    "SensitivityMode",
    "UnknownSamplingProbabilityError",
    "UnsupportedModelError",
    "add_gaussian_noise",
    "budget_guards",
    "calibrate_noise_multiplier",
    "check_batch_independence",
    "check_model_privacy",
    "clip_per_example",
    "gaussian_event",
    "planned_epsilon",
    "planned_steps",
    "poisson_dataset",
    "poisson_max_batch_size",
    "quantization_error_bound",
    "quantize_per_example",
    "quantize_update",
    "sampled_gaussian_event",
    "steps_per_epoch",
]

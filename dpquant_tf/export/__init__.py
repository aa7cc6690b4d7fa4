"""Serving export: a deterministic SavedModel of a trained model.

``export_for_serving(model, path, precision="float32" | "bfloat16")`` writes a
SavedModel with a ``serving_default`` signature that any TensorFlow process can
load (``tf.saved_model.load``) without importing dpquant_tf. The export holds
the trained weights only: quantization wrappers and per-example taps are
removed (the training plan never runs at serving time), and no optimizer
state, noise generator, privacy ledger or schedule statistic is reachable.
"""

from dpquant_tf.export._saved_model import check_export_path
from dpquant_tf.export._saved_model import export_for_serving
from dpquant_tf.export._saved_model import inference_model
from dpquant_tf.export._saved_model import SIGNATURE_KEY
from dpquant_tf.export._saved_model import TEXT_SIGNATURE_KEY

__all__ = [
    "SIGNATURE_KEY",
    "TEXT_SIGNATURE_KEY",
    "check_export_path",
    "export_for_serving",
    "inference_model",
]

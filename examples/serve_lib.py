"""SavedModel export for serving, and prediction from an exported model.

The export holds only what inference needs: the model's weights and a
``serving_default`` signature ``images -> probabilities`` (softmax of the
logits). It carries no optimizer state (slots, iteration counter, noise
generator), no privacy ledger and no schedule statistics (loss-sensitivity
estimates, gradient norms): the model is rebuilt from its config, quantized
layers are replaced by the layers they wrap (full-precision inference), and
only the weights are copied, so nothing else is reachable from the saved
object graph.

Serving from the command line (prints the probabilities of one input)::

  saved_model_cli show --dir /tmp/dpquant_export --tag_set serve \
      --signature_def serving_default
  saved_model_cli run --dir /tmp/dpquant_export --tag_set serve \
      --signature_def serving_default \
      --input_exprs 'images=np.zeros((1,28,28,1),np.float32)'
"""

from typing import Dict, Optional

import numpy as np

import dpquant_tf  # noqa: F401  (Keras 2 switch before TensorFlow)
from dpquant_tf import _validation

__all__ = ["SIGNATURE_KEY", "export_for_serving", "inference_model",
           "load_for_serving", "predict", "saved_variable_names", "serve_main"]

SIGNATURE_KEY = "serving_default"


def inference_model(model, *, precision: str = "float32"):
  """A plain copy of `model` holding only its weights (``dpquant_tf.export``).

  Quantization wrappers and per-example taps are removed (full-precision,
  deterministic inference); no optimizer, quantizer switches, generator state
  or training statistics are copied.
  """
  from dpquant_tf import export  # pylint: disable=g-import-not-at-top
  return export.inference_model(model, precision=precision)


def export_for_serving(model, export_dir: str, *, precision: str = "float32",
                       overwrite: bool = False, tokenizer=None) -> str:
  """Saves a serving SavedModel of `model` at `export_dir` (atomically).

  The library's ``dpquant_tf.export_for_serving`` with this example's
  signature: ``images`` (float32) -> ``probabilities`` (softmax of the
  logits); text models (integer inputs) take ``token_ids`` (int32) instead.

  Args:
    model: the trained Keras model (returns logits).
    export_dir: target directory: absent or empty (``overwrite`` replaces a
      non-empty one).
    precision: "float32" or "bfloat16" (inference precision).
    overwrite: replace an existing export.
    tokenizer: text models: a public tokenizer
      (``dpquant_tf.data.public_tokenizer``); the export then also serves raw
      strings (signature ``serve_texts``: ``texts`` -> ``probabilities``).

  Returns:
    `export_dir`.

  Example:
    >>> export_for_serving(model, "/tmp/dpquant_export")
    >>> probs = predict("/tmp/dpquant_export", images)
  """
  text = bool(model.inputs) and model.inputs[0].dtype.is_integer
  return dpquant_tf.export_for_serving(
      model, export_dir, precision=precision,
      input_name="token_ids" if text else "images",
      output="probabilities", overwrite=overwrite, tokenizer=tokenizer)


def load_for_serving(export_dir: str):
  """Loads the ``serving_default`` concrete function of an export."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  loaded = tf.saved_model.load(export_dir)
  fn = loaded.signatures[SIGNATURE_KEY]
  fn._dpquant_keepalive = loaded  # pylint: disable=protected-access
  return fn


def predict(export_dir: str, images: np.ndarray, *, batch_size: int = 256,
            serving_fn=None) -> np.ndarray:
  """Class probabilities for `images` from an exported SavedModel.

  Args:
    export_dir: a directory written by :func:`export_for_serving`.
    images: float images (N, H, W, C), scaled as in training.
    batch_size: inference batch size.
    serving_fn: an already loaded signature (skips loading).

  Returns:
    float32 array (N, num_classes).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  batch_size = _validation.check_int("batch_size", batch_size, low=1)
  fn = serving_fn or load_for_serving(export_dir)
  images = np.asarray(images, np.float32)
  outs = [fn(images=tf.constant(images[i:i + batch_size]))["probabilities"].numpy()
          for i in range(0, len(images), batch_size)]
  return np.concatenate(outs, axis=0)


def saved_variable_names(export_dir: str) -> Dict[str, tuple]:
  """Names and shapes of every variable stored in an export (for audits)."""
  import os  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  prefix = os.path.join(export_dir, "variables", "variables")
  return {name: tuple(shape) for name, shape in tf.train.list_variables(prefix)
          if name != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def serve_main(export_dir: str, dataset: str = "mnist", *, num_examples: int = 10,
               max_test: Optional[int] = None) -> Dict[str, float]:
  """Loads an export, predicts the first test images of `dataset`, prints them."""
  from dpquant_tf import data as dp_data  # pylint: disable=g-import-not-at-top
  ds = dp_data.load_dataset(dataset, max_test=max_test)
  probs = predict(export_dir, ds.x_test)
  pred = probs.argmax(axis=1)
  for i in range(min(num_examples, len(pred))):
    print(f"example {i}: predicted {pred[i]} (p={probs[i, pred[i]]:.3f}), "
          f"label {ds.y_test[i]}")
  acc = float((pred == ds.y_test).mean())
  print(f"SavedModel accuracy on {len(pred)} test images: {acc:.4f}")
  return {"accuracy": acc, "num_examples": len(pred)}

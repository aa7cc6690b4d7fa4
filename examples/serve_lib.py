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


def inference_model(model):
  """Returns a plain copy of `model` holding only its weights (no optimizer).

  Layers wrapped by ``dpquant_tf.quantization.QuantizedLayer`` are replaced by
  the layers they wrap, so the copy serves the trained weights in full
  precision: quantization is a training-time compute saving, and stochastic
  rounding would make predictions random. The copy has no optimizer, no
  quantizer switches or rounding-generator state, and no training statistics.

  Args:
    model: a trained Functional or Sequential ``tf.keras.Model`` (quantized by
      ``quantize_model`` or not).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from dpquant_tf.quantization import QuantizedLayer  # pylint: disable=g-import-not-at-top
  pairs = []

  def clone_fn(layer):
    source = layer.layer if isinstance(layer, QuantizedLayer) else layer
    new = source.__class__.from_config(source.get_config())
    pairs.append((source, new))
    return new

  clone = tf.keras.models.clone_model(model, clone_function=clone_fn)
  for source, new in pairs:
    new.set_weights(source.get_weights())
  return clone


class _Servable:
  """Builds the tf.Module that is saved: the model and its signature."""

  def __init__(self, model):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    self.module = tf.Module(name="dpquant_servable")
    self.module.model = model
    spec = tf.TensorSpec([None, *model.input_shape[1:]], tf.float32, name="images")
    if model.inputs[0].dtype.is_integer:   # text models: token ids
      spec = tf.TensorSpec([None, *model.input_shape[1:]], tf.int32,
                           name="token_ids")

    def serve(inputs):
      logits = model(inputs, training=False)
      return {"probabilities": tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)}

    # The signature's input is named like the spec (images or token_ids).
    self.module.serve = tf.function(
        (lambda images: serve(images)) if spec.name == "images"
        else (lambda token_ids: serve(token_ids)), input_signature=[spec])


def export_for_serving(model, export_dir: str) -> str:
  """Saves a serving SavedModel of `model` at `export_dir`.

  Args:
    model: the trained Keras model (returns logits).
    export_dir: target directory (created; an existing SavedModel is replaced).

  Returns:
    `export_dir`.

  Example:
    >>> export_for_serving(model, "/tmp/dpquant_export")
    >>> probs = predict("/tmp/dpquant_export", images)
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  _validation.check_type("export_dir", export_dir, str, "a directory path")
  servable = _Servable(inference_model(model))
  tf.saved_model.save(servable.module, export_dir,
                      signatures={SIGNATURE_KEY: servable.module.serve})
  return export_dir


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

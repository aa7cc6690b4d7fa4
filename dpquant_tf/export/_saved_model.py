"""export_for_serving: atomic, deterministic SavedModel export for serving.

Formal behaviour:

* The saved graph is a plain Keras copy of the model: every
  ``QuantizedLayer`` is replaced by the layer it wraps and every per-example
  ``TappedLayer`` by its layer (with its activation), so serving is
  deterministic (no stochastic rounding) and runs no training plan. Only the
  weights are copied; nothing else of the training run is in the object graph.
* ``precision="float32"`` serves the trained weights unchanged;
  ``"bfloat16"`` stores the weights in bfloat16 and computes in bfloat16 (the
  signature still takes and returns float32).
* The write is atomic: the SavedModel is written to a temporary directory next
  to ``path`` and renamed at the end. On failure the temporary directory is
  removed and the error says what failed; ``path`` is untouched.
"""

import enum
import os
import shutil
import tempfile
from typing import Optional

import tensorflow as tf

from dpquant_tf import _validation

__all__ = ["Output", "SIGNATURE_KEY", "TEXT_SIGNATURE_KEY", "ServingPrecision", "check_export_path",
           "export_for_serving", "inference_model"]

SIGNATURE_KEY = "serving_default"
# Raw strings in, for exports given a tokenizer.
TEXT_SIGNATURE_KEY = "serve_texts"


class ServingPrecision(enum.Enum):
  FLOAT32 = "float32"
  BFLOAT16 = "bfloat16"


class Output(enum.Enum):
  """What the signature returns: the model's outputs, or their softmax."""
  LOGITS = "logits"
  PROBABILITIES = "probabilities"


def check_export_path(path: str, *, name: str = "path",
                      overwrite: bool = False) -> str:
  """Refuses an export path that cannot take a new SavedModel; returns it.

  Accepted: an absent path whose parent exists (or can be created) and is
  writable, or an empty directory (or, with ``overwrite``, any directory).
  Refused (``ValueError`` naming ``name``): a file, a non-empty directory, an
  unwritable or non-directory parent. Nothing is created.
  """
  _validation.check_type(name, path, (str, os.PathLike), "a directory path")
  path = os.fspath(path)
  if not path:
    _validation.fail(name, path, "a non-empty directory path")
  full = os.path.abspath(os.path.expanduser(path))
  if os.path.exists(full):
    if not os.path.isdir(full):
      _validation.fail(name, path, "a directory, but it is an existing file")
    if os.listdir(full) and not overwrite:
      _validation.fail(name, path, "an empty or absent directory, but it "
                       "holds files (remove them or choose another path)")
    if not os.access(full, os.W_OK | os.X_OK):
      _validation.fail(name, path, "a writable directory")
  parent = os.path.dirname(full)
  ancestor = parent
  while not os.path.exists(ancestor):
    ancestor = os.path.dirname(ancestor)
  if not os.path.isdir(ancestor):
    _validation.fail(name, path, f"under a directory, but {ancestor!r} is a file")
  if not os.access(ancestor, os.W_OK | os.X_OK):
    _validation.fail(name, path, f"in a writable directory ({ancestor!r} is "
                     "not writable)")
  return path


def _plain_layer(layer):
  """(source of the weights, a fresh plain copy) of one layer."""
  # Imported here: the quantization and perexample packages import Keras
  # layers; export only needs the two wrapper classes.
  from dpquant_tf.perexample import TappedLayer  # pylint: disable=g-import-not-at-top
  from dpquant_tf.quantization import QuantizedLayer  # pylint: disable=g-import-not-at-top
  activation = None
  source = layer
  while isinstance(source, (QuantizedLayer, TappedLayer)):
    if isinstance(source, TappedLayer) and source.activation is not None:
      activation = source.activation
    source = source.layer
  config = dict(source.get_config())
  if activation is not None:
    config["activation"] = tf.keras.activations.serialize(activation)
  return source, config


def inference_model(model, *, precision=ServingPrecision.FLOAT32):
  """A plain Keras copy of `model` with its weights, for inference only.

  Args:
    model: a built Sequential or Functional ``tf.keras.Model`` (quantized by
      ``quantize_model`` and/or tapped by ``tap_model``, or not).
    precision: ``"float32"`` or ``"bfloat16"`` (weights and compute).

  Returns:
    The copy (not compiled): no optimizer, no quantizer switches, no
    generator state.
  """
  precision = _validation.check_enum("precision", precision, ServingPrecision)
  _check_graph_model(model)
  pairs = []

  def clone_fn(layer):
    if isinstance(layer, tf.keras.Model) and getattr(layer, "_is_graph_network",
                                                     False):
      return inference_model(layer, precision=precision)
    source, config = _plain_layer(layer)
    if precision is ServingPrecision.BFLOAT16:
      config["dtype"] = "bfloat16"
    new = source.__class__.from_config(config)
    pairs.append((source, new))
    return new

  clone = tf.keras.models.clone_model(model, clone_function=clone_fn)
  for source, new in pairs:
    weights = source.get_weights()
    if weights:
      new.set_weights([w.astype(v.dtype.as_numpy_dtype) for w, v in
                       zip(weights, new.weights)])
  return clone


def _check_graph_model(model) -> None:
  if not isinstance(model, tf.keras.Model):
    _validation.fail("model", model, "a tf.keras.Model", TypeError)
  if not getattr(model, "_is_graph_network", False) and not isinstance(
      model, tf.keras.Sequential):
    _validation.fail("model", model, "a Sequential or Functional model "
                     "(a subclassed model cannot be cloned for export)",
                     TypeError)
  if not model.built:
    _validation.fail("model", model, "a built model (call it or fit it first)")


def _servable(model, input_name: str, output: Output, tokenizer=None):
  module = tf.Module(name="dpquant_servable")
  module.model = model
  # Token ids stay integers (int32, as Embedding takes them); other inputs
  # are float32.
  in_dtype = (tf.int32 if model.inputs and model.inputs[0].dtype.is_integer
              else tf.float32)
  spec = tf.TensorSpec([None, *model.input_shape[1:]], in_dtype,
                       name=input_name)

  def predict(inputs):
    out = tf.cast(model(inputs, training=False), tf.float32)
    if output is Output.PROBABILITIES:
      out = tf.nn.softmax(out, axis=-1)
    return {output.value: out}

  module.serve = tf.function(predict, input_signature=[spec])
  if tokenizer is not None:
    module.tokenizer = tokenizer   # tracks a TextVectorization's lookup table

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string,
                                                name="texts")])
    def serve_texts(texts):
      return predict(tf.cast(tokenizer(texts), tf.int32))

    module.serve_texts = serve_texts
  return module


def _check_tokenizer(tokenizer, model):
  """A tokenizer's ids fit the model: int ids of its input length, in range."""
  if not callable(tokenizer):
    _validation.fail("tokenizer", tokenizer, "a callable raw strings -> token "
                     "ids (dpquant_tf.data.public_tokenizer)", TypeError)
  if not (model.inputs and model.inputs[0].dtype.is_integer
          and len(model.input_shape) == 2):
    _validation.fail("tokenizer", tokenizer, "None for a model whose input is "
                     f"not token ids [B, T] (input {model.input_shape})")
  try:
    probe = tokenizer(tf.constant(["a b c"]))
  except Exception as e:  # pylint: disable=broad-except
    _validation.fail("tokenizer", tokenizer, "a callable that tokenizes a "
                     f"tf.string batch (it raised {type(e).__name__}: {e})")
  if not probe.dtype.is_integer or probe.shape.rank != 2 or (
      probe.shape[1] != model.input_shape[1]):
    _validation.fail("tokenizer", tokenizer, "integer ids [B, "
                     f"{model.input_shape[1]}] (the model's input length); it "
                     f"gives {probe.dtype.name}{probe.shape}")


def export_for_serving(model, path: str, *, precision="float32",
                       input_name: str = "inputs", output="logits",
                       overwrite: bool = False, tokenizer=None) -> str:
  """Writes a deterministic serving SavedModel of `model` to `path`.

  Args:
    model: the trained Sequential or Functional ``tf.keras.Model``.
    path: target directory: absent, or empty (or any directory with
      ``overwrite=True``: it is then replaced as a whole).
    precision: ``"float32"`` (the trained weights as they are) or
      ``"bfloat16"`` (weights stored and computed in bfloat16).
    input_name: name of the signature's one input (float32; int32 for a
      model whose input is integer token ids).
    output: ``"logits"`` (the model's output) or ``"probabilities"``
      (its softmax); the signature's output key is this name.
    overwrite: replace an existing non-empty directory.
    tokenizer: for a token-id model, a tokenizer that learned nothing from
      private data (``dpquant_tf.data.public_tokenizer``: a declared
      vocabulary or hashing). The export then also has a ``serve_texts``
      signature: ``texts`` (tf.string ``[B]``) -> the same output.

  Returns:
    `path`.

  Raises:
    ValueError/TypeError: a bad argument or path (before any work).
    OSError: writing failed; the partial export has been removed and the
      message says what failed.

  Example:
    >>> dpquant_tf.export_for_serving(model, "/tmp/m", output="probabilities")
    >>> serve = tf.saved_model.load("/tmp/m").signatures["serving_default"]
    >>> serve(inputs=tf.zeros([1, 28, 28, 1]))["probabilities"]
  """
  _check_graph_model(model)
  precision = _validation.check_enum("precision", precision, ServingPrecision)
  output = _validation.check_enum("output", output, Output)
  _validation.check_type("input_name", input_name, str, "a string")
  if not input_name.isidentifier():
    _validation.fail("input_name", input_name, "a Python identifier")
  _validation.check_type("overwrite", overwrite, bool, "a bool")
  if tokenizer is not None:
    _check_tokenizer(tokenizer, model)
  path = check_export_path(path, name="path", overwrite=overwrite)
  full = os.path.abspath(os.path.expanduser(path))
  parent = os.path.dirname(full)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(full)}.partial-",
                         dir=parent)
  old: Optional[str] = None
  try:
    module = _servable(inference_model(model, precision=precision), input_name,
                       output, tokenizer)
    signatures = {SIGNATURE_KEY: module.serve}
    if tokenizer is not None:
      signatures[TEXT_SIGNATURE_KEY] = module.serve_texts
    tf.saved_model.save(module, tmp, signatures=signatures)
    if os.path.isdir(full):
      if os.listdir(full):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(full)}.old-",
                               dir=parent)
        os.rmdir(old)
        os.rename(full, old)
      else:
        os.rmdir(full)
    os.rename(tmp, full)
  except BaseException as e:  # clean up on anything, wrap only errors
    shutil.rmtree(tmp, ignore_errors=True)
    if old is not None and not os.path.exists(full):
      os.rename(old, full)
      old = None
    if not isinstance(e, Exception):
      raise
    raise OSError(f"export_for_serving: writing the SavedModel to {path!r} "
                  f"failed ({type(e).__name__}: {e}); the partial export was "
                  "removed.") from e
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
  return path

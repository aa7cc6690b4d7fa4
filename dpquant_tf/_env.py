"""Environment set-up that must happen before TensorFlow is imported.

dpquant_tf runs on Keras 2 (the `tf-keras` package): TF-Privacy's optimizers
subclass `tf.keras.optimizers.legacy.*`, and Keras 3's train step never hands
per-example losses to the optimizer. This module

* sets ``TF_USE_LEGACY_KERAS=1`` before TensorFlow is first imported, so that
  ``tf.keras`` resolves to tf-keras;
* sets ``sys.skip_tf_privacy_import`` so that TF-Privacy's top-level
  ``__init__`` (which imports the removed ``tensorflow_estimator``) is skipped,
  and only the submodules dpquant_tf needs are imported. So that a later
  ``import tensorflow_privacy`` is not an empty module, its top-level names
  (``tensorflow_privacy.DPKerasSGDOptimizer``, ``GaussianSumQuery``,
  ``compute_dp_sgd_privacy_statement``...) are resolved on first access from
  the submodules TF-Privacy's own ``__init__`` names (``_lazy_tf_privacy``);
  a name whose submodule cannot be imported in this environment (the
  estimator- and TF1-based ones: ``DNNClassifier``, ``v1``) raises an
  ``AttributeError`` that says why;
* refuses, with a message that says what to do, a process in which TensorFlow
  was already imported with Keras 3 active, or a Python other than 3.11.

It is the package's only import-time side effect.
"""

import os
import sys

SUPPORTED_PYTHON = (3, 11)


class EnvironmentError_(ImportError):  # pylint: disable=invalid-name
  """Raised when the process cannot run dpquant_tf (Keras 3 active, wrong Python)."""


def _check_python() -> None:
  if tuple(sys.version_info[:2]) != SUPPORTED_PYTHON:
    raise EnvironmentError_(
        f"dpquant_tf needs Python {SUPPORTED_PYTHON[0]}.{SUPPORTED_PYTHON[1]} "
        f"(tensorflow-privacy 0.9.0 requires Python < 3.12); got "
        f"Python {sys.version_info[0]}.{sys.version_info[1]}. Create the "
        "virtualenv with python3.11 (see README.md).")


def _legacy_keras_requested() -> bool:
  return os.environ.get("TF_USE_LEGACY_KERAS", "").strip().lower() in (
      "1", "true", "yes")


def _keras_major_in_use() -> int:
  """Returns the major version of the Keras that `tf.keras` resolves to."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  # tf.keras is a lazy loader that reads TF_USE_LEGACY_KERAS on first access;
  # tf-keras modules are named `tf_keras...`, Keras 3's `keras._tf_keras...`.
  return 2 if tf.keras.__name__.startswith("tf_keras") else 3


def _tf_privacy_names(source: str) -> dict:
  """{name: submodule} from TF-Privacy's ``from X import Y`` lines."""
  import re  # pylint: disable=g-import-not-at-top
  names = {}
  for module, name in re.findall(
      r"^\s+from (tensorflow_privacy[\w.]*) import (\w+)", source, re.M):
    names[name] = module
  return names


def _lazy_tf_privacy() -> None:
  """Gives the (skipped) top-level ``tensorflow_privacy`` its names lazily."""
  import importlib  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec("tensorflow_privacy")
  if spec is None or spec.origin is None:
    return
  tfp = importlib.import_module("tensorflow_privacy")  # version only: cheap
  if hasattr(tfp, "__getattr__"):
    return
  with open(spec.origin, encoding="utf-8") as f:
    names = _tf_privacy_names(f.read())

  def __getattr__(name):  # pylint: disable=invalid-name
    if name not in names:
      raise AttributeError(f"module 'tensorflow_privacy' has no attribute "
                           f"{name!r}")
    module = names[name]
    try:
      if module == "tensorflow_privacy":  # a subpackage: `from . import v1`
        value = importlib.import_module(f"{module}.{name}")
      else:
        parent = importlib.import_module(module)
        value = (getattr(parent, name) if hasattr(parent, name) else
                 importlib.import_module(f"{module}.{name}"))
    except ImportError as e:
      raise AttributeError(
          f"tensorflow_privacy.{name} is unavailable in this environment "
          f"({names[name]} fails to import: {e}); dpquant_tf skips "
          "TF-Privacy's top-level import, which needs tensorflow_estimator "
          "(removed in TF 2.16+).") from e
    setattr(tfp, name, value)
    return value

  tfp.__getattr__ = __getattr__
  tfp.__dir__ = lambda: sorted(set(vars(tfp)) | set(names))


def setup() -> None:
  """Prepares the process for dpquant_tf; idempotent."""
  _check_python()
  # TF-Privacy's top-level __init__ imports tensorflow_estimator, gone in TF 2.21.
  sys.skip_tf_privacy_import = True
  _lazy_tf_privacy()
  value = os.environ.get("TF_USE_LEGACY_KERAS")
  if value is not None and not _legacy_keras_requested():
    raise EnvironmentError_(
        f"dpquant_tf needs Keras 2 (tf-keras), but TF_USE_LEGACY_KERAS="
        f"{value!r} asks for Keras 3. Unset it or set TF_USE_LEGACY_KERAS=1.")
  os.environ["TF_USE_LEGACY_KERAS"] = "1"
  if "tensorflow" not in sys.modules:
    return
  # TensorFlow is already imported: tf.keras may already be bound to Keras 3.
  if _keras_major_in_use() != 2:
    raise EnvironmentError_(
        "dpquant_tf needs Keras 2 (tf-keras), but TensorFlow was already "
        "imported with Keras 3 active (tf.keras is Keras 3). Import dpquant_tf "
        "before tensorflow, or set TF_USE_LEGACY_KERAS=1 in the environment "
        "before starting Python.")

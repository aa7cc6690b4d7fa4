"""Shared pytest set-up: quiet TensorFlow, Keras 2 before anything imports TF."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dpquant_tf  # noqa: E402,F401  (switches tf.keras to Keras 2 first)
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_keras_session():
  """Each test starts from a clean Keras graph/name state."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.keras.backend.clear_session()
  yield

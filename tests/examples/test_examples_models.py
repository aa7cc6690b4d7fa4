"""Tests of dpquant_tf.models: shapes, Functional, no BatchNorm, per-example independence."""

import numpy as np
import pytest
import tensorflow as tf

from dpquant_tf import models


def _has_batchnorm(model):
  return any(isinstance(l, tf.keras.layers.BatchNormalization) for l in model.layers)


def test_tutorial_cnn_matches_tf_privacy_tutorial():
  m = models.tutorial_cnn((28, 28, 1), 10)
  kinds = [(type(l).__name__, getattr(l, "filters", getattr(l, "units", None)))
           for l in m.layers[1:]]
  assert kinds == [("Conv2D", 16), ("MaxPooling2D", None), ("Conv2D", 32),
                   ("MaxPooling2D", None), ("Flatten", None), ("Dense", 32),
                   ("Dense", 10)]
  assert m.get_layer("conv1").kernel_size == (8, 8) and m.get_layer("conv1").strides == (2, 2)
  assert m.get_layer("conv2").padding == "valid"
  assert m.count_params() == 26010
  assert m.output_shape == (None, 10)


@pytest.mark.parametrize("name,shape,n_quant", [
    ("cnn", (28, 28, 1), 4), ("small_resnet", (28, 28, 1), 10),
    ("resnet18", (32, 32, 3), 21)])
def test_models_functional_no_batchnorm(name, shape, n_quant):
  m = models.build_model(name, shape, 10)
  assert isinstance(m, tf.keras.Model) and not isinstance(m, tf.keras.Sequential)
  assert m._is_graph_network  # Functional  # pylint: disable=protected-access
  assert not _has_batchnorm(m)
  n = sum(isinstance(l, (tf.keras.layers.Conv2D, tf.keras.layers.Dense)) for l in m.layers)
  assert n == n_quant
  if name == "resnet18":
    assert 11.0e6 < m.count_params() < 11.4e6
    assert any(isinstance(l, tf.keras.layers.GroupNormalization) for l in m.layers)


def test_small_resnet_examples_are_independent():
  """No batch statistics: an example's logits do not depend on the rest of the batch."""
  m = models.small_resnet_gn((16, 16, 1), 10)
  x = np.random.default_rng(0).random((4, 16, 16, 1)).astype(np.float32)
  full = m(x, training=True).numpy()
  alone = m(x[:1], training=True).numpy()
  np.testing.assert_allclose(full[:1], alone, rtol=1e-5, atol=1e-5)


def test_bad_arguments():
  with pytest.raises(ValueError, match="Expected model='vgg'"):
    models.build_model("vgg", (28, 28, 1), 10)
  with pytest.raises(ValueError, match="at least 16x16"):
    models.tutorial_cnn((8, 8, 1), 10)
  with pytest.raises(ValueError, match="Expected num_classes=1"):
    models.tutorial_cnn((28, 28, 1), 1)

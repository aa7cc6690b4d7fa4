"""validate_model reports every DP problem at once; fix_model replaces BatchNorm."""

import dpquant_tf  # noqa: F401  (Keras 2 before TensorFlow)
import numpy as np
import pytest
import tensorflow as tf

from dpquant_tf import quantization as dq

L = tf.keras.layers


def _bn_model():
  inp = tf.keras.Input((6, 6, 2))
  h = L.Conv2D(8, 3, name="conv")(inp)
  h = L.BatchNormalization(name="bn1")(h)
  h = L.ReLU()(h)
  inner = tf.keras.Sequential([tf.keras.Input((4, 4, 8)), L.BatchNormalization(name="bn2")],
                              name="inner")
  h = inner(h)
  h = L.Flatten()(h)
  return tf.keras.Model(inp, L.Dense(3, name="head")(h))


def test_reports_every_problem_at_once():
  model = _bn_model()
  problems = dq.validate_model(model, strict=False)
  assert len(problems) == 2
  assert "'bn1'" in problems[0] and "'bn2'" in problems[1]
  assert all("GroupNormalization" in p for p in problems)
  with pytest.raises(dq.UnsupportedModelError, match=r"2 problem\(s\)[\s\S]*bn1[\s\S]*bn2"):
    dq.validate_model(model)
  assert dq.validate_model(dq.quantize_model(
      tf.keras.Sequential([tf.keras.Input((3,)), L.Dense(2)]))) == []


def _row0_under_change(model, x, training):
  y = x.copy()
  y[1:] = y[1:] * 30.0 + 5.0
  a = model(x, training=training).numpy()[0]
  b = model(y, training=training).numpy()[0]
  return np.array_equal(a, b)


def test_fix_model_replaces_batchnorm_and_restores_independence():
  model = _bn_model()
  x = np.random.RandomState(0).standard_normal((4, 6, 6, 2)).astype(np.float32)
  # BatchNorm in training mode couples examples ...
  assert not _row0_under_change(model, x, training=True)
  fixed = dq.fix_model(model)
  assert dq.validate_model(fixed) == []
  kinds = [type(l).__name__ for l in fixed.layers]
  assert "BatchNormalization" not in kinds and "GroupNormalization" in kinds
  gn = fixed.get_layer("bn1_groupnorm")
  assert gn.groups == 8 and gn.axis in (-1, 3)
  np.testing.assert_array_equal(fixed.get_layer("conv").get_weights()[0],
                                model.get_layer("conv").get_weights()[0])
  np.testing.assert_array_equal(gn.gamma.numpy(), model.get_layer("bn1").gamma.numpy())
  # ... GroupNorm does not.
  assert _row0_under_change(fixed, x, training=True)
  with pytest.raises(ValueError, match=r"Expected groups=3 to be a divisor of the 8 channels"):
    dq.fix_model(model, groups=3)
  assert dq.fix_model(model, groups=2).get_layer("bn1_groupnorm").groups == 2


def test_refuses_range_tracking_tfmot_quantizers():
  import tensorflow_model_optimization as tfmot  # pylint: disable=g-import-not-at-top
  base = tf.keras.Sequential([tf.keras.Input((5,)), L.Dense(3, activation="relu"),
                              L.BatchNormalization(), L.Dense(2)])
  qat = tfmot.quantization.keras.quantize_model(
      tf.keras.Sequential([tf.keras.Input((5,)), L.Dense(3, activation="relu"),
                           L.Dense(2)]))
  problems = dq.validate_model(qat, strict=False)
  assert any("AllValuesQuantizer on its input" in p for p in problems)
  assert sum("MovingAverageQuantizer" in p for p in problems) == 2
  with pytest.raises(dq.UnsupportedModelError, match="MovingAverageQuantizer"):
    dq.validate_model(qat)
  assert len(dq.validate_model(base, strict=False)) == 1

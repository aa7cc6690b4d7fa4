"""Guards of the DP step through the public API (docs/METHOD.md section 4).

Issue "Close eleven attacks": a loss of shape [1] passed the loss check (4),
raw apply_gradients was accepted (5), get_config stored the initial q (10).
"""

import numpy as np
import pytest
import tensorflow as tf

from dpquant_tf import training
from dpquant_tf.optimizers import DPQuantOptimizer
from dpquant_tf.optimizers import UnrecordedUpdateError
from tests.optimizers._helpers import make_data as _data
from tests.optimizers._helpers import make_loss as _loss
from tests.optimizers._helpers import make_model as _model


class _BatchMeanLoss(tf.keras.losses.Loss):
  """Reduction NONE in name only: keeps the batch mean, shape [1]."""

  def __init__(self):
    super().__init__(reduction=tf.keras.losses.Reduction.NONE)

  def call(self, y_true, y_pred):
    per_example = _loss()(y_true, y_pred)
    return tf.reduce_mean(per_example, keepdims=True)


class _PairMeanLoss(tf.keras.losses.Loss):
  """One entry per pair of examples: shape [B / 2]."""

  def __init__(self):
    super().__init__(reduction=tf.keras.losses.Reduction.NONE)

  def call(self, y_true, y_pred):
    per_example = _loss()(y_true, y_pred)
    return tf.reduce_mean(tf.reshape(per_example, [-1, 2]), axis=1)


@pytest.mark.parametrize("loss", [_BatchMeanLoss, _PairMeanLoss])
def test_loss_without_one_entry_per_example_is_refused_under_fit(loss):
  x, y = _data(16)
  model = _model()
  opt = DPQuantOptimizer(1.0, 1.0, dataset_size=16)
  model.compile(optimizer=opt, loss=loss())
  training.install_dp_train_step(model)
  before = [w.numpy() for w in model.weights]
  with pytest.raises((ValueError, tf.errors.InvalidArgumentError),
                     match="one entry per input example"):
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
  for a, b in zip(before, model.weights):
    np.testing.assert_array_equal(a, b.numpy())
  assert opt.dp_event_steps() == 0


def test_rank_two_loss_is_refused():
  x, y = _data(8)
  model = _model()
  opt = DPQuantOptimizer(1.0, 1.0, dataset_size=8)
  with tf.GradientTape() as tape:
    loss = tf.stack([_loss()(y, model(x))] * 2, axis=1)  # [B, 2]
  with pytest.raises(ValueError, match="Expected loss=.*per-example loss"):
    opt.dp_step(model, x, loss, tape)


def test_raw_apply_gradients_is_refused_after_a_dp_step_and_when_fresh():
  x, y = _data(16)
  model = _model()
  opt = DPQuantOptimizer(1.0, 1.0, dataset_size=16)
  model.compile(optimizer=opt, loss=_loss(), jit_compile=False)
  training.install_dp_train_step(model)
  model.fit(x, y, batch_size=8, epochs=1, verbose=0)
  with tf.GradientTape() as tape:
    raw_loss = tf.reduce_mean(_loss()(y, model(x)))
  raw = tape.gradient(raw_loss, model.trainable_variables)
  before = [w.numpy() for w in model.trainable_variables]
  steps = opt.dp_event_steps()
  with pytest.raises(RuntimeError, match="Expected grads_and_vars="):
    opt.apply_gradients(zip(raw, model.trainable_variables))
  apply = tf.function(lambda: opt.apply_gradients(
      zip(raw, model.trainable_variables)))
  with pytest.raises(RuntimeError, match="DP step"):
    apply()
  for a, b in zip(before, model.trainable_variables):
    np.testing.assert_array_equal(a, b.numpy())
  assert opt.dp_event_steps() == steps
  fresh = DPQuantOptimizer(1.0, 1.0)
  with pytest.raises(UnrecordedUpdateError, match="unrecorded update"):
    fresh.apply_gradients(zip(raw, model.trainable_variables))
  for a, b in zip(before, model.trainable_variables):
    np.testing.assert_array_equal(a, b.numpy())


def test_dp_gradients_apply_once_and_not_after_modification():
  x, y = _data(8)
  model = _model()
  model(x)
  opt = DPQuantOptimizer(1.0, 0.5, dataset_size=8)
  with tf.GradientTape() as tape:
    loss = _loss()(y, model(x))
  with opt._bind(model, x):
    pairs = opt._compute_gradients(loss, model.trainable_variables, tape=tape)
  with pytest.raises(RuntimeError, match="DP step"):
    opt.apply_gradients([(2.0 * g, v) for g, v in pairs])
  opt.apply_gradients(pairs)  # the DP step's own output: fine, once
  with pytest.raises(RuntimeError, match="DP step"):
    opt.apply_gradients(pairs)
  assert opt.dp_event_steps() == 1


def test_get_config_stores_the_current_sampling_probability():
  x, y = _data(8)
  opt = DPQuantOptimizer(1.0, 1.0, sampling_probability=0.01)
  opt.set_sampling_probability(0.2)
  assert opt.get_config()["sampling_probability"] == 0.2
  assert DPQuantOptimizer(1.0, 1.0).get_config()["sampling_probability"] is (
      None)
  again = DPQuantOptimizer.from_config(opt.get_config())
  model = _model()
  assert again.get_config()["sampling_probability"] == 0.2
  model.compile(optimizer=again, loss=_loss())
  training.install_dp_train_step(model)
  model.fit(x, y, batch_size=8, epochs=1, verbose=0)
  # fit's arrays are not the library's sampler: a declared q is not trusted.
  (event, count), = again.dp_events()
  assert (event.sampling_probability, count) == (1.0, 1)

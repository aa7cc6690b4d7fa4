"""The first epoch's fixed cost (issue 24 item 1): `fit` traces the owned
train step once. tf.function traces a function a second time when its first
trace created variables (the optimizer's weights, the compiled metrics), and
the DP step's trace is most of a first epoch."""

import numpy as np
import pytest
import tensorflow as tf

import dpquant_tf  # noqa: F401  (Keras 2 switch before TensorFlow)
from dpquant_tf import privacy
from dpquant_tf import quantization
from dpquant_tf import training
from dpquant_tf.optimizers import DPQuantAdamOptimizer
from dpquant_tf.optimizers import DPQuantOptimizer

N = 256


def _data(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(N, 6)).astype("float32")
  return x, (x[:, 0] > 0).astype("int32")


def _loss():
  return tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                       reduction="none")


def _model():
  tf.keras.utils.set_random_seed(0)
  return quantization.quantize_model(tf.keras.Sequential([
      tf.keras.layers.Dense(8, activation="tanh", input_shape=(6,)),
      tf.keras.layers.Dense(2)]), fixed_structure=True)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_make_private_fit_traces_the_train_step_once(optimizer):
  x, y = _data()
  run = training.make_private(
      _model(), x, y, target_epsilon=8.0, delta=1e-5, epochs=2,
      batch_size=32, loss=_loss(), optimizer=optimizer,
      metrics=["accuracy"])
  history = run.fit(verbose=0)
  assert run.model.train_function.experimental_get_tracing_count() == 1
  # The metrics built before the trace are the ones the step updates.
  assert 0.0 <= history.history["accuracy"][-1] <= 1.0
  assert run.model.metrics_names == ["loss", "accuracy"]


def test_prepare_first_step_before_a_users_own_fit():
  x, y = _data()
  ledger = privacy.PrivacyLedger(
      sampling_method=privacy.SamplingMethod.POISSON, dataset_size=N)
  model = _model()
  model.compile(optimizer=DPQuantAdamOptimizer(
      l2_norm_clip=1.0, noise_multiplier=1.0, ledger=ledger,
      sampling_probability=32 / N, expected_batch_size=32.0,
      learning_rate=1e-2), loss=_loss(), metrics=["accuracy"])
  training.install_dp_train_step(model)
  data = privacy.poisson_dataset(x, y, 32 / N)
  training.prepare_first_step(model, data)
  weights = len(model.optimizer.weights)
  assert weights > 0   # iterations, hypers, slots and bit widths exist
  model.fit(data, epochs=1, verbose=0)
  assert model.train_function.experimental_get_tracing_count() == 1
  assert len(model.optimizer.weights) == weights


def test_prepare_first_step_refuses_what_it_cannot_read():
  model = _model()
  model.compile(optimizer=DPQuantOptimizer(
      l2_norm_clip=1.0, noise_multiplier=1.0, learning_rate=0.1),
      loss=_loss())
  with pytest.raises(ValueError, match="data"):
    training.prepare_first_step(model, np.zeros((4, 6), np.float32))
  uncompiled = _model()
  with pytest.raises(ValueError, match="model"):
    training.prepare_first_step(uncompiled, tf.data.Dataset.from_tensors(
        (np.zeros((4, 6), np.float32), np.zeros((4,), np.int32))))

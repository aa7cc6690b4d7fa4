"""Quantized (QuantizedLayer) models and the DPQuantScheduler callback under
MirroredStrategy (logical CPU devices)."""

import dpquant_tf
import numpy as np
import tensorflow as tf

from dpquant_tf import optimizers
from dpquant_tf import quantization
from dpquant_tf import schedule
from tests.distribute import _helpers


def test_schedule_callback_assigns_bits_under_mirrored_strategy():
  x, y = _helpers.data(n=8, d_out=3)
  strategy = _helpers.mirrored(2)
  with strategy.scope():
    base = tf.keras.Sequential([
        tf.keras.layers.Dense(6, activation="relu", input_shape=(5,)),
        tf.keras.layers.Dense(3)])
    model = quantization.quantize_model(base)
    optimizer = optimizers.DPQuantOptimizer(
        l2_norm_clip=1.0, noise_multiplier=0.5, learning_rate=0.1,
        dataset_size=80, seed=1)
    model.compile(optimizer=optimizer, loss=_helpers.per_example_mse())
  ramp = schedule.BitRampPolicy(b_start=2, b_end=8, epochs=2)
  scheduler_cls = getattr(schedule, "DPQuantScheduler", None)
  if scheduler_cls is None:  # not exported yet
    from dpquant_tf.schedule import _scheduler  # pylint: disable=g-import-not-at-top
    scheduler_cls = _scheduler.DPQuantScheduler
  callback = scheduler_cls(ramp, seed=0)
  history = model.fit(x, y, batch_size=8, epochs=2, verbose=0,
                      callbacks=[callback])
  bits = [set(e["gradient_bits"].values()) for e in callback.history]
  assert bits == [{2}, {8}]
  assert set(optimizer.gradient_bits().values()) == {8}
  assert np.all(np.isfinite(history.history["loss"]))
  assert optimizer.dp_event_steps() == 2


def test_wrapped_model_under_two_replicas_equals_one_device():
  """A QuantizedLayer model (taps, quantization off): one device and 2 local
  replicas (each layer called once per replica in one trace, taps kept per
  replica) give the same update: no tap is mixed across replicas."""
  x, y = _helpers.data(n=8, d_out=3)
  deltas = []
  for r in (1, 2):
    strategy = _helpers.mirrored(r)
    with strategy.scope():
      tf.keras.utils.set_random_seed(0)
      base = tf.keras.Sequential([
          tf.keras.layers.Dense(6, activation="tanh", input_shape=(5,)),
          tf.keras.layers.Dense(3)])
      model = quantization.quantize_model(base)
      names = [l.name for l in quantization.quantizable_layers(model)]
      quantization.set_plan(model, quantization.QuantPlan.select(names, []))
      optimizer = optimizers.DPQuantOptimizer(
          l2_norm_clip=0.3, noise_multiplier=0.0, learning_rate=1.0, seed=1)
      model.compile(optimizer=optimizer, loss=_helpers.per_example_mse())
    dpquant_tf.install_dp_train_step(model)
    before = [w.numpy().copy() for w in model.trainable_variables]
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    deltas.append([w.numpy() - b
                   for w, b in zip(model.trainable_variables, before)])
  for a, b in zip(*deltas):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  assert max(np.abs(d).max() for d in deltas[0]) > 1e-3


class _RunningMean(tf.keras.layers.Layer):
  """Keeps the batch mean in a non-trainable variable (leaks it)."""

  def build(self, shape):
    self.mean = self.add_weight("mean", shape=shape[1:], trainable=False,
                                initializer="zeros")

  def call(self, x, training=None):
    if training:
      self.mean.assign(tf.reduce_mean(x, axis=0))
    return x


def test_model_check_works_on_mirrored_variables():
  """The model check traces models built under a strategy (MirroredVariable
  handles exist only per component): a quantized CNN passes, batch state is
  still found."""
  from dpquant_tf import models  # pylint: disable=g-import-not-at-top
  from dpquant_tf.privacy import _model_checks  # pylint: disable=g-import-not-at-top
  strategy = _helpers.mirrored(2)
  with strategy.scope():
    cnn = quantization.quantize_model(models.tutorial_cnn())
    leaky = tf.keras.Sequential([tf.keras.layers.Dense(4, input_shape=(6,)),
                                 _RunningMean(name="running_mean")])
    assert _model_checks.model_privacy_problems(cnn) == []
    problems = _model_checks.model_privacy_problems(leaky)
  assert len(problems) == 1 and "running_mean" in problems[0], problems

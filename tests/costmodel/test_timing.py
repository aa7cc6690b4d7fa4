"""StepTimeCallback: what each of its times counts."""

import time

import numpy as np
import pytest

import dpquant_tf  # noqa: F401  (Keras 2 switch before TensorFlow)
import tensorflow as tf

from dpquant_tf import costmodel


class _SlowEpochStart(tf.keras.callbacks.Callback):
  """Stands in for an analysis at the epoch start (before the timer)."""

  def on_epoch_begin(self, epoch, logs=None):
    time.sleep(0.3 if epoch == 0 else 0.1)


def test_epoch_wall_counts_epoch_start_work_that_epoch_time_does_not():
  model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(2)])
  model.compile("sgd", "mse")
  timer = costmodel.StepTimeCallback()
  x = np.zeros((8, 4), np.float32)
  y = np.zeros((8, 2), np.float32)
  history = model.fit(x, y, batch_size=4, epochs=3, verbose=0,
                      callbacks=[_SlowEpochStart(), timer])
  walls = [h["epoch_wall_s"] for h in timer.history]
  times = [h["epoch_time_s"] for h in timer.history]
  assert [h["steps"] for h in timer.history] == [2, 2, 2]
  for wall, spent, pause in zip(walls, times, (0.3, 0.1, 0.1)):
    assert wall >= spent + pause
  # The callback writes every time into the epoch's logs.
  assert history.history["epoch_wall_s"] == pytest.approx(walls)
  assert history.history["epoch_time_s"] == pytest.approx(times)


class _SlowEpochEnd(tf.keras.callbacks.Callback):
  """Stands in for epoch-end work (the epsilon, a schedule) before the timer."""

  def on_epoch_end(self, epoch, logs=None):
    time.sleep(0.4)


def test_step_time_does_not_count_epoch_end_work():
  """Epoch-end work of callbacks that run before the timer (the library's
  privacy callback and scheduler do, about 50 ms each) is in the epoch's
  times, not in ``step_time_s``: with 4 steps of an epoch it would add
  a third of it to each step. Fails if the step time runs to the epoch end."""
  model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(2)])
  model.compile("sgd", "mse")
  timer = costmodel.StepTimeCallback()
  x = np.zeros((16, 4), np.float32)
  y = np.zeros((16, 2), np.float32)
  model.fit(x, y, batch_size=4, epochs=2, verbose=0,
            callbacks=[_SlowEpochEnd(), timer])
  for h in timer.history:
    assert h["steps"] == 4
    assert h["epoch_time_s"] >= 0.4
    assert h["step_time_s"] < 0.1, h

"""Shared pieces of the distribute tests: strategies, tiny models, updates."""

import dpquant_tf
import numpy as np
import pytest
import tensorflow as tf



def mirrored(num_replicas):
  """A MirroredStrategy over `num_replicas` logical CPUs (1: default strategy).

  Uses ReductionToOneDevice: collective all-reduce groups of different sizes
  collide (same group key) when several strategies live in one process.
  """
  if num_replicas == 1:
    return tf.distribute.get_strategy()
  # Imported here: importing it configures logical CPU devices, which must not
  # happen in a multi-worker process before the strategy is created.
  from tests.distribute import conftest  # pylint: disable=g-import-not-at-top
  if conftest.AVAILABLE_CPU_DEVICES < num_replicas:
    pytest.fail(f"needs {num_replicas} logical CPU devices, the runtime has "
                f"{conftest.AVAILABLE_CPU_DEVICES}: run tests/distribute in "
                "its own pytest process")
  return tf.distribute.MirroredStrategy(
      [f"/cpu:{i}" for i in range(num_replicas)],
      cross_device_ops=tf.distribute.ReductionToOneDevice())


def per_example_mse():
  return tf.keras.losses.MeanSquaredError(reduction=tf.losses.Reduction.NONE)


def one_step_update(strategy, make_optimizer, x, y, *, units, use_bias=True,
                    kernel_initializer="glorot_uniform", seed=0, steps=1):
  """Fits a Dense(units) model `steps` full-batch steps; returns the deltas."""
  with strategy.scope():
    tf.keras.utils.set_random_seed(seed)
    model = tf.keras.Sequential([
        tf.keras.layers.Dense(units, input_shape=(x.shape[1],),
                              use_bias=use_bias,
                              kernel_initializer=kernel_initializer)])
    model.compile(optimizer=make_optimizer(), loss=per_example_mse())
  if hasattr(model.optimizer, "dp_step"):  # DP: the owned train step
    dpquant_tf.install_dp_train_step(model)
  before = [w.copy() for w in model.get_weights()]
  model.fit(x, y, batch_size=len(x), epochs=steps, shuffle=False, verbose=0)
  return [a - b for a, b in zip(model.get_weights(), before)]


def data(n=8, d_in=5, d_out=3, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, d_in)).astype("float32"),
          rng.normal(size=(n, d_out)).astype("float32"))

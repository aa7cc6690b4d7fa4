"""Small data, model and loss shared by the optimizer tests."""

import numpy as np
import tensorflow as tf


def make_data(n=8, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 6)).astype("float32")
  y = rng.integers(0, 3, size=n)
  return x, y


def make_model(seed=0):
  tf.keras.utils.set_random_seed(seed)
  return tf.keras.Sequential([
      tf.keras.layers.Dense(5, activation="tanh", input_shape=(6,)),
      tf.keras.layers.Dense(3)])


def make_loss(reduction="none"):
  return tf.keras.losses.SparseCategoricalCrossentropy(
      from_logits=True, reduction=reduction)

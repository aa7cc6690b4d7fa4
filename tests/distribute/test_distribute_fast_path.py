"""The fast per-example path under MirroredStrategy (2 logical CPU replicas).

Each replica calls every tapped layer once in the shared trace; the taps are
kept per replica, so no layer falls back to the jacobian and the per-example
gradients are those of one device for the same examples.
"""

import logging

import dpquant_tf
import numpy as np
import pytest
import tensorflow as tf

from dpquant_tf import optimizers
from dpquant_tf import perexample
from dpquant_tf import quantization
from tests.distribute import _helpers

L = tf.keras.layers
B = 8
_LOSS = tf.keras.losses.SparseCategoricalCrossentropy(
    from_logits=True, reduction=tf.keras.losses.Reduction.NONE)
MODELS = ("dense_conv", "quantized", "groupnorm")
# Over 10 s on the shared 2-core CPU (tracing two replicas of Keras fit, or of
# the quantizers' format switch): marked slow.
_SLOW = pytest.mark.slow


def _base(kind):
  inp = tf.keras.Input((6, 6, 2))
  x = L.Conv2D(3, 3, padding="same", activation="relu", name="conv")(inp)
  if kind == "groupnorm":
    x = L.GroupNormalization(3, name="gn")(x)
  x = L.Flatten()(x)
  x = L.Dense(5, activation="tanh", name="dense")(x)
  return tf.keras.Model(inp, L.Dense(3, name="logits")(x))


def _model(kind):
  """Built inside the caller's strategy scope, same weights for every kind."""
  tf.keras.utils.set_random_seed(0)
  base = _base(kind)
  if kind == "quantized":
    # Nearest rounding with per-example scales: sharding the batch does not
    # change what any example sees.
    config = quantization.LayerQuantConfig(fwd_bits=4, bwd_bits=4)
    return quantization.quantize_model(base, config=config,
                                       rounding=quantization.Rounding.NEAREST,
                                       seed=3)
  return perexample.tap_model(base)


def _data():
  rng = np.random.default_rng(0)
  return (rng.normal(size=(B, 6, 6, 2)).astype(np.float32),
          rng.integers(0, 3, size=B).astype(np.int32))


def _fallback_lines(caplog):
  return [r.getMessage() for r in caplog.records
          if "jacobian fallback" in r.getMessage()]


@pytest.mark.parametrize("kind", [pytest.param(k, marks=_SLOW) for k in MODELS])
def test_two_replicas_take_the_fast_path_and_equal_one_device(kind, caplog):
  """DPQuantOptimizer fit (sigma 0, a clip that binds): no layer falls back
  under 2 replicas, and the update equals one device's."""
  x, y = _data()
  deltas = []
  for r in (1, 2):
    strategy = _helpers.mirrored(r)
    with strategy.scope():
      model = _model(kind)
      optimizer = optimizers.DPQuantOptimizer(
          l2_norm_clip=0.05, noise_multiplier=0.0, learning_rate=1.0, seed=1)
      model.compile(optimizer=optimizer, loss=_LOSS)
    dpquant_tf.install_dp_train_step(model)
    before = [w.numpy().copy() for w in model.trainable_variables]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      model.fit(x, y, batch_size=B, epochs=2, shuffle=False, verbose=0)
    assert not _fallback_lines(caplog), (r, _fallback_lines(caplog))
    deltas.append([w.numpy() - b
                   for w, b in zip(model.trainable_variables, before)])
  for a, b in zip(*deltas):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
  assert max(np.abs(d).max() for d in deltas[0]) > 1e-3


@pytest.mark.parametrize("kind", ["dense_conv", "groupnorm",
                                  pytest.param("quantized", marks=_SLOW)])
def test_per_replica_per_example_gradients_equal_one_device(kind, caplog):
  """strategy.run: each replica's per_example_gradients on its half of the
  batch, concatenated, equal one device's on the whole batch."""
  x, y = _data()
  strategy = _helpers.mirrored(2)
  with strategy.scope():
    model = _model(kind)
  half = B // 2

  def grads(xs, ys):
    with tf.GradientTape() as tape:
      loss = _LOSS(ys, model(xs, training=True))
    return perexample.per_example_gradients(loss, model.trainable_variables,
                                            tape)

  xs = strategy.experimental_distribute_values_from_function(
      lambda ctx: x[ctx.replica_id_in_sync_group * half:][:half])
  ys = strategy.experimental_distribute_values_from_function(
      lambda ctx: y[ctx.replica_id_in_sync_group * half:][:half])
  with caplog.at_level(logging.WARNING):
    per_replica = tf.function(lambda a, b: strategy.run(grads, (a, b)))(xs, ys)
  assert not _fallback_lines(caplog), _fallback_lines(caplog)
  local = [strategy.experimental_local_results(g) for g in per_replica]
  two = [np.concatenate([t.numpy() for t in g], axis=0) for g in local]
  one = tf.function(grads)(tf.constant(x), tf.constant(y))
  assert len(one) == len(two) == len(model.trainable_variables)
  for a, b in zip(one, two):
    assert b.shape == a.shape
    scale = max(float(np.abs(a.numpy()).max()), 1e-6)
    np.testing.assert_allclose(b / scale, a.numpy() / scale, atol=2e-5)

"""Poisson input under tf.distribute: disjoint shards, global rate q."""

import math

import dpquant_tf
import numpy as np
import pytest
import tensorflow as tf

from dpquant_tf import distribute
from dpquant_tf import optimizers
from tests.distribute import _helpers


def _ids(batch):
  x, _, mask = batch[:3]  # (x, y, mask, seal)
  return x.numpy()[mask.numpy() > 0, 0].astype(int).tolist()


def _dataset(n, q, steps, pipelines, pipeline, replicas, seed):
  x = np.arange(n, dtype=np.float32)[:, None]
  y = np.zeros((n, 1), np.float32)
  fn = distribute.sharded_poisson_dataset_fn(x, y, q, steps=steps, seed=seed)
  return fn(tf.distribute.InputContext(
      num_input_pipelines=pipelines, input_pipeline_id=pipeline,
      num_replicas_in_sync=replicas))


def test_worker_shards_are_disjoint_and_union_is_poisson_at_rate_q():
  n, q, steps = 200, 0.1, 100
  per_step = [[], []]
  for w in range(2):
    for batch in _dataset(n, q, steps, 2, w, 2, seed=10):
      per_step[w].append(_ids(batch))
  counts = np.zeros(n)
  for a, b in zip(*per_step):
    assert not set(a) & set(b)  # an example enters a step at most once
    assert all(i % 2 == 0 for i in a) and all(i % 2 == 1 for i in b)
    counts[a + b] += 1
  total = counts.sum()
  expected = q * n * steps
  assert abs(total - expected) < 5 * math.sqrt(expected * (1 - q))
  # Power: a worker sampling the whole dataset would double the rate.
  assert abs(total - 2 * expected) > 10 * math.sqrt(expected)


def test_local_replicas_split_one_sample():
  """Two local replicas take the two halves of the same Poisson sample."""
  chunks = [_ids(b) for b in _dataset(40, 0.2, 20, 1, 0, 2, seed=3)]
  assert len(chunks) == 40
  for first, second in zip(chunks[0::2], chunks[1::2]):
    assert not set(first) & set(second)


def test_poisson_input_under_mirrored_strategy_trains_with_global_q():
  n, q = 64, 0.125
  x, y = _helpers.data(n=n)
  strategy = _helpers.mirrored(2)
  # Unseeded: a seeded sampler is accounted at q = 1 (no amplification).
  data = distribute.poisson_input(strategy, x, y, q, steps=3)
  with strategy.scope():
    model = tf.keras.Sequential([tf.keras.layers.Dense(3, input_shape=(5,))])
    optimizer = optimizers.DPQuantOptimizer(
        l2_norm_clip=1.0, noise_multiplier=1.0, learning_rate=0.1,
        expected_batch_size=q * n, dataset_size=n)
    model.compile(optimizer=optimizer, loss=_helpers.per_example_mse())
  dpquant_tf.install_dp_train_step(model)
  model.fit(data, epochs=1, steps_per_epoch=3, verbose=0)
  (event, count), = optimizer.dp_events()
  assert count == 3
  assert event.sampling_probability == pytest.approx(q)


def test_realized_batch_check_under_mirrored_strategy():
  """One sampler split over two replicas: its own draws pass, draws with
  every second row dropped (half the rate) stop the run. The expected rows
  are q * N once, not once per replica (the two-worker example, where each
  worker samples its own shard, is the slow test of
  test_distribute_train_example.py)."""
  n, q, steps = 512, 0.125, 8
  x, y = _helpers.data(n=n)
  strategy = _helpers.mirrored(2)

  def fit(halve):
    data = distribute.poisson_input(strategy, x, y, q, steps=steps)
    if halve:
      data = data.map(lambda a, b, w, s: (
          a, b, w * tf.cast(tf.range(tf.shape(w)[0]) % 2, w.dtype), s))
    with strategy.scope():
      model = tf.keras.Sequential([tf.keras.layers.Dense(3, input_shape=(5,))])
      model.compile(optimizer=optimizers.DPQuantOptimizer(
          l2_norm_clip=1.0, noise_multiplier=1.0, learning_rate=0.1,
          expected_batch_size=q * n, dataset_size=n),
                    loss=_helpers.per_example_mse())
    dpquant_tf.install_dp_train_step(model)
    model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0)
    return model

  assert fit(halve=False).optimizer.dp_events()[0][1] == steps
  with pytest.raises(tf.errors.InvalidArgumentError, match="Realized"):
    fit(halve=True)


def test_too_small_shard_is_refused():
  fn = distribute.sharded_poisson_dataset_fn(np.zeros((1, 1)), np.zeros((1,)),
                                             0.5, steps=1)
  with pytest.raises(ValueError, match="at least 2 examples"):
    fn(tf.distribute.InputContext(1, 0, 2))

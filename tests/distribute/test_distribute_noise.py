"""Exact DP-SGD under MirroredStrategy: one global noise draw, global mean."""

import math

import dpquant_tf
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_privacy.privacy.optimizers import dp_optimizer_keras

from dpquant_tf import distribute
from tests.distribute import _factories
from tests.distribute import _helpers

CLIP = _factories.CLIP
SIGMA = _factories.SIGMA


def _noise_only_update(num_replicas, make_optimizer, *, batch=8, units=500):
  """Update of a bias-free Dense fed zeros: pure noise / B (data grad 0)."""
  x = np.zeros((batch, 4), np.float32)
  y = np.zeros((batch, units), np.float32)
  (delta,) = _helpers.one_step_update(
      _helpers.mirrored(num_replicas), make_optimizer, x, y, units=units,
      use_bias=False)
  return -delta.ravel() * batch  # lr = 1: -delta * B is the summed noise


@pytest.mark.parametrize("kind", ["prototype", "dpquant"])
@pytest.mark.parametrize("num_replicas", [1, 2, 4])
def test_total_noise_std_is_sigma_clip(num_replicas, kind):
  noise = _noise_only_update(
      num_replicas, _factories.optimizer(kind, noise_multiplier=SIGMA))
  n = noise.size
  target = SIGMA * CLIP
  ratio = noise.std() / target
  se = 1.0 / math.sqrt(2 * n)  # standard error of a Gaussian sample std ratio
  assert abs(ratio - 1.0) < 5 * se, (num_replicas, ratio, se)
  assert abs(noise.mean()) < 5 * target / math.sqrt(n)
  if num_replicas > 1:
    # Power: the two wrong placements are far outside the acceptance band.
    for wrong in (math.sqrt(num_replicas), 1 / math.sqrt(num_replicas)):
      assert abs(ratio - wrong) > 10 * se, (num_replicas, ratio, wrong)


def test_replicas_draw_independent_noise():
  """Same-noise replicas would give sqrt(R)*sigma*C: rejected above; here
  directly: the two replica shares are uncorrelated."""
  strategy = _helpers.mirrored(2)
  with strategy.scope():
    gen = tf.random.Generator.from_seed(3)

  @tf.function
  def draw():
    return strategy.run(lambda: distribute.add_replica_noise(
        [tf.zeros([4000])], stddev=1.0, generator=gen)[0])

  a, b = [t.numpy() for t in strategy.experimental_local_results(draw())]
  se = 1 / math.sqrt(a.size)
  assert abs(np.corrcoef(a, b)[0, 1]) < 5 * se
  assert abs(a.std() - 1 / math.sqrt(2)) < 5 * se


@pytest.mark.parametrize("kind", _factories.KINDS)
@pytest.mark.parametrize("num_replicas", [2, 4])
def test_noise_free_update_equals_single_device(num_replicas, kind):
  x, y = _helpers.data(n=8)
  make = _factories.optimizer(kind, noise_multiplier=0.0)
  single = _helpers.one_step_update(_helpers.mirrored(1), make, x, y,
                                    units=3, steps=2)
  multi = _helpers.one_step_update(_helpers.mirrored(num_replicas), make, x, y,
                                   units=3, steps=2)
  for s, m in zip(single, multi):
    assert np.abs(s).max() > 1e-3  # the step is not trivial
    np.testing.assert_allclose(m, s, rtol=1e-5, atol=1e-6)


def test_tf_privacy_stock_optimizer_is_wrong_under_mirrored():
  """Documents why the design exists: TF-Privacy's optimizer sums R local
  means (update R times too large) and adds R full noise draws."""
  x, y = _helpers.data(n=8)
  make = lambda: dp_optimizer_keras.DPKerasSGDOptimizer(
      l2_norm_clip=1e6, noise_multiplier=0.0, learning_rate=1.0)
  single = _helpers.one_step_update(_helpers.mirrored(1), make, x, y, units=3)
  double = _helpers.one_step_update(_helpers.mirrored(2), make, x, y, units=3)
  np.testing.assert_allclose(double[0], 2 * single[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["prototype", "dpquant"])
def test_generator_outside_scope_raises(kind):
  strategy = _helpers.mirrored(2)
  optimizer = _factories.optimizer(kind, noise_multiplier=1.0)()  # outside
  x, y = _helpers.data(n=4)
  with strategy.scope():
    model = tf.keras.Sequential([tf.keras.layers.Dense(3, input_shape=(5,))])
    model.compile(optimizer=optimizer, loss=_helpers.per_example_mse())
  if hasattr(optimizer, "dp_step"):  # DP: the owned train step
    dpquant_tf.install_dp_train_step(model)
  with pytest.raises(RuntimeError, match="strategy.scope"):
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)


def test_replica_noise_stddev_and_global_count():
  strategy = _helpers.mirrored(4)

  @tf.function
  def step():
    return strategy.run(lambda: (distribute.replica_noise_stddev(2.0),
                                 distribute.global_example_count(3)))

  std, count = step()
  for s in strategy.experimental_local_results(std):
    assert float(s) == pytest.approx(1.0)
  for c in strategy.experimental_local_results(count):
    assert float(c) == 12.0
  assert distribute.replica_noise_stddev(2.0) == 2.0  # no strategy: R = 1


@pytest.mark.parametrize("wrong", ["full_noise_per_replica",
                                   "noise_split_twice"])
def test_noise_test_rejects_wrong_placements(wrong, monkeypatch):
  """Power: the std test above fails for both wrong placements."""
  from dpquant_tf.distribute import _replica  # pylint: disable=g-import-not-at-top
  if wrong == "full_noise_per_replica":
    monkeypatch.setattr(_replica, "replica_noise_stddev", lambda s: s)
  else:
    monkeypatch.setattr(_replica, "replica_noise_stddev",
                        lambda s: s / _replica.num_replicas_in_sync())
  with pytest.raises(AssertionError):
    test_total_noise_std_is_sigma_clip(2, "prototype")

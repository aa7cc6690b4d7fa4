"""Non-finite contributions are zero (docs/METHOD.md section 4, invariant 9).

Issue "One privacy core" (2): an example with a NaN input gave a NaN
per-example gradient; the clip scale 0 times NaN is NaN, and the weights
became NaN. Padded rows of a Poisson batch copied example 0, so a bad example 0
poisoned steps it was not sampled in.
"""

import numpy as np
import pytest
import tensorflow as tf

import dpquant_tf  # noqa: F401  (Keras 2 first)
from dpquant_tf import perexample
from dpquant_tf import privacy
from dpquant_tf.optimizers import DPQuantOptimizer

N, BAD = 8, 3


def _data():
  rng = np.random.default_rng(0)
  return (rng.normal(size=(N, 6)).astype("float32"),
          rng.integers(0, 3, size=N))


def _model(tapped, norm=False):
  tf.keras.utils.set_random_seed(0)
  model = tf.keras.Sequential([
      tf.keras.layers.Dense(5, activation="tanh", input_shape=(6,))] + (
          [tf.keras.layers.LayerNormalization()] if norm else []) + [
              tf.keras.layers.Dense(3)])
  return perexample.tap_model(model) if tapped else model


def _step(x, y, *, tapped, method="auto", bits=None, weights=None,
          norm=False):
  """Weights after one fit step; noise 0, fixed normalizer (8 examples)."""
  model = _model(tapped, norm)
  opt = DPQuantOptimizer(0.5, 0.0, learning_rate=0.5, expected_batch_size=8.0,
                         gradient_bits=bits, per_example_method=method,
                         seed=0)
  model.compile(optimizer=opt, loss=tf.keras.losses.SparseCategoricalCrossentropy(
      from_logits=True, reduction="none"))
  dpquant_tf.install_dp_train_step(model)
  model.train_on_batch(x, y, sample_weight=weights)
  return [w.numpy() for w in model.trainable_variables]


def test_clip_per_example_zeroes_non_finite_examples_exactly():
  g = np.ones((4, 3), np.float32)
  g[1, 0], g[2, 2] = np.nan, np.inf
  h = np.ones((4,), np.float32)
  h[3] = 1e30  # finite input whose norm overflows float32
  out = privacy.clip_per_example([tf.constant(g), tf.constant(h)], 1.0)
  for t in out:
    assert np.isfinite(t.numpy()).all()
  for i in (1, 2, 3):
    assert not out[0].numpy()[i].any() and out[1].numpy()[i] == 0.0
  norm0 = np.sqrt((out[0].numpy()[0] ** 2).sum() + out[1].numpy()[0] ** 2)
  assert norm0 == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("bits, norm", [(None, False), (None, True),
                                        (24, False)],
                         ids=["ghost_sum", "materialized_sum", "quantized"])
def test_nan_example_contributes_zero_on_the_fast_path(bits, norm):
  """Quantization off: the clipped sum (ghost norms for Dense, materialized
  per-example sums for LayerNormalization); on: materialized per-example
  gradients, quantized (24 bits: grid finer than the tolerance)."""
  x, y = _data()
  bad = x.copy()
  bad[BAD, 2] = np.nan
  keep = np.arange(N) != BAD
  got = _step(bad, y, tapped=True, bits=bits, norm=norm)
  want = _step(x[keep], y[keep], tapped=True, bits=bits, norm=norm)
  before = [w.numpy() for w in _model(True, norm).trainable_variables]
  for g, w, b in zip(got, want, before):
    assert np.isfinite(g).all()
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  assert not np.allclose(got[0], before[0])  # the others still train


def test_nan_example_gives_finite_update_on_the_jacobian_path():
  """TF's autodiff mixes a NaN activation into every row of the jacobian
  (0 * NaN in the backward matmul), so every row is non-finite and is
  zeroed: the release stays finite (the fast path above isolates the bad
  example exactly; see docs/PRIVACY.md)."""
  x, y = _data()
  x[BAD, 2] = np.nan
  for w in _step(x, y, tapped=False, method="jacobian"):
    assert np.isfinite(w).all()


@pytest.mark.parametrize("tapped, method", [(True, "auto"),
                                            (False, "jacobian")],
                         ids=["fast", "jacobian"])
def test_poisson_padding_contributes_zero_whatever_example_zero_holds(
    tapped, method):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(40, 6)).astype("float32")
  y = rng.integers(0, 3, size=40)
  x[0] = np.nan
  ds = privacy.poisson_dataset(x, y, 0.15, 16, steps=50, seed=4)
  for xb, yb, mask, _ in ds:
    xb, yb, mask = xb.numpy(), yb.numpy(), mask.numpy()
    k = int(mask.sum())
    if k < 16 and not np.isnan(xb[:k]).any():
      break
  else:
    pytest.fail("no padded batch without example 0")
  assert not xb[k:].any()  # padding rows are zeros, not copies of example 0
  got = _step(xb, yb, tapped=tapped, method=method, weights=mask)
  want = _step(xb[:k], yb[:k], tapped=tapped, method=method,
               weights=mask[:k])
  for g, w in zip(got, want):
    assert np.isfinite(g).all()
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)

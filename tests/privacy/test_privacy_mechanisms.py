"""Pure mechanisms: clip, quantize, sensitivity, noise scale."""

import math

import numpy as np
import pytest
import tensorflow as tf

from dpquant_tf.privacy import _mechanisms as M


def _worst_case_grads(sizes, clip, n=64):
  """Per-example gradients at norm C along random grid diagonals (every
  coordinate +-C/sqrt(d)), the inputs whose rounding error adds up most."""
  d = sum(sizes)
  rng = np.random.default_rng(0)
  return [tf.constant(rng.choice([-1.0, 1.0], size=(n, s)) * clip /
                      math.sqrt(d), tf.float32) for s in sizes]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_worst_case_contribution_within_sensitivity(bits):
  sizes, clip = [31, 7, 12], 1.5  # d = 50: C/sqrt(d) is off-grid
  var_sizes = sizes
  bits_t = tf.constant([bits] * len(sizes), tf.int32)
  gen = tf.random.Generator.from_seed(1)
  for mode in M.SensitivityMode:
    worst = 0.0
    for _ in range(20):
      g = M.clip_per_example(_worst_case_grads(sizes, clip), clip)
      q = M.quantize_per_example(g, bits_t, clip, gen)
      if mode is M.SensitivityMode.RECLIP:
        q = M.clip_per_example(q, clip)
      norms = np.sqrt(sum(np.sum(t.numpy().astype(np.float64) ** 2, axis=1)
                          for t in q))
      worst = max(worst, norms.max())
    sens = float(M.sensitivity(mode, var_sizes, bits_t, clip,
                               tf.constant(True)).numpy())
    py = (clip if mode is M.SensitivityMode.RECLIP else
          clip + math.sqrt(sum(d * (clip / M.levels_for_bits(bits)) ** 2
                               for d in sizes)))
    assert sens == pytest.approx(py, rel=1e-12)
    ratio = float(M.sensitivity_ratio(mode, var_sizes, bits_t, clip).numpy())
    assert ratio == pytest.approx(py / clip, rel=1e-12)
    assert worst <= sens * (1 + 1e-6), (mode, worst, sens)
    if mode is M.SensitivityMode.BOUND:
      # Quantization does push the norm above C: the bound is needed.
      assert worst > clip * (1 + 1e-3)


def test_quantize_on_grid_unbiased_and_exact_when_off():
  clip = 2.0
  g = [tf.fill([20000, 3], 0.3), tf.fill([20000, 2], -1.1)]
  gen = tf.random.Generator.from_seed(0)
  q = M.quantize_per_example(g, tf.constant([3, 0]), clip, gen)
  levels = M.levels_for_bits(3)
  grid = q[0].numpy() / clip * levels
  np.testing.assert_allclose(grid, np.round(grid), atol=1e-5)
  assert set(np.unique(np.round(grid))) == {0.0, 1.0}  # 0.3*3/2 = 0.45
  se = q[0].numpy().std() / math.sqrt(q[0].numpy().size)
  assert abs(q[0].numpy().mean() - 0.3) < 5 * se
  np.testing.assert_array_equal(q[1].numpy(), g[1].numpy())


def test_clip_matches_tf_clip_by_global_norm():
  rng = np.random.default_rng(2)
  g = [tf.constant(rng.normal(size=(5, 4, 3)), tf.float32),
       tf.constant(rng.normal(size=(5, 3)), tf.float32)]
  out = M.clip_per_example(g, 1.3)
  for i in range(5):
    ref, _ = tf.clip_by_global_norm([g[0][i], g[1][i]], 1.3)
    np.testing.assert_allclose(out[0][i], ref[0], rtol=1e-6)
    np.testing.assert_allclose(out[1][i], ref[1], rtol=1e-6)


def test_noise_twin_deterministic():
  x = [tf.zeros([100, 7]), tf.zeros([13])]
  unit = M.add_gaussian_noise(x, 1.0, tf.random.Generator.from_seed(5))
  scaled = M.add_gaussian_noise(x, 2.7, tf.random.Generator.from_seed(5))
  for u, s in zip(unit, scaled):
    np.testing.assert_allclose(s.numpy(), 2.7 * u.numpy(), rtol=1e-6)


def _scale_consistent(samples: np.ndarray, sigma: float) -> bool:
  """Two-sided test of std == sigma at ~5 standard errors."""
  n = samples.size
  ratio = samples.std() / sigma
  return abs(ratio - 1.0) < 5.0 / math.sqrt(2 * n)


def test_noise_scale_statistical_with_power():
  sigma = 0.8
  noise = M.add_gaussian_noise([tf.zeros([20000])], sigma,
                               tf.random.Generator.from_seed(11))[0].numpy()
  assert _scale_consistent(noise, sigma)
  assert not _scale_consistent(noise, sigma * 2 / 3)
  assert not _scale_consistent(noise, sigma * 3 / 2)


def test_quantize_update_post_processing_grid():
  g = [tf.constant(np.linspace(-1, 1, 101), tf.float32)]
  out = M.quantize_update(g, tf.constant(3), tf.random.Generator.from_seed(0))
  grid = out[0].numpy() / 1.0 * 3
  np.testing.assert_allclose(grid, np.round(grid), atol=1e-5)

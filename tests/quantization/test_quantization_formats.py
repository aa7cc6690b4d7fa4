"""Conformance suite: every quantizer format passes the same tests."""

import dpquant_tf  # noqa: F401  (Keras 2 before TensorFlow)
import numpy as np
import pytest
import tensorflow as tf

from dpquant_tf import quantization as dq
from dpquant_tf.quantization import _formats
from dpquant_tf.quantization import _quantizers

F = dq.QuantFormat
CASES = [(F.INT, 2), (F.INT, 4), (F.INT, 8), (F.FP4_E2M1, 4), (F.FP8_E4M3, 8),
         (F.FP8_E5M2, 8), (F.LUQ_FP4, 4), (F.LUQ_FP4, 3), (F.INT4_SAWB, 4),
         (F.INT4_SAWB, 2)]
IDS = [f"{f.name}-{b}" for f, b in CASES]
N = 2000  # samples per element in the statistical tests


def _row(seed=0, n=48):
  """Values spread over many binades (exercises subnormals and underflow)."""
  rs = np.random.RandomState(seed)
  mags = np.exp(rs.uniform(np.log(1e-4), 0.0, size=n))
  x = (mags * rs.choice([-1.0, 1.0], size=n)).astype(np.float32)
  x[0] = 1.0
  return x


def _grid(fmt, bits, x, scale):
  """Per element: (lo, hi) neighbouring grid values (signed) and the clipped x."""
  p = _formats.grid_params(fmt, bits)
  levels = _formats.format_levels(fmt, bits).astype(np.float32)
  unit = np.where(scale / np.float32(p.fmax) > 0,
                  scale / np.float32(p.fmax), np.float32(1))
  unit = unit.astype(np.float32)
  a = np.minimum(np.abs(x) / unit, np.float32(p.fmax))
  hi_idx = np.clip(np.searchsorted(levels, a, side="left"), 0, len(levels) - 1)
  lo_idx = np.where(levels[hi_idx] == a, hi_idx, np.maximum(hi_idx - 1, 0))
  sign = np.where(x < 0, np.float32(-1), np.float32(1))
  lo = sign * (levels[lo_idx] * unit)
  hi = sign * (levels[hi_idx] * unit)
  clipped = np.clip(x, -scale, scale)
  return lo.astype(np.float32), hi.astype(np.float32), clipped


def _chi2_stat(samples, expected, lo, hi):
  """Sum of squared z-scores of the sample mean (theoretical variance)."""
  span = np.abs(hi - lo).astype(np.float64)
  p = np.where(span > 0, np.abs(expected - lo) / np.where(span > 0, span, 1), 0.0)
  var = p * (1 - p) * span**2
  mean = samples.astype(np.float64).mean(axis=0)
  fixed = var <= 0
  if not np.all(np.abs(mean[fixed] - expected[fixed])
                <= 1e-6 * np.abs(expected[fixed]) + 1e-12):
    return np.inf, int((~fixed).sum())  # an on-grid value did not stay put
  z2 = (mean[~fixed] - expected[~fixed])**2 / (var[~fixed] / samples.shape[0])
  return z2.sum(), int((~fixed).sum())


def _threshold(k):
  return k + 6.0 * np.sqrt(2.0 * k)


def _batch(fmt, bits):
  x = np.tile(_row()[None, :], (N, 1))
  scale = _quantizers.quantization_scale(x, fmt, bits, scale_axes=[1]).numpy()
  return x, scale


@pytest.mark.parametrize("fmt,bits", CASES, ids=IDS)
@pytest.mark.parametrize("rounding", list(dq.Rounding))
def test_outputs_are_one_of_the_two_neighbouring_grid_points(fmt, bits, rounding):
  rs = np.random.RandomState(1)
  x = (rs.standard_normal((8, 64)) * np.exp(rs.uniform(-8, 2, (8, 64)))).astype(np.float32)
  gen = tf.random.Generator.from_seed(3)
  q = dq.quantize(x, fmt, bits, rounding=rounding, generator=gen,
                  scale_axes=[1]).numpy()
  scale = dq.quantization_scale(x, fmt, bits, scale_axes=[1]).numpy()
  lo, hi, clipped = _grid(fmt, bits, x, scale)
  assert np.all((q == lo) | (q == hi)), "output not on the grid next to x"
  # error within one grid step of the clipped input
  assert np.all(np.abs(q - clipped) <= np.abs(hi - lo) * (1 + 1e-6) + 1e-6 * np.abs(x))
  if rounding == dq.Rounding.NEAREST:
    nearest = np.where(np.abs(clipped - lo) < np.abs(hi - clipped), lo, hi)
    tie = np.isclose(np.abs(clipped - lo), np.abs(hi - clipped), rtol=1e-5)
    assert np.all((q == nearest) | tie)


@pytest.mark.parametrize("fmt,bits", CASES, ids=IDS)
def test_stochastic_rounding_is_unbiased_and_test_has_power(fmt, bits):
  x, scale = _batch(fmt, bits)
  lo, hi, clipped = _grid(fmt, bits, x[:1], scale[:1])
  lo, hi, clipped = lo[0], hi[0], clipped[0]
  gen = tf.random.Generator.from_seed(7)
  q = dq.quantize(x, fmt, bits, generator=gen, scale_axes=[1]).numpy()
  stat, k = _chi2_stat(q, clipped, lo, hi)
  assert k >= 10
  assert stat < _threshold(k), (stat, k)
  # Power: a biased rounding (P(up) = frac**1.25) and nearest are rejected.
  u = gen.uniform(x.shape) ** 0.8
  biased = _quantizers._quantize_with_noise(x, fmt, bits, noise=u, scale_axes=[1])
  assert _chi2_stat(biased.numpy(), clipped, lo, hi)[0] > _threshold(k)
  nearest = dq.quantize(x, fmt, bits, rounding="nearest", scale_axes=[1])
  assert _chi2_stat(nearest.numpy(), clipped, lo, hi)[0] > _threshold(k)


@pytest.mark.parametrize("fmt,bits", CASES, ids=IDS)
def test_nearest_rounding_is_idempotent(fmt, bits):
  x = np.random.RandomState(2).standard_normal((4, 32)).astype(np.float32)
  scale = dq.quantization_scale(x, fmt, bits, scale_axes=[1])
  q1 = dq.quantize(x, fmt, bits, rounding="nearest", scale_axes=[1], scale=scale)
  q2 = dq.quantize(q1, fmt, bits, rounding="nearest", scale_axes=[1], scale=scale)
  np.testing.assert_array_equal(q1.numpy(), q2.numpy())
  if fmt != F.INT4_SAWB:  # max-abs scales are recomputed from q1 up to an ulp
    q3 = dq.quantize(q1, fmt, bits, rounding="nearest", scale_axes=[1])
    np.testing.assert_allclose(q3.numpy(), q1.numpy(), rtol=1e-6, atol=0)


class _Jitted:
  """One XLA-compiled quantizer shared by all cases: format and bits are
  variables, so a single compilation serves every format (no retrace)."""

  def __init__(self):
    self.fmt = tf.Variable(0)
    self.bits = tf.Variable(4)
    self.gen = tf.random.Generator.from_seed(11)
    self.fn = tf.function(self._quantize, jit_compile=True)

  def _quantize(self, x, rounding):
    return dq.quantize(x, self.fmt, self.bits, rounding=rounding,
                       generator=self.gen, scale_axes=[1])

  def __call__(self, x, rounding, fmt, bits):
    self.fmt.assign(fmt.id)
    self.bits.assign(bits)
    return self.fn(tf.constant(x), rounding)


_JITTED = []


@pytest.mark.parametrize("fmt,bits", CASES, ids=IDS)
def test_jit_and_eager_agree_in_distribution(fmt, bits):
  if not _JITTED:
    _JITTED.append(_Jitted())
  jitted = _JITTED[0]
  x, _ = _batch(fmt, bits)
  gen = tf.random.Generator.from_seed(12)
  qj = jitted(x, "stochastic", fmt, bits).numpy()
  qe = dq.quantize(x, fmt, bits, generator=gen, scale_axes=[1]).numpy()
  scale = dq.quantization_scale(x[:1], fmt, bits, scale_axes=[1]).numpy()
  lo, hi, _ = _grid(fmt, bits, x[:1], scale)
  span = np.abs(hi - lo)[0].astype(np.float64)
  var = (qj.var(axis=0) + qe.var(axis=0)) / N
  ok = span > 0
  assert np.all(qj.mean(0)[~ok] == pytest.approx(qe.mean(0)[~ok], rel=1e-6))
  var = np.maximum(var[ok], (span[ok] ** 2) / N**2)
  stat = ((qj.mean(0) - qe.mean(0))[ok] ** 2 / var).sum()
  assert stat < _threshold(int(ok.sum())), stat
  nj = jitted(x, "nearest", fmt, bits).numpy()[:4]
  ne = dq.quantize(x[:4], fmt, bits, rounding="nearest", scale_axes=[1]).numpy()
  np.testing.assert_allclose(nj, ne, rtol=2e-6)
  assert jitted.fn.experimental_get_tracing_count() <= 2  # one per rounding


@pytest.mark.parametrize("fmt,bits", CASES, ids=IDS)
def test_tensor_format_equals_static_format(fmt, bits):
  x = np.random.RandomState(4).standard_normal((3, 17)).astype(np.float32)
  for rounding in dq.Rounding:
    a = dq.quantize(x, fmt, bits, rounding=rounding,
                    generator=tf.random.Generator.from_seed(5), scale_axes=[1])
    b = dq.quantize(x, tf.constant(fmt.id), tf.constant(bits), rounding=rounding,
                    generator=tf.random.Generator.from_seed(5), scale_axes=[1])
    np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("fmt,bits", CASES, ids=IDS)
def test_per_example_scales_make_rows_independent(fmt, bits):
  x = np.random.RandomState(5).standard_normal((4, 20)).astype(np.float32)
  y = x.copy()
  y[1:] *= 1000.0  # other examples change a lot
  for rounding in dq.Rounding:
    qa = dq.quantize(x, fmt, bits, rounding=rounding,
                     generator=tf.random.Generator.from_seed(6), scale_axes=[1])
    qb = dq.quantize(y, fmt, bits, rounding=rounding,
                     generator=tf.random.Generator.from_seed(6), scale_axes=[1])
    np.testing.assert_array_equal(qa.numpy()[0], qb.numpy()[0])


@pytest.mark.parametrize("fmt,bits", CASES, ids=IDS)
def test_zero_slices_stay_zero_and_seeds_repeat(fmt, bits):
  x = np.zeros((2, 5), np.float32)
  x[1] = [1, -2, 3, 0.5, 0]
  q = dq.quantize(x, fmt, bits, generator=tf.random.Generator.from_seed(1),
                  scale_axes=[1]).numpy()
  assert np.all(q[0] == 0) and np.all(np.isfinite(q))
  q2 = dq.quantize(x, fmt, bits, generator=tf.random.Generator.from_seed(1),
                   scale_axes=[1]).numpy()
  np.testing.assert_array_equal(q, q2)


def test_levels_of_the_standard_formats():
  np.testing.assert_array_equal(dq.format_levels("fp4_e2m1", 4),
                                [0, .5, 1, 1.5, 2, 3, 4, 6])
  np.testing.assert_array_equal(dq.format_levels("luq_fp4", 4),
                                [0, 1, 2, 4, 8, 16, 32, 64])
  assert len(dq.format_levels("int", 4)) == 8
  e4m3 = dq.format_levels("fp8_e4m3", 8)
  assert e4m3.max() == 448 and e4m3[1] == 2.0**-9 and len(e4m3) == 127
  e5m2 = dq.format_levels("fp8_e5m2", 8)
  assert e5m2.max() == 57344 and e5m2[1] == 2.0**-16 and len(e5m2) == 124


def test_validation_messages():
  with pytest.raises(ValueError, match=r"Expected generator=None to be"):
    dq.quantize([1.0], "int", 4)
  with pytest.raises(ValueError, match=r"Expected fmt='int3' to be one of"):
    dq.quantize([1.0], "int3", 4, rounding="nearest")
  with pytest.raises(ValueError, match=r"Expected rounding='up' to be one of"):
    dq.quantize([1.0], "int", 4, rounding="up")
  with pytest.raises(TypeError, match=r"Expected x.dtype=tf.int32"):
    dq.quantize(tf.constant([1]), "int", 4, rounding="nearest")

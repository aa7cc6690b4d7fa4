"""Tests of the DP loss-sensitivity estimator (real Keras model, real digits data)."""

import dp_accounting
import numpy as np
import pytest
from sklearn import datasets

import dpquant_tf  # noqa: F401  (Keras 2 first)
import tensorflow as tf

from dpquant_tf import privacy
from dpquant_tf import quantization
from dpquant_tf import schedule
from dpquant_tf.schedule import _estimator


def _digits(n=64):
  d = datasets.load_digits()
  x = (d.data[:n] / 16.0).astype(np.float32)
  return x, d.target[:n].astype(np.int32)


def _build_model(rounding="stochastic", seed=0):
  tf.keras.utils.set_random_seed(seed)
  base = tf.keras.Sequential([
      tf.keras.Input((64,)),
      tf.keras.layers.Dense(16, activation="relu"),
      tf.keras.layers.Dense(12, activation="relu"),
      tf.keras.layers.Dense(10),
  ])
  model = quantization.quantize_model(base, rounding=rounding, seed=seed)
  model.compile(loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  return model


_MODELS = {}


def _model(rounding="stochastic"):
  """One model per rounding for the whole module (tracing dominates the cost);
  tests never train it, and the estimator restores its plan."""
  if rounding not in _MODELS:
    _MODELS[rounding] = _build_model(rounding)
  quantization.set_plan(_MODELS[rounding], quantization.QuantPlan.select(
      [i.name for i in quantization.quantizable_layers(_MODELS[rounding])], []))
  return _MODELS[rounding]


def test_rows_depend_only_on_their_own_example():
  model = _model("nearest")
  x, y = _digits(16)
  est = schedule.LossSensitivityEstimator(x, y, seed=0)
  r = est.per_example_sensitivities(model, x, y).numpy()
  x2 = x.copy()
  x2[0] = 1.0 - x2[0]
  r2 = est.per_example_sensitivities(model, x2, y).numpy()
  assert r.shape == (16, 3)
  np.testing.assert_allclose(r2[1:], r[1:], atol=1e-6)
  assert np.abs(r2[0] - r[0]).max() > 1e-4  # the changed row did change


@pytest.mark.parametrize("clip", [0.05, 0.5])
def test_clipping_bounds_each_examples_influence(clip):
  """Change one example: the pre-noise sum moves by at most C_a (2 C_a if replaced)."""
  model = _model("nearest")
  x, y = _digits(24)
  est = schedule.LossSensitivityEstimator(x, y, clip=clip, seed=0)
  adversarial = np.clip(x[:1] * 40.0, 0, 40.0)
  x_replaced = np.concatenate([adversarial, x[1:]])
  y_replaced = np.concatenate([(y[:1] + 5) % 10, y[1:]])
  s = est.clipped_sum(model, x, y).numpy()
  s_removed = est.clipped_sum(model, x[1:], y[1:]).numpy()
  s_replaced = est.clipped_sum(model, x_replaced, y_replaced).numpy()
  tol = 1e-12  # float64 summation only
  assert np.linalg.norm(s - s_removed) <= clip + tol
  assert np.linalg.norm(s - s_replaced) <= 2 * clip + tol
  # Power: without clipping, the adversarial example alone moves the sum by more.
  raw = est.per_example_sensitivities(model, adversarial, y_replaced[:1]).numpy()
  assert np.linalg.norm(raw[0]) > 1.5 * clip


def test_clipping_with_stochastic_rounding_in_one_pass():
  model = _model("stochastic")
  x, y = _digits(33)
  est = schedule.LossSensitivityEstimator(x, y, clip=0.1, repeats=3, seed=0)
  r = est.per_example_sensitivities(model, x, y)
  clipped = _estimator.clip_per_example(r, 0.1).numpy()
  assert np.all(np.linalg.norm(clipped, axis=1) <= 0.1)
  full, removed = clipped.sum(0), clipped[1:].sum(0)
  assert np.linalg.norm(full - removed) <= 0.1 + 1e-15


def test_noise_has_the_documented_scale():
  x, y = _digits(40)
  est = schedule.LossSensitivityEstimator(x, y, sampling_rate=0.25,
                                          noise_multiplier=3.0, clip=0.5, seed=1)
  draws = np.stack([est.noised_mean(tf.zeros([64], tf.float64)).numpy()
                    for _ in range(150)]).ravel()
  expected = 3.0 * 0.5 / (0.25 * 40)
  se = expected / np.sqrt(2 * draws.size)
  assert abs(draws.std() - expected) < 4.5 * se
  assert abs(draws.mean()) < 4.5 * expected / np.sqrt(draws.size)
  # Power: a 10 percent wrong scale is rejected by the same tolerance.
  assert abs(draws.std() - 1.1 * expected) > 4.5 * se


def test_release_is_clipped_mean_plus_noise():
  model = _model("nearest")
  x, y = _digits(32)
  est = schedule.LossSensitivityEstimator(x, y, sampling_rate=1.0, noise_multiplier=2.0,
                                          clip=0.2, repeats=1, seed=3)
  names = [info.name for info in quantization.quantizable_layers(model)]
  exact = est.clipped_sum(model, x, y).numpy() / 32.0
  releases = np.array([[r[n] for n in names] for r in
                       (est.estimate(model) for _ in range(60))])
  errors = (releases - exact).ravel()
  expected = 2.0 * 0.2 / 32.0
  assert abs(errors.std() - expected) < 4.5 * expected / np.sqrt(2 * errors.size)
  assert abs(errors.mean()) < 4.5 * expected / np.sqrt(errors.size)


def test_poisson_sampling_rate():
  x, y = _digits(200)
  est = schedule.LossSensitivityEstimator(x, y, sampling_rate=0.1, seed=2)
  sizes = np.array([int(est.sample()[0].shape[0]) for _ in range(400)])
  mean, var = 20.0, 200 * 0.1 * 0.9
  assert abs(sizes.mean() - mean) < 4.5 * np.sqrt(var / sizes.size)
  # Poisson sampling: the batch size varies (a fixed-size batch would not).
  assert abs(sizes.var() - var) < 0.35 * var


def test_event_is_recorded_in_the_ledger():
  model = _model()
  x, y = _digits(64)
  ledger = privacy.PrivacyLedger()
  est = schedule.LossSensitivityEstimator(x, y, sampling_rate=0.05,
                                          noise_multiplier=4.0, seed=0)
  est.estimate(model, ledger=ledger)
  est.estimate(model, ledger=ledger)
  expected = dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(4.0))
  assert ledger.events("analysis") == [(expected, 2)]
  event = ledger.events("analysis")[0][0]
  assert type(event.sampling_probability) is float
  assert type(event.event.noise_multiplier) is float
  assert est.events == [expected, expected]
  assert ledger.epsilon(1e-5) > 0 and ledger.analysis_share(1e-5) == pytest.approx(1.0)


def test_weights_untouched_and_plan_restored():
  model = _model()
  x, y = _digits(32)
  names = [info.name for info in quantization.quantizable_layers(model)]
  plan = quantization.QuantPlan.select(
      names, [names[1]], config=quantization.LayerQuantConfig(
          fwd_format="fp8_e4m3", fwd_bits=8, bwd_format="int", bwd_bits=6))
  quantization.set_plan(model, plan)
  weights = [w.copy() for w in model.get_weights()]
  schedule.LossSensitivityEstimator(x, y, sampling_rate=0.5, seed=0).estimate(model)
  assert quantization.get_plan(model) == plan
  for before, after in zip(weights, model.get_weights()):
    np.testing.assert_array_equal(before, after)


def test_default_noise_is_non_deterministic_and_seed_reproduces():
  model = _model("nearest")
  x, y = _digits(32)
  a = schedule.LossSensitivityEstimator(x, y, sampling_rate=0.5).estimate(model)
  b = schedule.LossSensitivityEstimator(x, y, sampling_rate=0.5).estimate(model)
  assert a != b
  c = schedule.LossSensitivityEstimator(x, y, sampling_rate=0.5, seed=9).estimate(model)
  d = schedule.LossSensitivityEstimator(x, y, sampling_rate=0.5, seed=9).estimate(model)
  assert c == d


def test_one_trace_serves_every_layer_and_batch():
  model = _model()
  x, y = _digits(64)
  est = schedule.LossSensitivityEstimator(x, y, sampling_rate=0.3, max_batch_size=16,
                                          seed=0)
  for _ in range(4):
    est.estimate(model)
  fn = est._loss_fn(model)  # pylint: disable=protected-access
  assert fn.experimental_get_tracing_count() == 1


def test_default_analysis_share_is_small_for_example_runs():
  """Defaults (q_a=0.05, sigma_a=4, every 2 epochs): share < 2 percent."""
  x, y = _digits(8)
  est = schedule.LossSensitivityEstimator(x, y)
  for n, epochs, eps in [(1437, 10, 8.0), (1437, 10, 1.0), (4000, 3, 8.0),
                         (4000, 30, 4.0)]:
    analyses = est.planned_analyses(epochs=epochs, period=2)
    z = privacy.calibrate_noise_multiplier(eps, 1e-5, n, 64, epochs, analyses=analyses)
    total = privacy.planned_epsilon(dataset_size=n, batch_size=64, noise_multiplier=z,
                                    epochs=epochs, delta=1e-5, analyses=analyses)
    train = privacy.planned_epsilon(dataset_size=n, batch_size=64, noise_multiplier=z,
                                    epochs=epochs, delta=1e-5)
    assert total <= eps + 1e-9
    assert 0 < (total - train) / total < 0.02


@pytest.mark.parametrize("kwargs, message", [
    ({"sampling_rate": 0.0}, "Expected sampling_rate=0.0 to be in (0, 1]."),
    ({"noise_multiplier": 0}, "Expected noise_multiplier=0 to be > 0."),
    ({"clip": -1.0}, "Expected clip=-1.0 to be > 0."),
    ({"repeats": 0}, "Expected repeats=0 to be an integer in [1, inf]."),
])
def test_validation(kwargs, message):
  x, y = _digits(8)
  with pytest.raises(ValueError) as err:
    schedule.LossSensitivityEstimator(x, y, **kwargs)
  assert str(err.value) == message


def test_clip_per_example_never_exceeds_clip():
  rng = np.random.default_rng(0)
  r = rng.normal(size=(2000, 7)) * rng.lognormal(0, 3, size=(2000, 1))
  for clip in (1e-3, 0.1, 1.0, 37.5):
    out = _estimator.clip_per_example(r, clip).numpy()
    norms = np.linalg.norm(out, axis=1)
    assert np.all(norms <= clip)
    small = np.linalg.norm(r, axis=1) < clip * 0.999
    np.testing.assert_array_equal(out[small], r[small])  # untouched below the clip


def test_one_examples_r_does_not_depend_on_chunking_or_other_examples():
  """Stochastic-rounding model: the analysis rounds to nearest, so r_j is the
  same for any max_batch_size and whichever other examples are sampled."""
  model = _model("stochastic")
  x, y = _digits(12)
  small = schedule.LossSensitivityEstimator(x, y, max_batch_size=5, seed=0)
  large = schedule.LossSensitivityEstimator(x, y, max_batch_size=64, seed=0)
  r_small = small.per_example_sensitivities(model, x, y).numpy()
  r_large = large.per_example_sensitivities(model, x, y).numpy()
  np.testing.assert_allclose(r_small, r_large, rtol=0, atol=1e-6)
  r_fewer = large.per_example_sensitivities(model, x[:7], y[:7]).numpy()
  np.testing.assert_allclose(r_fewer, r_large[:7], rtol=0, atol=1e-6)
  assert np.abs(r_large).max() > 1e-4   # the layers' quantization matters
  # Training keeps the layers' own (stochastic) rounding.
  assert all(l.rounding == quantization.Rounding.STOCHASTIC
             for l in quantization.quantized_layers(model))


def test_non_finite_example_contributes_zero_and_the_release_stays_finite():
  model = _model("nearest")
  x, y = _digits(10)
  x_bad = x.copy()
  x_bad[0] = np.nan
  est = schedule.LossSensitivityEstimator(x_bad, y, sampling_rate=1.0,
                                          noise_multiplier=1.0, clip=0.2, seed=4)
  r = est.per_example_sensitivities(model, x_bad, y).numpy()
  assert not np.all(np.isfinite(r[0]))
  with_bad = est.clipped_sum(model, x_bad, y).numpy()
  without = est.clipped_sum(model, x[1:], y[1:]).numpy()
  np.testing.assert_allclose(with_bad, without, rtol=0, atol=1e-6)
  released = est.estimate(model)
  assert all(np.isfinite(v) for v in released.values())

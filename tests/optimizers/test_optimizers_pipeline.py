"""Poisson pipeline, budget callback, and learning on real digits."""

import dp_accounting
import numpy as np
import pytest
from sklearn import datasets
import tensorflow as tf

from dpquant_tf import privacy
from dpquant_tf import training
from dpquant_tf.optimizers import DPQuantOptimizer
from tests.optimizers._helpers import make_data as _data
from tests.optimizers._helpers import make_loss as _loss
from tests.optimizers._helpers import make_model as _model


def test_poisson_pipeline_shapes_rate_and_masked_rows_contribute_nothing():
  x, y = _data(200)
  ds = privacy.poisson_dataset(x, y, 0.1, 40, steps=300, seed=3)
  counts = []
  for xb, yb, mask, _ in ds:
    assert xb.shape == (40, 6) and yb.shape == (40,) and mask.shape == (40,)
    counts.append(int(mask.numpy().sum()))
  mean, se = np.mean(counts), np.sqrt(200 * 0.1 * 0.9 / len(counts))
  assert abs(mean - 20) < 5 * se
  xb, yb, mask, _ = next(iter(ds))
  k = int(mask.numpy().sum())
  model = _model()

  def grads(xs, ys, weights):
    opt = DPQuantOptimizer(0.5, 0.0, expected_batch_size=20.0)
    with tf.GradientTape() as tape:
      loss = _loss()(ys, model(xs), sample_weight=weights)
    with opt._bind(model, xs):
      return opt._compute_gradients(loss, model.trainable_variables,
                                    tape=tape)

  padded = grads(xb, yb, mask)
  real = grads(xb[:k], yb[:k], mask[:k])
  for (a, _), (b, _) in zip(padded, real):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-8)
  with pytest.raises(tf.errors.InvalidArgumentError, match="max_batch_size"):
    list(privacy.poisson_dataset(x, y, 0.5, 20, steps=2, seed=0))
  assert privacy.poisson_max_batch_size(200, 0.1) > 30


def test_callback_logs_epsilon_and_stops_before_budget():
  x, y = _data(64)
  model = _model()
  ledger = privacy.PrivacyLedger(sampling_method="poisson")
  opt = DPQuantOptimizer(1.0, 0.8, ledger=ledger, dataset_size=64)
  model.compile(optimizer=opt, loss=_loss())
  # fit's arrays are not the library's sampler: recorded at q = 1.
  event = dp_accounting.PoissonSampledDpEvent(
      1.0, dp_accounting.GaussianDpEvent(0.8))

  def eps(steps):
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return acc.get_epsilon(1e-5)

  budget = (eps(10) + eps(11)) / 2
  cb = privacy.PrivacyCallback(ledger, 1e-5, budget_epsilon=budget)
  history = model.fit(x, y, batch_size=8, epochs=5, verbose=0,
                      callbacks=[cb])
  assert cb.stopped_for_budget
  assert opt.dp_event_steps() == 10
  assert ledger.epsilon(1e-5) <= budget
  assert history.history["epsilon"][-1] == pytest.approx(eps(10), rel=1e-9)
  assert history.history["analysis_epsilon_share"] == [0.0, 0.0]
  with pytest.raises(privacy.BudgetExceededError):
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[cb])
  assert opt.dp_event_steps() == 10


def test_learns_real_digits_with_quantization_and_exact_ledger():
  x, y = datasets.load_digits(return_X_y=True)
  x = (x / 16.0).astype("float32")
  rng = np.random.default_rng(0)
  order = rng.permutation(len(x))
  x, y = x[order], y[order]
  x_train, y_train, x_test, y_test = x[:1500], y[:1500], x[1500:], y[1500:]
  q, sigma = 0.06, 1.0
  # Unseeded: a seeded sampler is accounted at q = 1.
  ds = privacy.poisson_dataset(x_train, y_train, q, 140, steps=50)
  ledger = privacy.PrivacyLedger(sampling_method="poisson", dataset_size=1500)
  opt = DPQuantOptimizer(1.0, sigma, learning_rate=2.0, gradient_bits=4,
                         expected_batch_size=q * 1500, ledger=ledger,
                         sampling_probability=q, seed=0)
  tf.keras.utils.set_random_seed(0)
  model = tf.keras.Sequential([
      tf.keras.layers.Dense(32, activation="relu", input_shape=(64,)),
      tf.keras.layers.Dense(10)])
  model.compile(optimizer=opt, loss=_loss(), metrics=["accuracy"])
  training.install_dp_train_step(model).fit(ds, epochs=2, verbose=0)
  _, acc = model.evaluate(x_test, y_test, verbose=0)
  assert acc > 0.6, acc  # chance is 0.1
  ref = dp_accounting.rdp.RdpAccountant()
  ref.compose(dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(
          sigma)), 100))
  assert ledger.epsilon(1e-5) == pytest.approx(ref.get_epsilon(1e-5),
                                               rel=1e-9)


def test_callback_projects_whole_executions_with_steps_per_execution():
  x, y = _data(64)
  model = _model()
  ledger = privacy.PrivacyLedger(sampling_method="poisson")
  opt = DPQuantOptimizer(1.0, 0.8, ledger=ledger, dataset_size=64)
  model.compile(optimizer=opt, loss=_loss(), steps_per_execution=2)
  # fit's arrays are not the library's sampler: recorded at q = 1.
  event = dp_accounting.PoissonSampledDpEvent(
      1.0, dp_accounting.GaussianDpEvent(0.8))

  def eps(steps):
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return acc.get_epsilon(1e-5)

  budget = (eps(11) + eps(12)) / 2  # 12 steps (6 executions) would exceed.
  cb = privacy.PrivacyCallback(ledger, 1e-5, budget_epsilon=budget)
  model.fit(x, y, batch_size=8, epochs=5, verbose=0, callbacks=[cb])
  assert opt.dp_event_steps() == 10
  assert ledger.epsilon(1e-5) <= budget

"""PrivacyCallback: proven epsilon, checks before the first step, full
executions (issue 11 items 5-6, issue 15 items 7-9)."""

import dp_accounting
import numpy as np
import pytest
import tensorflow as tf

from dpquant_tf import privacy
from dpquant_tf.optimizers import DPQuantOptimizer

DELTA = 1e-5


def _data(n=64, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 6)).astype("float32")
  y = rng.integers(0, 3, size=n)
  return x, y


def _model(opt, steps_per_execution=1):
  tf.keras.utils.set_random_seed(0)
  model = tf.keras.Sequential([
      tf.keras.layers.Dense(5, activation="tanh", input_shape=(6,)),
      tf.keras.layers.Dense(3)])
  model.compile(optimizer=opt, steps_per_execution=steps_per_execution,
                loss=tf.keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True, reduction="none"))
  return model


def _weights(model):
  return [w.copy() for w in model.get_weights()]


def _same(a, b):
  return all(np.array_equal(u, v) for u, v in zip(a, b))


def _gaussian_eps(z, steps):
  acc = dp_accounting.rdp.RdpAccountant()
  acc.compose(dp_accounting.GaussianDpEvent(z), steps)
  return acc.get_epsilon(DELTA)


def _poisson_eps(q, z, steps):
  acc = dp_accounting.rdp.RdpAccountant()
  acc.compose(dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)),
      steps))
  return acc.get_epsilon(DELTA)


def test_shuffled_batches_log_the_proven_epsilon_and_poisson_beside_it():
  x, y = _data()
  ledger = privacy.PrivacyLedger()  # SHUFFLED: plain fit batches
  opt = DPQuantOptimizer(1.0, 2.0, ledger=ledger, dataset_size=64)
  model = _model(opt)
  cb = privacy.PrivacyCallback(ledger, DELTA)
  hist = model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[cb])
  eps, poisson = hist.history["epsilon"], hist.history["epsilon_if_poisson"]
  assert eps[-1] == pytest.approx(ledger.epsilon_without_amplification(DELTA))
  # fit's arrays are not the library's sampler: every step is a Gaussian
  # mechanism on every record (q = 1), never the Poisson figure of q = 1/8.
  assert eps[-1] == pytest.approx(_gaussian_eps(2.0, 16), rel=1e-9)
  assert poisson[-1] == pytest.approx(eps[-1], rel=1e-9)
  assert eps[-1] >= _gaussian_eps(2.0, 2)  # each record once per epoch
  # A Poisson ledger logs the Poisson figure (and nothing beside it).
  ledger_p = privacy.PrivacyLedger(sampling_method="poisson")
  opt_p = DPQuantOptimizer(1.0, 2.0, ledger=ledger_p, dataset_size=64,
                           expected_batch_size=8.0, sampling_probability=0.125)
  # Unseeded: a seeded sampler's steps are recorded at q = 1.
  ds = privacy.poisson_dataset(x, y, 0.125, 24)
  hist = _model(opt_p).fit(ds, epochs=1, verbose=0,
                           callbacks=[privacy.PrivacyCallback(ledger_p, DELTA)])
  assert "epsilon_if_poisson" not in hist.history
  assert hist.history["epsilon"][-1] == pytest.approx(
      _poisson_eps(0.125, 2.0, 8), rel=1e-9)


def test_shuffled_budget_uses_the_proven_bound():
  x, y = _data()
  ledger = privacy.PrivacyLedger()
  opt = DPQuantOptimizer(1.0, 2.0, ledger=ledger, dataset_size=64)
  model = _model(opt)
  # The Poisson figure of 3 epochs fits; the proven bound of 2 epochs not.
  proven_one_epoch = privacy.PrivacyLedger()
  proven_one_epoch.record(dp_accounting.GaussianDpEvent(2.0), kind="train")
  budget = proven_one_epoch.epsilon(DELTA) * 1.01
  assert _poisson_eps(0.125, 2.0, 24) < budget
  cb = privacy.PrivacyCallback(ledger, DELTA, budget_epsilon=budget)
  model.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[cb])
  # Each step on fit's arrays costs a full Gaussian (q = 1): one fits.
  assert cb.stopped_for_budget and opt.dp_event_steps() == 1
  assert ledger.proven_epsilon(DELTA) <= budget


def test_validation_split_is_accounted_without_amplification():
  # Formerly refused by reading fit's frame; now fit's data is never read:
  # every step on it is recorded at q = 1, whatever dataset_size says.
  x, y = _data()
  ledger = privacy.PrivacyLedger()
  opt = DPQuantOptimizer(1.0, 1.0, ledger=ledger, dataset_size=64)
  model = _model(opt)
  model.fit(x, y, batch_size=8, epochs=1, validation_split=0.5, verbose=0,
            callbacks=[privacy.PrivacyCallback(ledger, DELTA)])
  (event, count), = ledger.events("train")
  assert (event.sampling_probability, count) == (1.0, 4)


def test_poisson_dataset_records_its_own_rate_not_the_declared_one():
  x, y = _data()
  ledger = privacy.PrivacyLedger(sampling_method="poisson")
  opt = DPQuantOptimizer(1.0, 1.0, ledger=ledger, dataset_size=64,
                         expected_batch_size=8.0, sampling_probability=0.125)
  model = _model(opt)
  ds = privacy.poisson_dataset(x, y, 0.25, 40, steps=2)
  model.fit(ds, epochs=1, verbose=0,
            callbacks=[privacy.PrivacyCallback(ledger, DELTA)])
  (event, count), = opt.dp_events()
  assert (event.sampling_probability, count) == (0.25, 2)


def test_neither_q_nor_n_is_accounted_at_q_one():
  x, y = _data()
  ledger = privacy.PrivacyLedger()
  opt = DPQuantOptimizer(1.0, 1.0, ledger=ledger)  # Neither q nor N.
  model = _model(opt)
  ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
  model.fit(ds, epochs=1, verbose=0,
            callbacks=[privacy.PrivacyCallback(ledger, DELTA)])
  (event, count), = opt.dp_events()
  assert (event.sampling_probability, count) == (1.0, 8)


def test_unattached_optimizer_is_refused_before_the_first_step():
  x, y = _data()
  ledger = privacy.PrivacyLedger()
  model = _model(DPQuantOptimizer(1.0, 1.0, ledger=ledger, dataset_size=64))
  cb = privacy.PrivacyCallback(ledger, DELTA, budget_epsilon=50.0)
  model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[cb])
  # Recompiled with an optimizer the ledger does not know.
  fresh = DPQuantOptimizer(1.0, 1.0, dataset_size=64)
  model.compile(optimizer=fresh, loss=tf.keras.losses.
                SparseCategoricalCrossentropy(from_logits=True,
                                              reduction="none"))
  before = _weights(model)
  with pytest.raises(ValueError, match="ledger.attach"):
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[cb])
  assert fresh.dp_event_steps() == 0 and _same(before, model.get_weights())
  ledger.attach(fresh)
  model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[cb])
  assert fresh.dp_event_steps() == 8


def test_first_execution_is_checked_before_any_step():
  x, y = _data()
  ledger = privacy.PrivacyLedger(sampling_method="poisson")
  opt = DPQuantOptimizer(1.0, 1.0, ledger=ledger, dataset_size=64)
  model = _model(opt)
  before = _weights(model)
  cb = privacy.PrivacyCallback(ledger, DELTA, budget_epsilon=0.05)
  with pytest.raises(privacy.BudgetExceededError):
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[cb])
  assert opt.dp_event_steps() == 0 and _same(before, model.get_weights())
  assert ledger.epsilon(DELTA) == 0.0


def test_steps_per_execution_never_overshoots_at_epoch_ends():
  x, y = _data()
  q, z = 0.125, 1.0
  ledger = privacy.PrivacyLedger(sampling_method="poisson")
  opt = DPQuantOptimizer(1.0, z, ledger=ledger, dataset_size=64,
                         expected_batch_size=8.0, sampling_probability=q)
  model = _model(opt, steps_per_execution=10)
  # 13 steps per epoch: executions of 10 and 3 steps.
  ds = privacy.poisson_dataset(x, y, q, 24, steps=13)  # unseeded: amplified
  budget = (_poisson_eps(q, z, 22) + _poisson_eps(q, z, 23)) / 2
  cb = privacy.PrivacyCallback(ledger, DELTA, budget_epsilon=budget)
  model.fit(ds, epochs=4, verbose=0, callbacks=[cb])
  assert cb.stopped_for_budget
  assert opt.dp_event_steps() <= 22
  assert ledger.epsilon(DELTA) <= budget

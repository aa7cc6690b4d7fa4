"""Budget with a schedule: epoch-begin analyses and bit changes are checked
before they happen, in any callback order (issue 11 items 4 and 7)."""

import types

import numpy as np
import pytest
import tensorflow as tf

from dpquant_tf import optimizers
from dpquant_tf import privacy
from dpquant_tf import quantization
from dpquant_tf import schedule

DELTA = 1e-5
N, Q, Z = 64, 0.125, 2.0


def _setup(*, policy, estimator=True, mode="reclip"):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(N, 6)).astype("float32")
  y = rng.integers(0, 3, size=N).astype("int32")
  ledger = privacy.PrivacyLedger(sampling_method="poisson", dataset_size=N)
  opt = optimizers.DPQuantOptimizer(
      1.0, Z, ledger=ledger, dataset_size=N, expected_batch_size=Q * N,
      sampling_probability=Q, sensitivity_mode=mode)
  tf.keras.utils.set_random_seed(0)
  model = quantization.quantize_model(tf.keras.Sequential([
      tf.keras.Input((6,)), tf.keras.layers.Dense(8, activation="relu"),
      tf.keras.layers.Dense(3)]), seed=0)
  model.compile(optimizer=opt, loss=tf.keras.losses.
                SparseCategoricalCrossentropy(from_logits=True,
                                              reduction="none"))
  # A costly analysis (little noise, half the data) makes releases matter.
  est = (schedule.LossSensitivityEstimator(x, y, sampling_rate=0.5,
                                           repeats=1,
                                           noise_multiplier=0.8, seed=0)
         if estimator else None)
  sched = schedule.DPQuantScheduler(policy, ledger=ledger, estimator=est,
                                    seed=0)
  # Unseeded (a seeded sampler is accounted at q = 1): 8 steps per epoch.
  ds = privacy.poisson_dataset(x, y, Q, 24)
  return model, opt, ledger, sched, est, ds


@pytest.mark.parametrize("scheduler_first", [True, False])
def test_epoch_begin_release_never_takes_the_run_past_its_budget(
    scheduler_first):
  model, opt, ledger, sched, est, ds = _setup(
      policy=schedule.LossAwarePolicy(ratio=0.5, period=1))
  # Budget: epoch 0 (release + 8 steps) fits with room for more steps, but
  # not for epoch 1's release.
  after_epoch0 = privacy.planned_epsilon(
      dataset_size=N, batch_size=Q * N, noise_multiplier=Z, epochs=1,
      delta=DELTA, analyses=[(est.dp_event(), 1)])
  with_release = privacy.planned_epsilon(
      dataset_size=N, batch_size=Q * N, noise_multiplier=Z, epochs=1.125,
      delta=DELTA, analyses=[(est.dp_event(), 2)])
  budget = (after_epoch0 + with_release) / 2
  cb = privacy.PrivacyCallback(ledger, DELTA, budget_epsilon=budget)
  callbacks = [sched, cb] if scheduler_first else [cb, sched]
  model.fit(ds, epochs=4, verbose=0, callbacks=callbacks)
  assert ledger.epsilon(DELTA) <= budget  # Poisson ledger
  assert cb.stopped_for_budget
  assert len(sched.releases.sensitivities) == 1
  assert opt.dp_event_steps() == 8


def test_scheduler_does_not_release_past_the_budget():
  model, opt, ledger, sched, est, ds = _setup(
      policy=schedule.LossAwarePolicy(ratio=0.5, period=1))
  one_release = privacy.PrivacyLedger(sampling_method="poisson")
  one_release.record(est.dp_event())
  cb = privacy.PrivacyCallback(ledger, DELTA,
                               budget_epsilon=one_release.epsilon(DELTA) * 0.9)
  with pytest.raises(privacy.BudgetExceededError):
    model.fit(ds, epochs=2, verbose=0, callbacks=[cb, sched])
  assert ledger.events("analysis") == [] and opt.dp_event_steps() == 0


def test_bit_change_that_lowers_the_noise_is_checked_before_the_epoch():
  # BOUND mode: fewer gradient bits -> larger sensitivity -> smaller z.
  ramp = schedule.BitRampPolicy(b_start=8, b_end=2, epochs=2)
  model, opt, ledger, sched, _, ds = _setup(policy=ramp, estimator=False,
                                            mode="bound")
  model.fit(ds, epochs=1, verbose=0, callbacks=[sched])  # z at 8 bits.
  (event8, _), = opt.dp_events()
  z8 = event8.event.noise_multiplier
  fresh = privacy.PrivacyLedger(sampling_method="poisson")
  fresh.record(event8, kind="train", count=8 + 8 + 1)
  budget = fresh.epsilon(DELTA)  # Room for a second epoch at 8 bits only.
  cb = privacy.PrivacyCallback(ledger, DELTA, budget_epsilon=budget)
  sched2 = schedule.DPQuantScheduler(schedule.BitRampPolicy(
      b_start=8, b_end=2, epochs=2), seed=0)
  with pytest.raises(privacy.BudgetExceededError):
    model.fit(ds, epochs=2, verbose=0, callbacks=[cb, sched2])
  assert ledger.epsilon(DELTA) <= budget  # Poisson ledger
  zs = [e.event.noise_multiplier for e, _ in opt.dp_events()]
  assert zs == [z8]  # No step was taken at 2 bits.


def test_scheduler_runs_the_multi_worker_guard_itself():
  model, _, _, sched, _, _ = _setup(
      policy=schedule.LossAwarePolicy(ratio=0.5, period=1))
  # A strategy-shaped stand-in (as in tests/distribute): only
  # `extended._in_multi_worker_mode` is read, through model.distribute_strategy.
  # pylint: disable-next=protected-access
  model._distribution_strategy = types.SimpleNamespace(
      extended=types.SimpleNamespace(_in_multi_worker_mode=lambda: True))
  sched.set_model(model)
  with pytest.raises(ValueError, match="scheduler.estimator"):
    sched.on_train_begin()

"""One epsilon in the logs, every seed stated, accounting edges (issue 20
items 4, 5, 8)."""

import warnings

import dp_accounting
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib
import numpy as np
import pytest
from sklearn import datasets

import dpquant_tf  # noqa: F401  (Keras 2 first)
import tensorflow as tf

from dpquant_tf import privacy
from dpquant_tf import quantization
from dpquant_tf import schedule
from dpquant_tf.optimizers import DPQuantOptimizer
from dpquant_tf.privacy import _rdp_fast

DELTA = 1e-5


def _step(q, z):
  return privacy.sampled_gaussian_event(q, z)


def _digits(n):
  d = datasets.load_digits()
  return (d.data[:n] / 16.0).astype(np.float32), d.target[:n].astype(np.int32)


def _quantized_model():
  tf.keras.utils.set_random_seed(0)
  base = tf.keras.Sequential([tf.keras.Input((64,)),
                              tf.keras.layers.Dense(8, activation="relu"),
                              tf.keras.layers.Dense(10)])
  return quantization.quantize_model(base, seed=0)


# ------------------------------------------------------------ one epsilon
@pytest.mark.slow  # ~45 s here: a quantized model's DP step traces slowly.
@pytest.mark.parametrize("scheduler_last", [True, False])
def test_every_callback_logs_the_same_proven_epsilon(scheduler_last):
  """Shuffled batches: a scheduler with ledger= and delta= listed after
  PrivacyCallback used to overwrite logs["epsilon"] with the Poisson figure
  (History, progress bar, CSVLogger, TensorBoard)."""
  x, y = _digits(32)
  ledger = privacy.PrivacyLedger()  # SHUFFLED
  opt = DPQuantOptimizer(1.0, 1.0, ledger=ledger, dataset_size=32)
  model = _quantized_model()
  model.compile(optimizer=opt, loss=tf.keras.losses.SparseCategoricalCrossentropy(
      from_logits=True, reduction="none"))
  sched = schedule.DPQuantScheduler(schedule.RotationPolicy(ratio=0.5),
                                    ledger=ledger, delta=DELTA, seed=0)
  cb = privacy.PrivacyCallback(ledger, DELTA)
  callbacks = [cb, sched] if scheduler_last else [sched, cb]
  # fit's arrays are recorded at q = 1 (proven and Poisson figures agree
  # for them); an earlier phase of shuffled batches recorded by hand at
  # q = 1/20 makes the two figures differ (once per epoch vs Poisson).
  ledger.record(_step(0.05, 1.0), kind="train", count=400)
  hist = model.fit(x, y, batch_size=16, epochs=1, verbose=0,
                   callbacks=callbacks)
  proven = ledger.proven_epsilon(DELTA)
  poisson = ledger.epsilon(DELTA)
  assert abs(proven - poisson) > 0.3  # Two different figures.
  assert hist.history["epsilon"][-1] == pytest.approx(proven, rel=1e-12)
  assert hist.history["epsilon_if_poisson"][-1] == pytest.approx(
      poisson, rel=1e-12)
  assert sched.history[-1]["epsilon"] == pytest.approx(proven, rel=1e-12)


# ------------------------------------------------------------ seeds
def test_seeded_sampler_voids_amplification_and_is_stated():
  ledger = privacy.PrivacyLedger(sampling_method="poisson", dataset_size=1000)
  ledger.record(_step(0.05, 1.0), kind="train", count=400)
  amplified = ledger.proven_epsilon(DELTA)
  assert "OS entropy" in ledger.statement(DELTA)
  ledger.note_seeded("sampler")
  assert ledger.seeded_sources() == ["sampler"]
  assert not ledger.proves_amplification()
  # A known Poisson sample can hold a record in any number of the 400
  # steps: each is a Gaussian mechanism (q = 1), not "once per epoch".
  unamplified = ledger.proven_epsilon(DELTA)
  acc = dp_accounting.rdp.RdpAccountant()
  acc.compose(dp_accounting.GaussianDpEvent(1.0), 400)
  assert unamplified == pytest.approx(acc.get_epsilon(DELTA), rel=1e-9)
  assert unamplified > ledger.epsilon_without_amplification(DELTA)
  assert unamplified > 3 * amplified
  text = " ".join(ledger.statement(DELTA).split())
  assert "OS entropy" not in text
  assert "Poisson sampler" in text and "amplification by sampling is void" in text
  assert f"The guarantee stated is {unamplified:.3f}" in text
  with pytest.raises(ValueError, match="source"):
    ledger.note_seeded("weights")


def test_seeded_estimator_is_recorded_and_loses_amplification():
  x, y = _digits(64)
  model = _quantized_model()
  ledger = privacy.PrivacyLedger(sampling_method="poisson")
  ledger.record(_step(0.05, 1.0), kind="train", count=100)
  est = schedule.LossSensitivityEstimator(
      x, y, sampling_rate=0.25, noise_multiplier=2.0, seed=0,
      loss=tf.keras.losses.SparseCategoricalCrossentropy(
          from_logits=True, reduction="none"))
  est.estimate(model, ledger=ledger)
  assert "estimator" in ledger.seeded_sources()
  ref = dp_accounting.rdp.RdpAccountant()
  ref.compose(dp_accounting.SelfComposedDpEvent(_step(0.05, 1.0), 100))
  ref.compose(est.dp_event().event)  # The sample is known: no amplification.
  assert ledger.proven_epsilon(DELTA) == pytest.approx(ref.get_epsilon(DELTA),
                                                       rel=1e-9)
  text = " ".join(ledger.statement(DELTA).split())
  assert "loss-sensitivity estimator" in text and "OS entropy" not in text


def test_seeded_noise_and_seeds_survive_a_restore(tmp_path):
  ledger = privacy.PrivacyLedger(sampling_method="poisson")
  DPQuantOptimizer(1.0, 1.0, ledger=ledger, dataset_size=100, noise_seed=1)
  assert ledger.seeded_sources() == ["noise"]
  ledger.note_seeded("canaries")
  path = tf.train.Checkpoint(ledger=ledger).write(str(tmp_path / "l"))
  fresh = privacy.PrivacyLedger(sampling_method="poisson")
  tf.train.Checkpoint(ledger=fresh).read(path)
  # The seeded noise is noted in the ledger itself (saved with it): a
  # restore without the seeded optimizer still states it.
  assert fresh.seeded_sources() == ["canaries", "noise"]
  # A restore of a ledger written before the seed was noted forgets nothing.
  early = tf.train.Checkpoint(ledger=fresh).write(str(tmp_path / "e"))
  fresh.note_seeded("sampler")
  tf.train.Checkpoint(ledger=fresh).read(early)
  assert fresh.seeded_sources() == ["canaries", "noise", "sampler"]


# ------------------------------------------------------------ delta vs N
def test_delta_at_or_above_one_over_n_is_refused_everywhere():
  ledger = privacy.PrivacyLedger(dataset_size=1000)
  ledger.record(_step(0.05, 1.0), kind="train", count=10)
  for call in (ledger.epsilon, ledger.proven_epsilon, ledger.statement,
               ledger.epsilon_without_amplification, ledger.check_delta):
    with pytest.raises(ValueError, match=r"delta=0.5 to be < 1/dataset_size"):
      call(0.5)
  with pytest.raises(ValueError, match="1/dataset_size"):
    privacy.planned_epsilon(dataset_size=1000, batch_size=10,
                            noise_multiplier=1.0, epochs=1, delta=1e-3)
  with pytest.raises(ValueError, match="1/dataset_size"):
    privacy.calibrate_noise_multiplier(1.0, 0.9, 1000, 10, 1)
  with pytest.warns(UserWarning, match="1/\\(10 N\\)"):
    ledger.epsilon(5e-4)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    ledger.epsilon(1e-5)  # Well below 1/N: no warning.


# ------------------------------------------------------------ RDP and PLD
def test_rdp_is_clamped_at_zero():
  orders = np.array(rdp_lib.DEFAULT_RDP_ORDERS)
  curve = _rdp_fast.poisson_gaussian_rdp(1e-9, 1.0, orders)
  assert np.all(curve >= 0)
  ledger = privacy.PrivacyLedger()
  ledger.record(_step(1e-9, 1.0), kind="train", count=10**15)
  ledger.record(_step(0.01, 1.0), kind="train", count=100)
  alone = privacy.PrivacyLedger()
  alone.record(_step(0.01, 1.0), kind="train", count=100)
  assert ledger.epsilon(DELTA) >= alone.epsilon(DELTA)


def test_pld_memory_is_bounded_with_rdp_fallback():
  ledger = privacy.PrivacyLedger(accountant="pld")
  ledger.record(_step(0.01, 0.01), kind="train", count=100)
  with pytest.warns(UserWarning, match="RDP instead"):
    eps = ledger.epsilon(DELTA)
  assert eps == pytest.approx(ledger.epsilon(DELTA, accountant="rdp"),
                              rel=1e-12)
  # Ordinary runs still use PLD (smaller than RDP).
  normal = privacy.PrivacyLedger(accountant="pld")
  normal.record(_step(0.01, 1.1), kind="train", count=1000)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert normal.epsilon(DELTA) < normal.epsilon(DELTA, accountant="rdp")

"""PrivacyLedger, accounting, calibration: checked against dp_accounting."""


import dp_accounting
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib
import numpy as np
import pytest
import tensorflow as tf

from dpquant_tf import privacy
from dpquant_tf.privacy import _accounting
from dpquant_tf.privacy import _rdp_fast

DELTA = 1e-5


def _step(q, z):
  return dp_accounting.PoissonSampledDpEvent(
      q, dp_accounting.GaussianDpEvent(z))


def _reference(events):
  acc = dp_accounting.rdp.RdpAccountant()
  acc.compose(dp_accounting.ComposedDpEvent(
      [dp_accounting.SelfComposedDpEvent(e, c) for e, c in events]))
  return acc.get_epsilon(DELTA)


def test_fast_rdp_matches_dp_accounting():
  orders = np.array(rdp_lib.DEFAULT_RDP_ORDERS)
  for q in (1e-4, 0.004, 0.02, 0.3):
    for z in (0.5, 1.1, 3.0):
      ref = rdp_lib._compute_rdp_poisson_subsampled_gaussian(q, z, orders)
      fast = _rdp_fast.poisson_gaussian_rdp(q, z, orders)
      np.testing.assert_allclose(fast, ref, rtol=1e-6, atol=1e-12)
      for steps in (1, 1000):
        e_ref = rdp_lib.compute_epsilon(orders, steps * ref, DELTA)[0]
        e_fast = rdp_lib.compute_epsilon(orders, steps * fast, DELTA)[0]
        assert e_fast == pytest.approx(e_ref, rel=1e-9)


def test_constant_run_equals_rdp_accountant():
  ledger = privacy.PrivacyLedger()
  ledger.record(_step(0.01, 1.1), kind="train", count=2500)
  acc = dp_accounting.rdp.RdpAccountant()
  acc.compose(dp_accounting.SelfComposedDpEvent(_step(0.01, 1.1), 2500))
  assert ledger.epsilon(DELTA) == pytest.approx(acc.get_epsilon(DELTA),
                                                rel=1e-9, abs=1e-9)


def test_changing_noise_equals_composition_of_segments():
  ledger = privacy.PrivacyLedger()
  segments = [(_step(0.02, 1.0), 300), (_step(0.02, 1.5), 200),
              (_step(0.01, 0.8), 100)]
  for e, c in segments:
    ledger.record(e, kind="train", count=c)
  assert ledger.epsilon(DELTA) == pytest.approx(_reference(segments),
                                                rel=1e-9)


def test_monotone_in_steps_and_inverse_sigma():
  def eps(z, steps):
    ledger = privacy.PrivacyLedger()
    ledger.record(_step(0.01, z), kind="train", count=steps)
    return ledger.epsilon(DELTA)
  by_steps = [eps(1.0, s) for s in (10, 100, 1000, 5000)]
  assert all(a < b for a, b in zip(by_steps, by_steps[1:]))
  by_sigma = [eps(z, 1000) for z in (3.0, 2.0, 1.2, 0.8)]
  assert all(a < b for a, b in zip(by_sigma, by_sigma[1:]))


def test_memoized_10000_steps_100_values_one_curve_per_distinct_step():
  """10,000 steps with 100 distinct (q, z): one RDP curve per distinct pair,
  computed once (memoized), and the composition equals dp_accounting.
  (Speed is measured by no unit test; a curve count cannot be flaky.)"""
  _accounting._RDP_CACHE.clear()
  ledger = privacy.PrivacyLedger()
  events = [(_step(0.01, 0.7 + 0.01 * i), 100) for i in range(100)]
  for e, c in events:
    ledger.record(e, kind="train", count=c)
  eps = ledger.epsilon(DELTA)
  assert len(_accounting._RDP_CACHE) == 100
  assert ledger.epsilon(DELTA) == eps
  assert len(_accounting._RDP_CACHE) == 100  # the second query reuses them
  assert eps == pytest.approx(_reference(events), rel=1e-9)


def test_pld_option_tighter_for_homogeneous_run():
  ledger = privacy.PrivacyLedger(accountant="pld")
  ledger.record(_step(0.01, 1.1), kind="train", count=1000)
  pld = ledger.epsilon(DELTA)
  rdp = ledger.epsilon(DELTA, accountant="rdp")
  ref = dp_accounting.pld.PLDAccountant()
  ref.compose(dp_accounting.SelfComposedDpEvent(_step(0.01, 1.1), 1000))
  assert pld == pytest.approx(ref.get_epsilon(DELTA), rel=1e-9)
  assert pld < rdp


def test_analysis_share_and_statement():
  ledger = privacy.PrivacyLedger(dataset_size=1000)
  ledger.record(_step(0.05, 1.0), kind="train", count=400)
  eps_train = ledger.epsilon(DELTA)
  ledger.record(_step(0.05, 5.0), count=10)  # kind defaults to analysis
  total = ledger.epsilon(DELTA)
  assert total > eps_train
  share = ledger.analysis_share(DELTA)
  assert share == pytest.approx((total - eps_train) / total, rel=1e-12)
  assert 0 < share < 0.5
  text = ledger.statement(DELTA)
  assert "NOT Poisson sampled" in text and "shuffled fixed-size" in text
  assert "protects the release of all model checkpoints" in text
  poisson = privacy.PrivacyLedger(sampling_method="poisson")
  poisson.record(_step(0.05, 1.0), kind="train", count=400)
  text = poisson.statement(DELTA)
  assert "Poisson sampling" in text and "NOT Poisson" not in text
  # Without amplification (each example once per epoch) is much larger.
  assert poisson.epsilon_without_amplification(DELTA) > 3 * eps_train


def test_ledger_checkpoint_round_trip(tmp_path):
  ledger = privacy.PrivacyLedger()
  ledger.record(_step(0.05, 2.0), count=3)
  path = tf.train.Checkpoint(ledger=ledger).save(str(tmp_path / "ckpt"))
  restored = privacy.PrivacyLedger()
  tf.train.Checkpoint(ledger=restored).restore(path).assert_consumed()
  assert restored.events() == ledger.events()
  assert restored.epsilon(DELTA) == ledger.epsilon(DELTA)


def test_record_validation_messages():
  ledger = privacy.PrivacyLedger()
  with pytest.raises(TypeError, match="Expected event="):
    ledger.record(1.0)
  with pytest.raises(ValueError, match="Expected kind="):
    ledger.record(_step(0.1, 1.0), kind="eval")
  with pytest.raises(ValueError, match="Expected delta="):
    ledger.epsilon(0.0)


def test_noise_zero_is_infinite_epsilon():
  ledger = privacy.PrivacyLedger()
  ledger.record(_step(0.1, 0.0), kind="train")
  assert ledger.epsilon(DELTA) == float("inf")


# ---------------------------------------------------------------- planning
def test_planned_epsilon_counts_the_steps_the_pipeline_runs():
  # One epoch is steps_per_epoch(N, B / N) = ceil(60000 / 256) = 235 steps
  # (what fit(batch_size=256) and poisson_dataset run), so 60 epochs are
  # 14100 steps, not TF-Privacy's ceil(60 * 60000 / 256) = 14063.
  eps = privacy.planned_epsilon(dataset_size=60000, batch_size=256,
                                noise_multiplier=1.1, epochs=60, delta=DELTA)
  steps = privacy.planned_steps(60000, 256, 60)
  assert privacy.steps_per_epoch(60000, 256 / 60000) == 235
  assert steps == 60 * 235
  acc = dp_accounting.rdp.RdpAccountant()
  acc.compose(dp_accounting.SelfComposedDpEvent(_step(256 / 60000, 1.1),
                                                steps))
  assert eps == pytest.approx(acc.get_epsilon(DELTA), rel=1e-9)


def test_calibration_meets_target_tightly_and_counts_analyses():
  kw = dict(delta=DELTA, dataset_size=10000, batch_size=100, epochs=10)
  z = privacy.calibrate_noise_multiplier(2.0, **kw)
  plan = dict(kw, noise_multiplier=z)
  assert privacy.planned_epsilon(**plan) <= 2.0
  assert privacy.planned_epsilon(**plan) > 2.0 - 0.01 - 1e-9
  analyses = [(_step(0.1, 4.0), 5)]
  z_a = privacy.calibrate_noise_multiplier(2.0, analyses=analyses, **kw)
  assert z_a > z
  assert privacy.planned_epsilon(analyses=analyses,
                                 **dict(kw, noise_multiplier=z_a)) <= 2.0
  with pytest.raises(ValueError, match="reachable"):
    privacy.calibrate_noise_multiplier(
        0.5, analyses=[(_step(1.0, 0.5), 10)], **kw)


def test_statement_names_non_dp_releases_and_seeded_noise():
  from dpquant_tf.optimizers import DPQuantOptimizer  # pylint: disable=g-import-not-at-top
  ledger = privacy.PrivacyLedger(dataset_size=1000)
  DPQuantOptimizer(1.0, 1.0, ledger=ledger, dataset_size=1000)
  ledger.record(_step(0.05, 1.0), kind="train", count=10)
  text = " ".join(ledger.statement(DELTA).split())
  assert "released without DP" in text
  assert "training loss and metrics" in text and "validation metrics" in text
  assert "verbose=0" in text  # How to suppress them.
  assert "OS entropy" in text and "seeded" not in text
  DPQuantOptimizer(1.0, 1.0, ledger=ledger, dataset_size=1000, seed=3)
  text = " ".join(ledger.statement(DELTA).split())
  assert "explicitly seeded generator" in text

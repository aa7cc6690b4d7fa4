"""tools/compute_dpquant_privacy: library and --json binary."""

import json
import os
import subprocess
import sys

import dp_accounting
import pytest

from tools import compute_dpquant_privacy_lib as lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def test_epsilon_of_plan_matches_dp_accounting():
  out = lib.run(lib.PrivacyPlan(dataset_size=10000, batch_size=100,
                                epochs=5, delta=1e-5, noise_multiplier=1.0,
                                analysis_period=2))
  acc = dp_accounting.rdp.RdpAccountant()
  acc.compose(dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          0.01, dp_accounting.GaussianDpEvent(1.0)), 500))
  acc.compose(dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          0.05, dp_accounting.GaussianDpEvent(4.0)), 3))
  assert out["steps"] == 500 and out["analysis_releases"] == 3
  assert out["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
  assert 0 < out["analysis_epsilon_share"] < 0.2


def test_inverse_round_trip():
  out = lib.run(lib.PrivacyPlan(dataset_size=10000, batch_size=100,
                                epochs=5, delta=1e-5, target_epsilon=1.5))
  assert 1.5 - 0.01 <= out["epsilon"] <= 1.5
  again = lib.run(lib.PrivacyPlan(dataset_size=10000, batch_size=100,
                                  epochs=5, delta=1e-5,
                                  noise_multiplier=out["noise_multiplier"]))
  assert again["epsilon"] == pytest.approx(out["epsilon"], rel=1e-12)
  with pytest.raises(ValueError, match="Expected noise_multiplier=None"):
    lib.PrivacyPlan(dataset_size=10, batch_size=1, epochs=1, delta=1e-5)


def test_binary_prints_one_json_object():
  proc = subprocess.run(
      [sys.executable,
       os.path.join(ROOT, "tools", "compute_dpquant_privacy.py"),
       "--dataset_size=1000", "--batch_size=50", "--epochs=3",
       "--noise_multiplier=1.2", "--sampling=shuffled", "--json"],
      capture_output=True, text=True, check=True, timeout=120,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  data = json.loads(proc.stdout)
  assert data["steps"] == 60 and data["noise_multiplier"] == 1.2
  assert "NOT Poisson sampled" in data["statement"]


def test_binary_accepts_tf_privacy_flag_names():
  # TF-Privacy's compute_dp_sgd_privacy: --N --batch_size --noise_multiplier
  # --epochs --delta.
  proc = subprocess.run(
      [sys.executable,
       os.path.join(ROOT, "tools", "compute_dpquant_privacy.py"),
       "--N=1000", "--batch_size=50", "--noise_multiplier=1.2",
       "--epochs=3", "--delta=1e-6", "--json"],
      capture_output=True, text=True, check=True, timeout=120,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  data = json.loads(proc.stdout)
  same = lib.run(lib.PrivacyPlan(dataset_size=1000, batch_size=50, epochs=3,
                                 delta=1e-6, noise_multiplier=1.2))
  assert data["dataset_size"] == 1000 and data["delta"] == 1e-6
  assert data["epsilon"] == pytest.approx(same["epsilon"], rel=1e-12)


def test_shuffled_plan_reports_the_proven_epsilon():
  kw = dict(dataset_size=1000, batch_size=50, epochs=3, delta=1e-5,
            noise_multiplier=1.2)
  shuffled = lib.run(lib.PrivacyPlan(sampling="shuffled", **kw))
  poisson = lib.run(lib.PrivacyPlan(**kw))
  assert poisson["proven_epsilon"] == pytest.approx(poisson["epsilon"])
  assert shuffled["proven_epsilon"] > 2 * shuffled["epsilon"]

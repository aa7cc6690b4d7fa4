"""Mechanism audit: sound for every correct configuration, flags broken ones.

Soundness tests use few trials (fast); the tightness run is in docs/AUDIT.md
and in the slow test below.
"""

import json
import os
import subprocess
import sys

import pytest

import dpquant_tf
from dpquant_tf import audit
from tests.audit import _broken

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def _quantized_probe(dims):
  model = dpquant_tf.quantize_model(audit.linear_probe_model(dims))
  dpquant_tf.set_plan(model, dpquant_tf.get_plan(model))  # every layer on
  return model


_CORRECT = {
    "plain": {},
    "reclip": {"optimizer_kwargs": {"gradient_bits": 4,
                                    "sensitivity_mode": "reclip"}},
    "bound": {"optimizer_kwargs": {"gradient_bits": 4,
                                   "sensitivity_mode": "bound"}},
    "adam": {"optimizer_cls": dpquant_tf.DPQuantAdamOptimizer},
    "quantized_compute": {"model_fn": _quantized_probe},
}


@pytest.mark.parametrize("name", sorted(_CORRECT))
def test_lower_bound_stays_below_the_ledger(name):
  trials = 20 if name == "quantized_compute" else 40
  result = audit.audit_mechanism(trials=trials, noise_multiplier=1.0, seed=1,
                                 **_CORRECT[name])
  assert result.claimed_epsilon > 0
  assert not result.violated, result
  assert result.epsilon_lower_bound <= result.claimed_epsilon


@pytest.mark.parametrize("cls,steps,canary_norm", [
    (_broken.NoNoiseOptimizer, 1, 2.0),
    (_broken.NoClipOptimizer, 1, 20.0),
    (_broken.ReplayedNoiseOptimizer, 2, 2.0),
])
def test_broken_mechanisms_are_flagged(cls, steps, canary_norm):
  # z = 4: one step claims about 1.0; 60 trials per side can show > 2.5.
  result = audit.audit_mechanism(trials=60, noise_multiplier=4.0,
                                 optimizer_cls=cls, steps_per_trial=steps,
                                 canary_norm=canary_norm, seed=2)
  assert result.violated, result
  if steps == 2:  # The two-step score on the correct optimizer is sound.
    ok = audit.audit_mechanism(trials=60, noise_multiplier=4.0,
                               steps_per_trial=2, seed=2)
    assert not ok.violated, ok


def test_two_replicas_mirrored_sound_and_flags_missing_noise():
  out = subprocess.run(
      [sys.executable, "-m", "tests.audit._mirrored_worker", "40",
       "ok,nonoise"], cwd=_ROOT, capture_output=True, text=True, timeout=600,
      check=True)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["ok"]["replicas"] == 2
  assert result["ok"]["epsilon_lower_bound"] <= result["ok"]["claimed_epsilon"]
  assert (result["nonoise"]["epsilon_lower_bound"] >
          result["nonoise"]["claimed_epsilon"])


@pytest.mark.slow
def test_tightness_single_gaussian_step():
  # Pooled two-tailed test, t = 3.4 fixed from N(0,1) vs N(1,1) before the
  # run (expected bound 2.58; docs/AUDIT.md). The 50%-of-RDP target (2.365)
  # is met in expectation but misses in roughly 1 run of 7; the assertion
  # keeps the 50%-of-PLD floor (2.19), which fails rarely (about 3%).
  result = audit.audit_mechanism(trials=20000, noise_multiplier=1.0, seed=0,
                                 threshold=3.4)
  assert result.statistic == "pooled" and not result.violated
  assert result.epsilon_lower_bound >= 0.5 * result.claimed_epsilon_pld


def test_pooled_statistic_is_reported_beside_the_one_tailed():
  # Fixed thresholds: the pooled test counts both sides (2n) with t' = 1 - t;
  # epsilon_lower_bound reports the statistic chosen in advance.
  pooled = audit.audit_mechanism(trials=30, noise_multiplier=1.0, seed=3,
                                 threshold=1.5)
  assert pooled.statistic == "pooled"
  assert pooled.pooled.trials == 60 and pooled.pooled.mirror_threshold == -0.5
  assert pooled.epsilon_lower_bound == pooled.pooled.epsilon_lower_bound
  assert pooled.test.negatives == 30 and not pooled.violated
  one = audit.audit_mechanism(trials=30, noise_multiplier=1.0, seed=3,
                              threshold=1.5, statistic="one_tailed")
  assert one.epsilon_lower_bound == one.test.epsilon_lower_bound
  with pytest.raises(ValueError, match="statistic"):
    audit.audit_mechanism(trials=30, statistic="max")

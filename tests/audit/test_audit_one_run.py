"""One-run audit (Steinke et al. 2023) of a small training run."""

from dpquant_tf import audit
from tests.audit import _broken


def test_one_run_sound_for_dp_training_and_flags_missing_noise():
  ok = audit.audit_one_run(canaries=100, epochs=3, noise_multiplier=5.0)
  assert ok.steps == 12 and 0 < ok.claimed_epsilon
  assert not ok.violated, ok
  broken = audit.audit_one_run(canaries=100, epochs=3, noise_multiplier=5.0,
                               optimizer_cls=_broken.NoNoiseOptimizer)
  assert broken.claimed_epsilon == ok.claimed_epsilon
  assert broken.violated, broken

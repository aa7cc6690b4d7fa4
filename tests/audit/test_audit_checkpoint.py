"""Checkpoint case (issue 15, item 1): two consecutive checkpoints must not
let an adversary regenerate a step's noise."""

from dpquant_tf import audit
from tests.audit import _broken


def test_adversary_with_two_checkpoints_cannot_beat_the_accountant():
  # Fails on main before the generator was removed from checkpoints.
  result = audit.audit_checkpoint_replay(trials=30, noise_multiplier=4.0)
  assert not result.violated, result
  # Without the replayed noise the difference of the two updates is noisy:
  # the D' scores are not all on one side of every D score.
  assert result.test.false_positives + result.test.false_negatives > 0


def test_checkpointed_generator_is_flagged():
  result = audit.audit_checkpoint_replay(
      trials=30, noise_multiplier=4.0,
      optimizer_cls=_broken.CheckpointedNoiseOptimizer)
  assert result.violated, result

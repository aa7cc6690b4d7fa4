"""Privacy state that only grows (issue 20 item 3): restoring older weights
never lowers the spent budget; the ledger travels with every checkpoint that
can resume training; a ledger of another history is refused."""

import os

import dp_accounting
import numpy as np
import pytest
import tensorflow as tf

from dpquant_tf import privacy
from dpquant_tf.optimizers import DPQuantOptimizer

DELTA = 1e-5
N = 64


def _data(n=N, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 6)).astype("float32")
  y = rng.integers(0, 3, size=n)
  return x, y


def _setup(ledger=None, z=1.0):
  ledger = ledger or privacy.PrivacyLedger(sampling_method="poisson")
  opt = DPQuantOptimizer(1.0, z, ledger=ledger, dataset_size=N,
                         expected_batch_size=8.0, sampling_probability=0.125)
  tf.keras.utils.set_random_seed(0)
  model = tf.keras.Sequential([
      tf.keras.layers.Dense(5, activation="tanh", input_shape=(6,)),
      tf.keras.layers.Dense(3)])
  model.compile(optimizer=opt, loss=tf.keras.losses.SparseCategoricalCrossentropy(
      from_logits=True, reduction="none"))
  return model, opt, ledger


# fit's arrays are not the library's sampler: the owned step records them at
# q = 1 (no amplification by sampling).
def _reference(steps, q=1.0, z=1.0, analyses=()):
  acc = dp_accounting.rdp.RdpAccountant()
  acc.compose(dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)),
      steps))
  for event, count in analyses:
    acc.compose(dp_accounting.SelfComposedDpEvent(event, count))
  return acc.get_epsilon(DELTA)


def _fit(model, epochs):
  x, y = _data()
  model.optimizer.install_train_step(model)   # the owned DP step
  model.fit(x, y, batch_size=8, epochs=epochs, verbose=0, shuffle=False)


def test_load_weights_of_an_earlier_checkpoint_never_rolls_back(tmp_path):
  model, opt, ledger = _setup()
  _fit(model, 1)  # 8 steps
  model.save_weights(str(tmp_path / "early"))
  _fit(model, 4)  # 40 steps in all
  assert ledger.epsilon(DELTA) == pytest.approx(_reference(40), rel=1e-9)
  model.load_weights(str(tmp_path / "early"))
  # Right after the restore (no step yet): still 40 steps spent.
  assert ledger.epsilon(DELTA) == pytest.approx(_reference(40), rel=1e-9)
  _fit(model, 2)  # 16 more: 56 steps were taken in all.
  assert ledger.epsilon(DELTA) == pytest.approx(_reference(56), rel=1e-9)


def test_rollback_without_a_query_before_the_next_step(tmp_path):
  """The restore is noticed inside the train step, not only by queries."""
  model, opt, ledger = _setup()
  ckpt = tf.train.Checkpoint(model=model)
  _fit(model, 1)
  path = ckpt.write(str(tmp_path / "c"))
  _fit(model, 2)
  ckpt.read(path).assert_existing_objects_matched()
  _fit(model, 1)
  assert ledger.epsilon(DELTA) == pytest.approx(_reference(32), rel=1e-9)


def test_rollback_under_jit_compile(tmp_path):
  model, opt, ledger = _setup()
  model.compile(optimizer=opt, jit_compile=True,
                loss=tf.keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True, reduction="none"))
  _fit(model, 1)
  model.save_weights(str(tmp_path / "w"))
  _fit(model, 1)
  model.load_weights(str(tmp_path / "w"))
  _fit(model, 1)
  assert ledger.epsilon(DELTA) == pytest.approx(_reference(24), rel=1e-9)


def test_resume_in_a_fresh_process_counts_checkpoint_steps_once(tmp_path):
  """A killed run resumed from its checkpoint (new objects, as in a new
  process) accounts exactly what the uninterrupted run accounts, analyses
  included: the ledger is saved with the model's checkpoint."""
  analysis = privacy.sampled_gaussian_event(0.05, 4.0)
  model, opt, ledger = _setup()
  _fit(model, 2)
  ledger.record(analysis, kind="analysis")
  tf.train.Checkpoint(model=model).write(str(tmp_path / "c"))
  # "Kill": everything in memory is lost.
  model2, opt2, ledger2 = _setup()
  tf.train.Checkpoint(model=model2).read(
      str(tmp_path / "c")).assert_existing_objects_matched()
  assert ledger2.epsilon(DELTA) == pytest.approx(
      _reference(16, analyses=[(analysis, 1)]), rel=1e-9)
  _fit(model2, 1)
  assert ledger2.epsilon(DELTA) == pytest.approx(
      _reference(24, analyses=[(analysis, 1)]), rel=1e-9)


def test_restoring_the_ledger_alone_never_drops_releases(tmp_path):
  analysis = privacy.sampled_gaussian_event(0.05, 4.0)
  ledger = privacy.PrivacyLedger()
  ckpt = tf.train.Checkpoint(ledger=ledger)
  ledger.record(analysis, kind="analysis")
  path = ckpt.write(str(tmp_path / "l"))
  ledger.record(analysis, kind="analysis", count=2)
  ckpt.read(path)
  assert ledger.events("analysis") == [(analysis, 3)]
  ledger.record(analysis, kind="analysis")
  assert ledger.events("analysis") == [(analysis, 4)]


def test_backup_and_restore_keeps_estimator_releases(tmp_path):
  """BackupAndRestore (the model's checkpoint) carries the ledger's analysis
  releases: a run interrupted and resumed in new objects keeps them."""
  analysis = privacy.sampled_gaussian_event(0.05, 4.0)

  class Release(tf.keras.callbacks.Callback):

    def __init__(self, ledger, crash_at=None):
      super().__init__()
      self.ledger, self.crash_at = ledger, crash_at

    def on_epoch_begin(self, epoch, logs=None):
      if epoch == self.crash_at:
        raise RuntimeError("crash")
      self.ledger.record(analysis, kind="analysis")

  x, y = _data()
  backup = str(tmp_path / "backup")
  model, _, ledger = _setup()
  model.optimizer.install_train_step(model)
  with pytest.raises(RuntimeError):
    model.fit(x, y, batch_size=8, epochs=3, verbose=0, shuffle=False,
              callbacks=[tf.keras.callbacks.BackupAndRestore(backup),
                         Release(ledger, crash_at=2)])
  model2, _, ledger2 = _setup()
  model2.optimizer.install_train_step(model2)
  model2.fit(x, y, batch_size=8, epochs=3, verbose=0, shuffle=False,
             callbacks=[tf.keras.callbacks.BackupAndRestore(backup),
                        Release(ledger2)])
  assert ledger2.events("analysis") == [(analysis, 3)]
  assert ledger2.epsilon(DELTA) == pytest.approx(
      _reference(24, analyses=[(analysis, 3)]), rel=1e-9)


def test_a_ledger_of_another_history_is_refused(tmp_path):
  model, opt, ledger = _setup()
  _fit(model, 1)
  ledger.epsilon(DELTA)  # The ledger notes the optimizer's history.
  path = tf.train.Checkpoint(ledger=ledger).write(str(tmp_path / "l"))
  other, opt2, ledger2 = _setup()
  _fit(other, 1)
  tf.train.Checkpoint(ledger=ledger2).read(path)
  with pytest.raises(ValueError, match="history"):
    ledger2.epsilon(DELTA)


def test_a_ledger_newer_than_the_optimizer_is_refused(tmp_path):
  """Ledger from a later checkpoint than the optimizer (in a new process):
  the optimizer's history lost steps the ledger saw."""
  model, opt, ledger = _setup()
  _fit(model, 1)
  early = tf.train.Checkpoint(model=model).write(str(tmp_path / "m"))
  _fit(model, 1)
  ledger.epsilon(DELTA)
  late = tf.train.Checkpoint(ledger=ledger).write(str(tmp_path / "l"))
  model2, opt2, ledger2 = _setup()
  tf.train.Checkpoint(model=model2).read(early)
  tf.train.Checkpoint(ledger=ledger2).read(late)
  with pytest.raises(ValueError, match="history"):
    ledger2.epsilon(DELTA)


def test_an_optimizer_deep_copied_after_a_query_accounts_its_own_steps():
  """``dp_events`` traces the spent-history sync once per optimizer; a deep
  copy made after a query must not run the original's trace (its
  variables). Fails if the copy cannot be made or reads the original."""
  import copy
  model, opt, ledger = _setup()
  _fit(model, 1)   # 8 steps
  assert sum(c for _, c in opt.dp_events()) == 8
  twin = copy.deepcopy(opt)
  assert sum(c for _, c in twin.dp_events()) == 8
  _fit(model, 1)   # the original only: 16
  assert sum(c for _, c in opt.dp_events()) == 16
  assert sum(c for _, c in twin.dp_events()) == 8
  assert ledger.epsilon(DELTA) == pytest.approx(_reference(16), rel=1e-9)

"""Issue 20, the rest: every seeded source recorded and stated (sampling
included, also when a seeded sampler is fed straight to fit), the spent
budget never lowered by restoring an older checkpoint in a new process (the
ledger's journal), the sampler's seals across restores, and sealed Poisson
batches under a SHUFFLED ledger.

"A new process" is simulated by new objects (model, optimizer, ledger): the
in-memory state of the old ones is not reachable from the new ones."""

import dp_accounting
import numpy as np
import pytest
import tensorflow as tf

import dpquant_tf
from dpquant_tf import privacy
from dpquant_tf.optimizers import DPQuantOptimizer

DELTA = 1e-5
N = 64
Q = 0.125


def _data(n=N, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 6)).astype("float32")
  y = (x[:, 0] > 0).astype("int32")
  return x, y


def _loss():
  return tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                       reduction="none")


def _setup(ledger=None, *, seed=None, sampling="poisson", journal=None,
           quantized=False):
  if ledger is None:
    kwargs = {} if journal is None else {"journal_path": journal}
    ledger = privacy.PrivacyLedger(sampling_method=sampling, dataset_size=N,
                                   **kwargs)
  opt = DPQuantOptimizer(1.0, 1.0, ledger=ledger, dataset_size=N,
                         expected_batch_size=Q * N, sampling_probability=Q,
                         seed=seed)
  tf.keras.utils.set_random_seed(0)
  model = tf.keras.Sequential([
      tf.keras.layers.Dense(4, activation="tanh", input_shape=(6,)),
      tf.keras.layers.Dense(2)])
  if quantized:
    from dpquant_tf import quantization  # pylint: disable=g-import-not-at-top
    model = quantization.quantize_model(model)
  model.compile(optimizer=opt, loss=_loss())
  model.optimizer.install_train_step(model)
  return model, opt, ledger


def _gaussian_eps(steps, z=1.0):
  acc = dp_accounting.rdp.RdpAccountant()
  acc.compose(dp_accounting.GaussianDpEvent(z), steps)
  return acc.get_epsilon(DELTA)


def _poisson_eps(steps, q=Q, z=1.0):
  acc = dp_accounting.rdp.RdpAccountant()
  acc.compose(dp_accounting.PoissonSampledDpEvent(
      q, dp_accounting.GaussianDpEvent(z)), steps)
  return acc.get_epsilon(DELTA)


def _qs(opt):
  return sorted({round(e.sampling_probability, 12) for e, _ in opt.dp_events()})


# ------------------------------------------------------ seeded sampling
def test_a_seeded_sampler_fed_to_fit_is_not_credited_with_amplification():
  # Issue row: poisson_dataset(seed=0): the statement said OS entropy and
  # called the amplified figure (3.93) the guarantee (28.8 once the sample
  # is known).
  x, y = _data()
  model, opt, ledger = _setup()
  hist = model.fit(privacy.poisson_dataset(x, y, Q, 24, steps=8, seed=0),
                   verbose=0, callbacks=[privacy.PrivacyCallback(ledger,
                                                                 DELTA)])
  assert opt.dp_event_steps() == 8
  # Every one of the 8 steps may hold any record: 8 Gaussian mechanisms.
  assert hist.history["epsilon"][-1] == pytest.approx(_gaussian_eps(8),
                                                      rel=1e-9)
  assert ledger.proven_epsilon(DELTA) == pytest.approx(_gaussian_eps(8),
                                                       rel=1e-9)
  assert "sampler" in ledger.seeded_sources()
  text = ledger.statement(DELTA)
  assert "poisson_dataset seed=" in text
  assert "from OS entropy" not in text


def test_a_seeded_sampler_under_make_private_is_stated_too(tmp_path):
  x, y = _data()
  journal = tmp_path / "ckpt" / "privacy_journal.json"
  private = dpquant_tf.make_private(
      tf.keras.Sequential([tf.keras.layers.Dense(2, input_shape=(6,))]),
      x, y, target_epsilon=50.0, delta=DELTA, epochs=1, batch_size=8,
      loss=_loss(), journal_path=str(journal))
  private.model.fit(privacy.poisson_dataset(x, y, Q, 24, steps=4, seed=3),
                    verbose=0, callbacks=private.callbacks)
  z = private.noise_multiplier
  steps = private.optimizer.dp_event_steps()
  assert 1 <= steps <= 4 and _qs(private.optimizer) == [1.0]
  # At q = 1 the budget (target 50) stops the run early.
  assert private.epsilon() == pytest.approx(_gaussian_eps(steps, z),
                                            rel=1e-9)
  assert private.epsilon() <= 50.0
  assert "sampler" in private.ledger.seeded_sources()
  assert '"sampler"' in journal.read_text()   # the journal has it too


def test_every_seeded_source_survives_checkpoint_and_restore(tmp_path):
  x, y = _data()
  model, opt, ledger = _setup(seed=5)
  model.fit(privacy.poisson_dataset(x, y, Q, 24, steps=2, seed=0), verbose=0)
  assert set(ledger.seeded_sources()) == {"noise", "sampler"}
  path = tf.train.Checkpoint(model=model).write(str(tmp_path / "c"))
  # A new process, with an unseeded optimizer.
  model2, opt2, ledger2 = _setup()
  tf.train.Checkpoint(model=model2).read(path).assert_existing_objects_matched()
  assert not opt2.noise_is_seeded
  assert set(ledger2.seeded_sources()) == {"noise", "sampler"}
  text = ledger2.statement(DELTA)
  assert "optimizer seed=" in text and "poisson_dataset seed=" in text
  assert ledger2.proven_epsilon(DELTA) == pytest.approx(_gaussian_eps(2),
                                                        rel=1e-9)


def test_a_seeded_estimator_is_recorded_and_survives_restore(tmp_path):
  from dpquant_tf import schedule  # pylint: disable=g-import-not-at-top
  x, y = _data()
  model, _, ledger = _setup(quantized=True)
  est = schedule.LossSensitivityEstimator(x, y, sampling_rate=0.25,
                                          noise_multiplier=2.0, loss=_loss(),
                                          seed=0)
  est.estimate(model, ledger=ledger, layers=["dense"])
  path = tf.train.Checkpoint(model=model).write(str(tmp_path / "c"))
  model2, _, ledger2 = _setup(quantized=True)
  tf.train.Checkpoint(model=model2).read(path)
  assert "estimator" in ledger2.seeded_sources()
  assert "estimator (seed=)" in ledger2.statement(DELTA).replace("\n", " ")
  # Its release is accounted without amplification.
  acc = dp_accounting.rdp.RdpAccountant()
  acc.compose(est.dp_event().event)
  assert ledger2.proven_epsilon(DELTA) == pytest.approx(
      acc.get_epsilon(DELTA), rel=1e-9)


def test_the_statement_names_the_dp_algorithm_of_the_optimizer():
  from dpquant_tf.optimizers import DPQuantAdamOptimizer  # pylint: disable=g-import-not-at-top
  for cls, name in ((DPQuantOptimizer, "DP-SGD"),
                    (DPQuantAdamOptimizer, "DP-Adam")):
    ledger = privacy.PrivacyLedger(dataset_size=N)
    cls(1.0, 1.0, ledger=ledger, dataset_size=N)
    assert ledger.statement(DELTA).startswith(f"{name} (dpquant_tf)")


# --------------------------------------------- SHUFFLED ledger, sealed data
def test_a_shuffled_ledger_fed_sealed_batches_records_the_sampler():
  # The steps' q comes from the seal, not from the ledger's declaration; a
  # Poisson batch is not "each example once per epoch" (a record can be in
  # several batches of an epoch), so that figure is not the guarantee.
  x, y = _data()
  model, opt, ledger = _setup(sampling="shuffled")
  hist = model.fit(privacy.poisson_dataset(x, y, Q, 24, steps=8), verbose=0,
                   callbacks=[privacy.PrivacyCallback(ledger, DELTA)])
  assert _qs(opt) == [Q] and opt.dp_event_steps() == 8
  assert hist.history["epsilon"][-1] == pytest.approx(_poisson_eps(8),
                                                      rel=1e-9)
  # Seeded: every step a Gaussian mechanism, not ceil(8 q) = 1 of them.
  model, opt, ledger = _setup(sampling="shuffled")
  model.fit(privacy.poisson_dataset(x, y, Q, 24, steps=8, seed=1),
            verbose=0)
  assert ledger.proven_epsilon(DELTA) == pytest.approx(_gaussian_eps(8),
                                                       rel=1e-9)


# ------------------------------------------------------------ seals
def _forged(x, y, steps, sid=12345.0):
  """Batches of the right shape whose seals the library did not make."""
  rows = 24
  xb = np.zeros((steps, rows, 6), "float32")
  yb = np.zeros((steps, rows), "int32")
  mask = np.zeros((steps, rows), "float32")
  seal = np.zeros((steps, rows, 4), "float64")
  rng = np.random.default_rng(0)
  for t in range(steps):
    idx = np.flatnonzero(rng.uniform(size=N) < Q)[:rows]
    xb[t, :len(idx)], yb[t, :len(idx)], mask[t, :len(idx)] = x[idx], y[idx], 1
    seal[t] = [sid, t, Q, N]
  return tf.data.Dataset.from_tensor_slices((xb, yb, mask, seal))


def test_forged_seals_get_no_amplification():
  x, y = _data()
  model, opt, _ = _setup()
  model.fit(_forged(x, y, 4), verbose=0)
  assert _qs(opt) == [1.0]


def test_replayed_batches_after_a_restore_get_no_amplification(tmp_path):
  x, y = _data()
  model, opt, _ = _setup()
  drawn = list(privacy.poisson_dataset(x, y, Q, 24, steps=4))
  replay = tf.data.Dataset.from_tensor_slices(
      tuple(np.stack([b[i].numpy() for b in drawn]) for i in range(4)))
  model.fit(replay, verbose=0)       # consumed as drawn: amplified
  assert _qs(opt) == [Q]
  path = tf.train.Checkpoint(model=model).write(str(tmp_path / "c"))
  model2, opt2, _ = _setup()
  tf.train.Checkpoint(model=model2).read(path)
  model2.fit(replay, verbose=0)      # the same draws again: not fresh
  assert sum(c for e, c in opt2.dp_events()
             if e.sampling_probability == 1.0) == 4


# ------------------------------------- restores across processes: journal
def _fit_arrays(model, epochs, initial_epoch=0):
  x, y = _data()
  model.fit(x, y, batch_size=8, epochs=epochs, initial_epoch=initial_epoch,
            verbose=0, shuffle=False)


def test_restoring_an_older_checkpoint_in_a_new_process_keeps_the_budget(
    tmp_path):
  journal = str(tmp_path / "ckpt" / "privacy_journal.json")
  model, opt, ledger = _setup(journal=journal)
  manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model),
                                       str(tmp_path / "ckpt"), max_to_keep=5)
  _fit_arrays(model, 1)
  first = manager.save()
  ledger.record(privacy.sampled_gaussian_event(0.1, 3.0), kind="analysis")
  _fit_arrays(model, 2, 1)
  manager.save()
  spent = ledger.proven_epsilon(DELTA)
  assert opt.dp_spent_steps() == 16
  # New process: restore the OLDER checkpoint (8 steps, no analysis).
  model2, opt2, ledger2 = _setup(journal=journal)
  tf.train.Checkpoint(model=model2).read(first)
  assert opt2.dp_event_steps() == 8
  assert ledger2.proven_epsilon(DELTA) == pytest.approx(spent, rel=1e-9)
  _fit_arrays(model2, 1)
  assert ledger2.proven_epsilon(DELTA) > spent


def test_model_checkpoint_files_restored_older_in_a_new_process(tmp_path):
  journal = str(tmp_path / "privacy_journal.json")
  model, opt, ledger = _setup(journal=journal)
  model.fit(*_data(), batch_size=8, epochs=3, verbose=0, shuffle=False,
            callbacks=[tf.keras.callbacks.ModelCheckpoint(
                str(tmp_path / "w{epoch}"), save_weights_only=True)])
  spent = ledger.proven_epsilon(DELTA)
  model2, opt2, ledger2 = _setup(journal=journal)
  model2.load_weights(str(tmp_path / "w1"))
  _fit_arrays(model2, 1)   # the optimizer's variables restore on build
  assert ledger2.proven_epsilon(DELTA) >= spent
  assert ledger2.proven_epsilon(DELTA) == pytest.approx(_gaussian_eps(32),
                                                        rel=1e-9)


def test_without_the_journal_the_statement_says_what_cannot_be_seen():
  _, _, ledger = _setup()
  assert "journal" in ledger.statement(DELTA)


def test_with_a_journal_a_ledger_newer_than_the_optimizer_is_still_refused(
    tmp_path):
  journal = str(tmp_path / "privacy_journal.json")
  model, _, ledger = _setup(journal=journal)
  _fit_arrays(model, 1)
  older = tf.train.Checkpoint(model=model).write(str(tmp_path / "m"))
  _fit_arrays(model, 2, 1)
  newer_ledger = tf.train.Checkpoint(ledger=ledger).write(str(tmp_path / "l"))
  model2, _, ledger2 = _setup(journal=journal)
  tf.train.Checkpoint(model=model2).read(older)
  tf.train.Checkpoint(ledger=ledger2).read(newer_ledger)
  with pytest.raises(ValueError, match="does not match the optimizer"):
    ledger2.proven_epsilon(DELTA)

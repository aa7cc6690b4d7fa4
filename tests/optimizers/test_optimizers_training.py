"""DPQuantOptimizer in Keras training: XLA, schedule changes without
retrace, steps_per_execution, config round trip, checkpoints."""

import math

import dp_accounting
import numpy as np
import pytest
import tensorflow as tf

from dpquant_tf import privacy
from dpquant_tf import training
from dpquant_tf.optimizers import DPQuantAdamOptimizer
from dpquant_tf.optimizers import DPQuantOptimizer
from dpquant_tf.privacy import _mechanisms as M
from tests.optimizers._helpers import make_data as _data
from tests.optimizers._helpers import make_loss as _loss
from tests.optimizers._helpers import make_model as _model


@pytest.mark.parametrize(
    "jit", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_bound_mode_records_effective_noise_and_changes_without_retrace(jit):
  x, y = _data(32)
  model = _model()
  opt = DPQuantOptimizer(1.0, 2.0, sensitivity_mode="bound",
                         sampling_probability=0.25, learning_rate=0.1)
  model.compile(optimizer=opt, loss=_loss(), jit_compile=jit)

  class Switch(tf.keras.callbacks.Callback):

    def on_epoch_begin(self, epoch, logs=None):
      if epoch == 1:
        self.traces = model.train_function.experimental_get_tracing_count()
        opt.set_gradient_bits({"dense": 4})
      if epoch == 2:
        opt.set_gradient_bits(0)
        opt.set_noise_multiplier(1.5)

  switch = Switch()
  training.install_dp_train_step(model).fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[switch])
  # Bits and noise changed twice: no retrace after the first epoch.
  assert model.train_function.experimental_get_tracing_count() == (
      switch.traces)
  sizes = [v.shape.num_elements() for v in model.trainable_variables]
  levels = M.levels_for_bits(4)
  sens = 1.0 + math.sqrt(sum(d * (1.0 / levels) ** 2 for d in sizes[:2]))
  events = sorted(((e.sampling_probability, e.event.noise_multiplier), c)
                  for e, c in opt.dp_events())
  assert [k for _, k in events] == [4, 4, 4]
  assert [q for (q, _), _ in events] == [1.0] * 3  # arrays: q = 1
  zs = [z for (_, z), _ in events]
  assert zs[0] == pytest.approx(2.0 / sens, rel=1e-12)
  assert zs[1:] == [1.5, 2.0]
  # The callback's eager projection is the graph's value (one function).
  assert opt.current_event_parameters()[1] == 1.5
  assert opt.gradient_bits() == {v.name: 0 for v in model.trainable_variables}


def test_get_config_round_trip():
  opt = DPQuantAdamOptimizer(0.7, 1.3, 4, 2, learning_rate=0.003,
                             gradient_bits={"dense": 4}, update_bits=8,
                             sensitivity_mode="bound", dataset_size=100,
                             expected_batch_size=None, beta_1=0.8)
  config = opt.get_config()
  again = DPQuantAdamOptimizer.from_config(config)
  assert again.get_config() == config
  assert isinstance(again, DPQuantAdamOptimizer)
  serialized = tf.keras.optimizers.serialize(DPQuantOptimizer(1.0, 0.5))
  restored = tf.keras.optimizers.deserialize(serialized)
  assert isinstance(restored, DPQuantOptimizer)
  assert float(restored.noise_multiplier_var.numpy()) == 0.5


def test_checkpoint_restores_model_optimizer_ledger_not_generator(tmp_path):
  x, y = _data(32)

  def make():
    ledger = privacy.PrivacyLedger()
    opt = DPQuantOptimizer(1.0, 1.0, ledger=ledger, dataset_size=32,
                           gradient_bits=6)
    model = _model()
    model.compile(optimizer=opt, loss=_loss())
    return model, opt, ledger

  model, opt, ledger = make()
  training.install_dp_train_step(model).fit(x, y, batch_size=8, epochs=1, verbose=0)
  ledger.record(dp_accounting.GaussianDpEvent(10.0))
  ckpt = tf.train.Checkpoint(model=model, optimizer=opt, ledger=ledger)
  path = ckpt.save(str(tmp_path / "ckpt"))
  eps = ledger.epsilon(1e-5)
  state = opt.generator.state.numpy()

  model2, opt2, ledger2 = make()
  training.install_dp_train_step(model2).fit(x[:8], y[:8], batch_size=8, epochs=1, verbose=0)  # build
  tf.train.Checkpoint(model=model2, optimizer=opt2,
                      ledger=ledger2).restore(path)
  # The build step model2 took before the restore stays spent (a restore
  # never lowers the budget): at least the checkpoint's epsilon.
  assert ledger2.epsilon(1e-5) >= eps
  assert opt2.dp_spent_steps() == opt.dp_event_steps() + 1
  # The noise state is never saved (invariant 7): fresh entropy after restore.
  assert not np.array_equal(opt2.generator.state.numpy(), state)
  for a, b in zip(model.weights, model2.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  training.install_dp_train_step(model2).fit(x, y, batch_size=8, epochs=1, verbose=0)
  assert opt2.dp_event_steps() == 8
  assert ledger2.epsilon(1e-5) > eps


def test_steps_per_execution_counts_every_step():
  x, y = _data(64)
  model = _model()
  opt = DPQuantOptimizer(1.0, 1.0, dataset_size=64)
  model.compile(optimizer=opt, loss=_loss(), steps_per_execution=4)
  training.install_dp_train_step(model).fit(x, y, batch_size=8, epochs=1, verbose=0)
  (event, count), = opt.dp_events()
  assert (event.sampling_probability, count) == (1.0, 8)  # arrays: q = 1


def test_bits_set_before_first_step_apply_and_round_trip():
  x, y = _data(16)
  model = _model()
  opt = DPQuantOptimizer(1.0, 1.0, gradient_bits=6, dataset_size=16)
  opt.set_gradient_bits({"dense_1": 3, "dense/bias": 0})
  assert opt.gradient_bits() == {"*": 6, "dense_1": 3, "dense/bias": 0}
  config = opt.get_config()
  assert DPQuantOptimizer.from_config(config).gradient_bits() == (
      opt.gradient_bits())
  model.compile(optimizer=opt, loss=_loss())
  training.install_dp_train_step(model).fit(x, y, batch_size=8, verbose=0)
  assert opt.gradient_bits() == {"dense/kernel:0": 6, "dense/bias:0": 0,
                                 "dense_1/kernel:0": 3, "dense_1/bias:0": 3}
  with pytest.raises(ValueError, match="Expected bits key='conv'"):
    opt.set_gradient_bits({"conv": 4})


def test_adam_variant_trains_and_records_events():
  x, y = _data(64)
  model = _model()
  ledger = privacy.PrivacyLedger()
  opt = DPQuantAdamOptimizer(1.0, 0.5, learning_rate=0.02, gradient_bits=8,
                             dataset_size=64, ledger=ledger, seed=0)
  model.compile(optimizer=opt, loss=_loss())
  hist = training.install_dp_train_step(model).fit(x, y, batch_size=16, epochs=8, verbose=0)
  assert hist.history["loss"][-1] < hist.history["loss"][0]
  assert opt.dp_event_steps() == 32
  assert np.isfinite(ledger.epsilon(1e-5))


def test_config_never_replays_a_seed():
  opt = DPQuantOptimizer(1.0, 1.0, seed=5)
  again = DPQuantOptimizer.from_config(opt.get_config())
  assert opt.get_config()["seed"] is None
  seeded = DPQuantOptimizer(1.0, 1.0, seed=5).generator.state.numpy()
  assert not np.array_equal(again.generator.state.numpy(), seeded)

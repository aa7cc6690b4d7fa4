"""The noise key is never persisted (docs/METHOD.md section 4, invariant 7).

Issues "One privacy core" (1) and "Close eleven attacks" (1): the optimizer's
generator used to be tracked, so tf.train.Checkpoint and SavedModel stored its
state. Restoring replayed the noise, and from two consecutive checkpoints an
attacker regenerated one step's noise and recovered the noiseless clipped
gradient sum of a private batch.
"""

import logging
import os

import numpy as np
import pytest
import tensorflow as tf

import dpquant_tf  # noqa: F401  (Keras 2 first)
from dpquant_tf.optimizers import DPQuantOptimizer

N, LR, CLIP, SIGMA = 8, 1.0, 1.0, 1.0


def _data():
  rng = np.random.default_rng(0)
  return (rng.normal(size=(N, 6)).astype("float32"),
          rng.integers(0, 3, size=N))


def _compiled(**kwargs):
  tf.keras.utils.set_random_seed(0)
  model = tf.keras.Sequential([
      tf.keras.layers.Dense(5, activation="tanh", input_shape=(6,)),
      tf.keras.layers.Dense(3)])
  opt = DPQuantOptimizer(CLIP, SIGMA, learning_rate=LR, dataset_size=64,
                         per_example_method="jacobian", **kwargs)
  model.compile(optimizer=opt, loss=tf.keras.losses.SparseCategoricalCrossentropy(
      from_logits=True, reduction="none"))
  dpquant_tf.install_dp_train_step(model)
  return model, opt


def _weights(model):
  return [w.numpy().copy() for w in model.trainable_variables]


def _generator_like_entries(path, state):
  """Checkpoint entries that hold (or are named like) the generator state."""
  hits = []
  for name, shape in tf.train.list_variables(path):
    value = tf.train.load_variable(path, name)
    if "generator" in name.lower() or (
        tuple(shape) == tuple(state.shape) and
        np.asarray(value).dtype == state.dtype and
        np.array_equal(value, state)):
      hits.append((name, value))
  return hits


def test_restore_then_same_batch_gives_different_weights(tmp_path):
  x, y = _data()
  model, opt = _compiled()
  model.train_on_batch(x, y)  # build everything
  ckpt = tf.train.Checkpoint(model=model, optimizer=opt)
  path = ckpt.save(str(tmp_path / "ckpt"))
  model.train_on_batch(x, y)
  first = _weights(model)
  ckpt.restore(path)
  model.train_on_batch(x, y)
  second = _weights(model)
  assert opt.dp_event_steps() == 2  # the event table was restored too
  # Same weights before the step, same batch: only the noise may differ.
  assert not np.allclose(first[0], second[0])


def test_checkpoint_and_saved_model_hold_no_generator_state(tmp_path):
  x, y = _data()
  model, opt = _compiled()
  model.train_on_batch(x, y)
  state = opt.generator.state.numpy()
  path = tf.train.Checkpoint(model=model, optimizer=opt).save(
      str(tmp_path / "ckpt"))
  names = [n for n, _ in tf.train.list_variables(path)]
  assert any("dp_noise_multiplier" in n for n in names)  # optimizer is there
  assert _generator_like_entries(path, state) == []
  saved = str(tmp_path / "saved")
  model.save(saved)  # SavedModel, include_optimizer=True (default)
  vpath = os.path.join(saved, "variables", "variables")
  assert any("dp_noise_multiplier" in n for n, _ in
             tf.train.list_variables(vpath))
  assert _generator_like_entries(vpath, state) == []
  exposed = opt.variables() + opt.weights
  assert all(v is not opt.generator.state for v in exposed)
  assert all(not (np.shape(w) == state.shape and np.array_equal(w, state))
             for w in opt.get_weights())
  assert "generator" not in str(opt.get_config()).lower()


def test_two_consecutive_checkpoints_do_not_reveal_the_clipped_sum(tmp_path):
  """The attack of the issue, run end to end with the public API."""
  x, y = _data()
  model, opt = _compiled()
  model.train_on_batch(x, y)
  ckpt = tf.train.Checkpoint(model=model, optimizer=opt)
  path1 = ckpt.save(str(tmp_path / "c"))
  w0 = _weights(model)
  # The clipped sum the attacker wants: same weights, noise 0 (not released).
  clean_model, clean_opt = _compiled()
  clean_opt.set_noise_multiplier(0.0)
  clean_model.set_weights(model.get_weights())
  clean_model.train_on_batch(x, y)
  true_sum = [(a - b.numpy()) * N / LR
              for a, b in zip(w0, clean_model.trainable_variables)]
  model.train_on_batch(x, y)
  path2 = ckpt.save(str(tmp_path / "c"))
  # The attacker reads both checkpoints: weights and anything stateful.
  def read(path):
    return {n: tf.train.load_variable(path, n)
            for n, _ in tf.train.list_variables(path)}
  c1, c2 = read(path1), read(path2)
  names = [v.name.split(":")[0] for v in model.trainable_variables]
  keys = [next(k for k in c1 if k.startswith("model/") and
               k.endswith("VARIABLE_VALUE") and np.shape(c1[k]) == w.shape
               and np.array_equal(c1[k], w)) for w in w0]
  assert len(set(keys)) == len(names)
  noised_sum = [(c1[k] - c2[k]) * N / LR for k in keys]
  # A generator state in checkpoint 1 (an int64 [3] entry named like one)
  # replays this step's noise; without one the attacker draws fresh noise.
  states = [v for k, v in c1.items() if "generator" in k.lower() and
            np.asarray(v).dtype == np.int64 and np.size(v) == 3]
  gen = (tf.random.Generator.from_state(states[0], opt.generator.algorithm)
         if states else tf.random.Generator.from_non_deterministic_state())
  noise = [gen.normal(t.shape, dtype=tf.float32).numpy() * SIGMA * CLIP
           for t in noised_sum]
  recon = np.concatenate([(s - n).ravel() for s, n in zip(noised_sum, noise)])
  truth = np.concatenate([t.ravel() for t in true_sum])
  rel = np.linalg.norm(recon - truth) / np.linalg.norm(truth)
  assert rel > 0.5, rel  # was ~1e-6 when the checkpoint held the key


def test_seed_is_named_warned_exposed_and_never_serialized(caplog):
  with caplog.at_level(logging.WARNING):
    opt = DPQuantOptimizer(1.0, 1.0, noise_seed=3)
  assert opt.noise_is_seeded
  assert "secret" in caplog.text
  assert not DPQuantOptimizer(1.0, 1.0).noise_is_seeded
  assert DPQuantOptimizer(1.0, 1.0, seed=3).noise_is_seeded
  again = DPQuantOptimizer.from_config(opt.get_config())
  assert not again.noise_is_seeded
  np.testing.assert_array_equal(
      opt.generator.state.numpy(),
      DPQuantOptimizer(1.0, 1.0, seed=3).generator.state.numpy())
  with pytest.raises(ValueError, match="Expected noise_seed=4"):
    DPQuantOptimizer(1.0, 1.0, seed=3, noise_seed=4)

"""Noise differs across processes under XLA; a seeded run reproduces itself.

TF-Privacy's stateful noise repeats in every new process under
jit_compile=True (ENVIRONMENT.md). DPQuantOptimizer draws from
tf.random.Generator.from_non_deterministic_state() unless seeded.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

_SCRIPT = r"""
import sys
import dpquant_tf
import numpy as np
import tensorflow as tf
from dpquant_tf.optimizers import DPQuantOptimizer

seed = None if sys.argv[1] == "none" else int(sys.argv[1])
tf.keras.utils.set_random_seed(0)  # Same init and data order in every run.
rng = np.random.default_rng(0)
x = rng.normal(size=(32, 6)).astype("float32")
y = rng.integers(0, 3, size=32)
model = tf.keras.Sequential([
    tf.keras.layers.Dense(5, activation="tanh", input_shape=(6,)),
    tf.keras.layers.Dense(3)])
opt = DPQuantOptimizer(1.0, 1.0, learning_rate=0.5, gradient_bits=4,
                       seed=seed)
model.compile(optimizer=opt, jit_compile=True,
              loss=tf.keras.losses.SparseCategoricalCrossentropy(
                  from_logits=True, reduction="none"))
dpquant_tf.install_dp_train_step(model)
model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
np.save(sys.argv[2], np.concatenate([w.numpy().ravel()
                                     for w in model.weights]))
"""


def _train(tmp_path, seed, tag):
  out = str(tmp_path / f"{tag}.npy")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  subprocess.run([sys.executable, "-c", _SCRIPT, str(seed), out], check=True,
                 env=env, timeout=300)
  return np.load(out)


@pytest.mark.slow
def test_unseeded_processes_differ_seeded_reproduce(tmp_path):
  a = _train(tmp_path, "none", "a")
  b = _train(tmp_path, "none", "b")
  assert not np.allclose(a, b)
  s1 = _train(tmp_path, 123, "s1")
  s2 = _train(tmp_path, 123, "s2")
  np.testing.assert_array_equal(s1, s2)

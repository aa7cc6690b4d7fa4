"""Tests of examples/serve_lib and serve.py: SavedModel export, serving, audit."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from dpquant_tf import models
from examples import serve_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(name="trained")
def _trained(tmp_path):
  model = models.tutorial_cnn((28, 28, 1), 10)
  model.compile(optimizer=tf.keras.optimizers.legacy.Adam(1e-2),
                loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  rng = np.random.default_rng(0)
  x = rng.random((32, 28, 28, 1)).astype(np.float32)
  model.fit(x, rng.integers(0, 10, 32), epochs=1, verbose=0)
  export = str(tmp_path / "export")
  serve_lib.export_for_serving(model, export)
  return model, export, x


def test_round_trip_same_predictions(trained):
  model, export, x = trained
  expected = tf.nn.softmax(model(x, training=False)).numpy()
  got = serve_lib.predict(export, x, batch_size=5)
  np.testing.assert_allclose(got, expected, atol=1e-6)
  np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)


def test_signature_and_no_optimizer_state(trained):
  model, export, _ = trained
  loaded = tf.saved_model.load(export)
  fn = loaded.signatures["serving_default"]
  assert list(fn.structured_input_signature[1]) == ["images"]
  assert fn.structured_input_signature[1]["images"].shape.as_list() == [None, 28, 28, 1]
  assert list(fn.structured_outputs) == ["probabilities"]
  names = serve_lib.saved_variable_names(export)
  # Exactly the model's weights: 4 kernels + 4 biases; no Adam slots, no iteration.
  assert len(names) == len(model.weights) == 8
  assert not any("optimizer" in n or "iter" in n or "ledger" in n for n in names)
  total = sum(int(np.prod(s)) for s in names.values())
  assert total == model.count_params()


def test_saved_model_cli_runs(trained, tmp_path):
  _, export, x = trained
  cli = shutil.which("saved_model_cli") or os.path.join(
      os.path.dirname(sys.executable), "saved_model_cli")
  if not os.path.exists(cli):
    pytest.skip("saved_model_cli not installed")
  npy = tmp_path / "x.npy"
  np.save(npy, x[:2])
  proc = subprocess.run(
      [cli, "run", "--dir", export, "--tag_set", "serve", "--signature_def",
       "serving_default", "--inputs", f"images={npy}"],
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "Result for output key probabilities" in proc.stdout


def test_serve_binary(trained, tmp_path):
  _, export, _ = trained
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "examples", "serve.py"),
       f"--export_dir={export}", "--dataset=digits", "--max_test=20",
       "--num_examples=3"],
      capture_output=True, text=True, timeout=180, cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count("example ") == 3
  assert "SavedModel accuracy on 20 test images" in proc.stdout


def test_quantized_model_exports_plain_weights(tmp_path):
  from dpquant_tf import quantization  # pylint: disable=import-outside-toplevel
  model = quantization.quantize_model(models.tutorial_cnn((28, 28, 1), 10))
  layers = [info.name for info in quantization.quantizable_layers(model)]
  quantization.set_plan(model, quantization.QuantPlan.select(layers, layers))
  x = np.random.default_rng(1).random((6, 28, 28, 1)).astype(np.float32)
  export = str(tmp_path / "qexport")
  serve_lib.export_for_serving(model, export)
  # Served in full precision: equal to the wrapped model with quantization off.
  quantization.set_plan(model, quantization.QuantPlan.select(layers, []))
  expected = tf.nn.softmax(model(x, training=False)).numpy()
  np.testing.assert_allclose(serve_lib.predict(export, x), expected, atol=1e-5)
  names = serve_lib.saved_variable_names(export)
  assert len(names) == 8  # kernels and biases only: no quantizer switches/state

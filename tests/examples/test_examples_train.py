"""Tests of examples/train_lib and the train.py binary: short real runs."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from examples import serve_lib
from examples import train_cost_lib
from examples import train_lib
from dpquant_tf import costmodel

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = dict(max_train=64, max_test=32, batch_size=16, epochs=1, verbose=0)


def _quantization_ready():
  try:
    from dpquant_tf import quantization, schedule  # pylint: disable=import-outside-toplevel
    return (hasattr(quantization, "quantize_model")
            and hasattr(schedule, "DPQuantScheduler"))
  except ImportError:
    return False


needs_quantization = pytest.mark.skipif(
    not _quantization_ready(), reason="quantize_model / DPQuantScheduler not available")


def test_dp_fp32_run_writes_metrics_and_exports(tmp_path):
  metrics_path = tmp_path / "m" / "metrics.json"
  export = str(tmp_path / "export")
  result = train_lib.train(train_lib.TrainConfig(
      policy="none", target_epsilon=8.0, metrics_json=str(metrics_path),
      export_dir=export, **SMALL))
  with open(metrics_path) as f:
    m = json.load(f)
  assert m == json.loads(json.dumps(result.metrics, default=str))
  assert 0.0 <= m["test_accuracy"] <= 1.0
  # Calibrated to epsilon 8 within the calibration tolerance, never above.
  assert 7.9 <= m["epsilon"] <= 8.0 + 1e-9
  assert m["analysis_share"] == 0.0 and m["noise_multiplier"] > 0
  assert m["steps"] == 4 and m["theoretical_speedup"] == pytest.approx(1.0)
  assert [l["name"] for l in m["layers"]] == ["conv1", "conv2", "dense1", "logits"]
  assert len(m["plan_per_epoch"]) == 1 and m["wall_seconds"] > 0
  assert "Poisson" in m["privacy_statement"]
  # The export serves the same probabilities as the trained Keras model.
  x = np.random.default_rng(0).random((8, 28, 28, 1)).astype(np.float32)
  expected = tf.nn.softmax(result.model(x, training=False)).numpy()
  np.testing.assert_allclose(serve_lib.predict(export, x), expected, atol=1e-6)


@pytest.mark.slow
@needs_quantization
def test_bf16_run_reports_native_layers_and_measured_step_times(monkeypatch):
  monkeypatch.setenv("DPQUANT_ASSUME_BF16_HARDWARE", "1")
  result = train_lib.train(train_lib.TrainConfig(
      policy="static", ratio=0.5, format="bf16", target_epsilon=8.0,
      static_layers=("conv1", "dense1"), seed=1,
      **dict(SMALL, epochs=2)))
  m = result.metrics
  assert m["execution"]["precision"] == "bfloat16"
  assert m["execution"]["native_precision"] is True
  assert m["execution"]["native_layers"] == ["conv1", "dense1"]
  assert m["execution"]["simulated_layers"] == []
  plan = m["plan_per_epoch"][0]
  assert plan["plan"]["conv1"]["precision"] == "bfloat16"
  assert plan["plan"]["conv1"]["fwd_bits"] == 0
  # Modelled from the (assumed) bf16 hardware; nothing simulated.
  assert plan["hardware_speedup"] == pytest.approx(plan["speedup"])
  assert m["hardware_speedup"] > 1.0
  assert len(m["step_time_s"]) == 2 and all(t > 0 for t in m["step_time_s"])
  assert [p["step_time_s"] for p in m["plan_per_epoch"]] == m["step_time_s"]
  assert all(p["epoch_time_s"] >= p["step_time_s"] for p in m["plan_per_epoch"])
  # The wall time of an epoch counts the callbacks' epoch-start work too; the
  # epochs' walls tile the fit, so they sum to less than the whole run.
  assert all(p["epoch_wall_s"] >= p["epoch_time_s"] for p in m["plan_per_epoch"])
  assert sum(m["epoch_wall_s"]) <= m["train_seconds"]
  assert m["first_epoch_ratio"] == pytest.approx(
      m["epoch_wall_s"][0] / m["epoch_wall_s"][1])
  assert m["jacobian_fallback"] == []   # the CNN takes the fast path
  assert 7.9 <= m["epsilon"] <= 8.0 + 1e-9


def test_simulated_format_reports_simulated_layers_and_formats():
  cfg = train_lib.base_layer_config("luq_fp4")
  assert cfg.precision.name == "FLOAT32" and cfg.fwd_bits == 4
  cfg = train_lib.base_layer_config("bf16")
  assert cfg.precision.name == "BFLOAT16" and cfg.fwd_bits == cfg.bwd_bits == 0
  assert train_lib.base_layer_config("fp8_e4m3").precision.name == "FP8_E4M3"
  assert {"bf16", "fp8_e4m3", "luq_fp4"} <= set(train_lib.format_names())
  train_lib.TrainConfig(format="bf16").validate()
  layers = [costmodel.LayerCost("conv1", 10.0, 20.0)]
  plans, speedup, hw = train_cost_lib.cost_report(
      layers,
      [{"epoch": 0, "quantized": ["conv1"], "analysis": None}],
      train_lib.base_layer_config("luq_fp4"), 0.0,
      [{"epoch": 0, "step_time_s": 0.5, "epoch_time_s": 2.0}])
  assert plans[0]["simulated_layers"] == ["conv1"]
  assert plans[0]["native_layers"] == [] and plans[0]["step_time_s"] == 0.5
  assert speedup == pytest.approx(4.0) and hw == pytest.approx(1.0)


@pytest.mark.slow
def test_nodp_baseline_has_no_epsilon(tmp_path):
  result = train_lib.train(train_lib.TrainConfig(
      policy="none", dp=False, target_epsilon=None, seed=3, **SMALL))
  assert result.metrics["epsilon"] is None and result.metrics["delta"] is None
  assert result.metrics["steps"] == 4


@pytest.mark.parametrize("field,value,match", [
    ("policy", "greedy", "Expected policy='greedy'"),
    ("format", "fp2", "Expected format='fp2'"),
    ("epochs", 0, "Expected epochs=0"),
    ("noise_multiplier", 1.0, r"Expected \(target_epsilon, noise_multiplier\)"),
])
def test_config_validation(field, value, match):
  with pytest.raises(ValueError, match=match):
    train_lib.TrainConfig(**{field: value}).validate()


@pytest.mark.slow
@needs_quantization
@pytest.mark.parametrize("policy", ["static", "loss_aware"])
def test_quantized_policies_report_plans_and_speedup(tmp_path, policy):
  result = train_lib.train(train_lib.TrainConfig(
      policy=policy, ratio=0.5, format="int4", target_epsilon=8.0,
      analysis_period=1, analysis_sampling_rate=0.25, **SMALL))
  m = result.metrics
  plan = m["plan_per_epoch"][0]
  assert len(plan["quantized"]) == 2  # round(0.5 * 4)
  compute_only = costmodel.epoch_cost(m["layers"], plan["plan"])
  assert compute_only.speedup > 1.0
  if policy == "loss_aware":
    assert plan["analysis"] is not None and 0 < m["analysis_share"] < 1
    # The analysis time counts against the speed-up (a quarter of the data,
    # 1 + 4 * R forward passes: more than the epoch itself here).
    assert plan["analysis_fraction"] > 0
    assert m["theoretical_speedup"] == pytest.approx(
        1 / (plan["analysis_fraction"] + compute_only.relative_time))
  else:
    assert m["analysis_share"] == 0.0
    assert m["theoretical_speedup"] == pytest.approx(compute_only.speedup)
  assert m["epsilon"] <= 8.0 + 1e-9


@pytest.mark.slow
def test_train_binary_runs_on_npz(tmp_path):
  rng = np.random.default_rng(1)
  path = tmp_path / "mine.npz"
  np.savez(path, x_train=rng.integers(0, 256, (40, 28, 28), dtype=np.uint8),
           y_train=rng.integers(0, 10, 40),
           x_test=rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
           y_test=rng.integers(0, 10, 10))
  metrics = tmp_path / "metrics.json"
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "examples", "train.py"),
       f"--dataset=npz:{path}", "--policy=none", "--epochs=1", "--batch_size=10",
       "--verbose=0", f"--metrics_json={metrics}"],
      capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Test accuracy:" in proc.stdout and "epsilon=" in proc.stdout
  m = json.loads(metrics.read_text())
  assert m["train_size"] == 40 and math.isfinite(m["epsilon"])


def test_fallback_watch_sees_the_per_example_paths_jacobian_warning():
  """What train.py reports as "no jacobian fallback" is what it would see:
  a variable without a tap rule (a SimpleRNN) is reported."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from dpquant_tf import perexample  # pylint: disable=g-import-not-at-top
  model = perexample.tap_model(tf.keras.Sequential([
      tf.keras.Input((3, 2)), tf.keras.layers.SimpleRNN(2),
      tf.keras.layers.Dense(2)]))
  x = tf.ones((4, 3, 2))
  with perexample.FallbackWatch() as watch:
    with tf.GradientTape(persistent=True) as tape:
      loss = tf.reduce_sum(model(x) ** 2, axis=1)
    perexample.per_example_gradients(loss, model.trainable_variables, tape, 4)
  assert len(watch.messages) == 1 and "simple_rnn" in watch.messages[0]


@needs_quantization
def test_static_bf16_plan_at_ratio_one_pins_its_layers(monkeypatch):
  """A static bf16 plan at ratio 1.0 builds pinned layers (no switch): the
  run trains, reports every layer native bf16, evaluates in float32; at
  ratio 0.5 the layers stay switchable."""
  from dpquant_tf import quantization  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv("DPQUANT_ASSUME_BF16_HARDWARE", "1")
  result = train_lib.train(train_lib.TrainConfig(
      policy="static", ratio=1.0, format="bf16", target_epsilon=8.0, seed=1,
      **SMALL))
  layers = quantization.quantized_layers(result.model)
  assert layers and all(not l.switchable for l in layers)
  m = result.metrics
  assert m["execution"]["native_layers"] == ["conv1", "conv2", "dense1",
                                             "logits"]
  assert 0.0 <= m["test_accuracy"] <= 1.0 and m["steps"] == 4
  # Inference (evaluate, export) runs no bf16 op; training does.
  spec = tf.TensorSpec((4, 28, 28, 1), tf.float32)

  def bf16_ops(training):
    fn = tf.function(lambda t: result.model(t, training=training))
    graph_def = fn.get_concrete_function(spec).graph.as_graph_def()
    nodes = list(graph_def.node) + [n for f in graph_def.library.function
                                    for n in f.node_def]
    return [n.name for n in nodes
            if n.attr["T"].type == tf.bfloat16.as_datatype_enum]
  assert not bf16_ops(False)
  assert bf16_ops(True)
  half = train_lib.train(train_lib.TrainConfig(
      policy="static", ratio=0.5, format="bf16", target_epsilon=8.0, seed=1,
      **SMALL))
  assert all(l.switchable for l in quantization.quantized_layers(half.model))

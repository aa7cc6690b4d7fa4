"""The paper's cost model (dpquant_tf.costmodel), MAC weighting, and the
reports of tools/throughput_lib."""

import math

import pytest

from dpquant_tf import costmodel as tl
from tools import throughput_lib

LAYERS = [tl.LayerCost("a", 100.0, 200.0), tl.LayerCost("b", 10.0, 20.0),
          tl.LayerCost("c", 1.0, 2.0)]


def test_paper_formula_literal():
  # p = 0.9, s = 4, no analysis or overhead: 1 - 0.9 + 0.225 = 0.325.
  assert tl.cost_model_time(t_analysis=0, t_train=1, t_overhead=0, p=0.9, s=4) == \
      pytest.approx(0.325)
  # Overhead is not sped up; analysis is added.
  t = tl.cost_model_time(t_analysis=0.01, t_train=10, t_overhead=2, p=0.5, s=2)
  assert t == pytest.approx(0.01 + 0.75 * 8 + 2)
  with pytest.raises(ValueError, match="Expected t_overhead=3"):
    tl.cost_model_time(t_analysis=0, t_train=2, t_overhead=3, p=0.5, s=2)


def test_uniform_format_matches_formula_with_mac_weighted_p():
  plan = {"a": "fp4", "c": "fp4"}
  cost = tl.epoch_cost(LAYERS, plan)
  p = (300 + 3) / 333
  assert cost.quantized_fraction == pytest.approx(p)
  assert cost.relative_time == pytest.approx(
      tl.cost_model_time(t_analysis=0, t_train=1, t_overhead=0, p=p, s=4))
  assert cost.speedup == pytest.approx(1 / (1 - p + p / 4))
  assert cost.quantized_layers == ["a", "c"]


def test_macs_not_layer_count():
  """Quantizing 2 of 3 layers gives very different p depending on which."""
  big = tl.epoch_cost(LAYERS, {"a": "int4", "b": "int4"})
  small = tl.epoch_cost(LAYERS, {"b": "int4", "c": "int4"})
  assert big.quantized_fraction > 0.98 and small.quantized_fraction < 0.1
  assert big.speedup > 3.5 and small.speedup < 1.1


def test_mixed_formats_forward_backward_and_overrides():
  plan = {"a": {"enabled": True, "fwd_format": "int4_sawb", "fwd_bits": 4,
                "bwd_format": "fp8_e5m2", "bwd_bits": 8}}
  cost = tl.epoch_cost(LAYERS, plan, overhead_fraction=0.2, analysis_fraction=0.01)
  factor = (100 / 4 + 200 / 2 + 33) / 333
  assert cost.compute_factor == pytest.approx(factor)
  assert cost.relative_time == pytest.approx(0.01 + factor * 0.8 + 0.2)
  faster = tl.epoch_cost(LAYERS, plan, speedups={"fp8": 4.0, "int4": 4.0})
  assert faster.compute_factor == pytest.approx(33 / 333 + 300 / 333 / 4)
  off = tl.epoch_cost(LAYERS, {"a": {"enabled": False, "fwd_format": "fp4"}})
  assert off.speedup == pytest.approx(1.0) and off.quantized_layers == []


def test_int_bits_and_enum_like_formats():
  class Fmt:  # duck-typed QuantFormat member
    name = "INT"
  assert tl.speedup_for(Fmt(), 8) == 2.0
  assert tl.speedup_for(Fmt(), 4) == 4.0
  assert tl.speedup_for(Fmt(), 2) == 8.0
  assert tl.speedup_for(None) == 1.0
  assert tl.speedup_for("FP8_E4M3") == 2.0 and tl.speedup_for("LUQ_FP4") == 4.0
  with pytest.raises(ValueError, match="Expected format='bf13'"):
    tl.speedup_for("bf13")


def test_unknown_plan_layer_rejected():
  with pytest.raises(ValueError, match=r"Expected plan=\['zzz'\]"):
    tl.epoch_cost(LAYERS, {"zzz": "fp4"})


def test_run_speedup_is_time_weighted_not_mean_of_speedups():
  e1 = tl.epoch_cost(LAYERS, {})
  e2 = tl.epoch_cost(LAYERS, {"a": "fp4", "b": "fp4", "c": "fp4"})
  run = tl.run_speedup([e1, e2])
  assert run == pytest.approx(2 / (1 + 0.25))
  assert run != pytest.approx((1 + 4) / 2)
  assert tl.run_speedup([e1, e2], weights=[1, 3]) == pytest.approx(4 / (1 + 0.75))


def test_report_from_metrics_and_parse_speedups():
  metrics = {"layers": [{"name": c.name, "fwd_macs": c.fwd_macs, "bwd_macs": c.bwd_macs}
                        for c in LAYERS],
             "plan_per_epoch": [{"epoch": 0, "plan": {"a": "fp8"}},
                                {"epoch": 1, "plan": {"a": "fp8"},
                                 "analysis_fraction": 0.1}]}
  rep = throughput_lib.report_from_metrics(metrics)
  f = 33 / 333 + 300 / 333 / 2
  assert rep["per_epoch"][0]["speedup"] == pytest.approx(1 / f)
  assert rep["run_speedup"] == pytest.approx(2 / (2 * f + 0.1))
  assert throughput_lib.parse_speedups("fp4=3.5, fp8=2") == {"fp4": 3.5, "fp8": 2.0}
  with pytest.raises(ValueError, match="Expected speedups="):
    throughput_lib.parse_speedups("fp4")


def test_model_layer_costs_tutorial_cnn():
  from dpquant_tf import models
  costs = tl.model_layer_costs(models.tutorial_cnn())
  fwd = {c.name: c.fwd_macs for c in costs}
  assert fwd["conv1"] == 14 * 14 * 8 * 8 * 1 * 16
  assert fwd["conv2"] == 5 * 5 * 4 * 4 * 16 * 32
  assert fwd["dense1"] == 512 * 32 and fwd["logits"] == 320
  assert all(math.isclose(c.bwd_macs, 2 * c.fwd_macs) for c in costs)


def test_cost_model_counts_macs_with_the_library_counter():
  """One MAC counter: the cost model's MACs are quantizable_layers' MACs."""
  from dpquant_tf import models, quantization
  model = models.build_model("small_resnet", (16, 16, 1), 10)
  infos = quantization.quantizable_layers(model)
  costs = tl.model_layer_costs(model)
  assert [(c.name, c.fwd_macs, c.bwd_macs) for c in costs] == [
      (i.name, float(i.fwd_macs), float(i.bwd_macs)) for i in infos]
  wrapped = tl.model_layer_costs(quantization.quantize_model(model))
  assert [c.total for c in wrapped] == [c.total for c in costs]
  assert not hasattr(throughput_lib, "estimate_layer_costs")


def test_throughput_binary(tmp_path):
  import json as json_lib  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  metrics = tmp_path / "m.json"
  metrics.write_text(json_lib.dumps({
      "layers": [{"name": c.name, "fwd_macs": c.fwd_macs, "bwd_macs": c.bwd_macs}
                 for c in LAYERS],
      "plan_per_epoch": [{"epoch": 0, "plan": {"a": "fp4", "b": "fp4", "c": "fp4"}}]}))
  proc = subprocess.run(
      [sys.executable, os.path.join(repo, "tools", "throughput.py"),
       f"--metrics_json={metrics}", "--speedups=fp4=2"],
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "epoch 0: p=1.000 speedup=2.000x" in proc.stdout
  assert "run speedup (theoretical): 2.000x" in proc.stdout

"""tools/benchmark_lib native bfloat16 contenders (plans, ratios vs fp32 DP)."""

import dpquant_tf  # noqa: F401  (Keras 2 before TensorFlow)
import pytest

from tools import benchmark_lib as lib


@pytest.mark.slow
def test_bf16_contender_runs_chosen_layers_natively_in_bfloat16():
  s = lib.Settings(seed=0)
  weights = lib.build_model("cnn").get_weights()
  model, info = lib.make_contender("dp_bf16_50", "cnn", 8, weights, s)
  assert len(info["quantized_layers"]) == 2  # round(0.5 * 4)
  for name, report in info["execution"].items():
    if name in info["quantized_layers"]:
      assert report["precision"] == "bfloat16" and report["native"]
      assert report["simulated_formats"] == []
    else:
      assert report["precision"] == "float32"
  _, full = lib.make_contender("dp_bf16_100", "cnn", 8, weights, s)
  assert len(full["quantized_layers"]) == 4
  assert model.optimizer.__class__.__name__ == "DPQuantOptimizer"
  for bad in ("dp_bf16_x", "dp_bf16_150"):
    with pytest.raises(ValueError, match="Expected contender="):
      lib.make_contender(bad, "cnn", 8, weights, s)


def test_bf16_targets_read_speedups_over_fp32_dp():
  report = {"cases": [
      {"model": "small_resnet", "batch_size": 64, "dp_vs_dp_bf16_100": 1.5,
       "dp_vs_dp_bf16_75": 1.1},
      {"model": "cnn", "batch_size": 256, "dp_vs_dp_bf16_50": 0.9}]}
  lines = lib.check_bf16_targets(report)
  assert any("dp_vs_dp_bf16_100 = 1.5 (target >= 1.4): met" in l for l in lines)
  assert any("dp_vs_dp_bf16_75 = 1.1 (target >= 1.2): MISSED" in l for l in lines)
  assert any("cnn b=256 dp_vs_dp_bf16_50 = 0.9" in l and "MISSED" in l
             for l in lines)


@pytest.mark.slow
def test_benchmark_case_times_bf16_contenders_beside_fp32_dp():
  s = lib.Settings(rounds=1, steps=1, warmup=1,
                   contenders=("dp", "dp_bf16_100"))
  case = lib.run_case("cnn", 8, s)
  assert case["dp_ms"] > 0 and case["dp_bf16_100_ms"] > 0
  assert case["dp_vs_dp_bf16_100"] == pytest.approx(
      case["dp_ms"] / case["dp_bf16_100_ms"], rel=1e-2)
  assert set(case["dp_bf16_100_execution"].values()) == {"bfloat16 (native)"}

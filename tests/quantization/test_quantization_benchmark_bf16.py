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
  report = {"bf16_hardware": True, "cases": [
      {"model": "small_resnet", "batch_size": 64, "dp_vs_dp_bf16_100": 1.5},
      {"model": "encoder", "batch_size": 64, "dp_vs_dp_bf16_100": 1.9},
      {"model": "cnn", "batch_size": 256, "dp_vs_dp_bf16_100": 0.9},
      {"model": "cnn", "batch_size": 64, "dp_vs_dp_bf16_100": 0.5}]}
  lines = lib.check_bf16_targets(report)
  assert len(lines) == 3  # cnn b=64 has no target
  assert any("small_resnet b=64 dp_vs_dp_bf16_100 = 1.5 (target >= 1.3): met"
             in l for l in lines)
  assert any("encoder b=64 dp_vs_dp_bf16_100 = 1.9 (target >= 2.0): MISSED"
             in l for l in lines)
  report["bf16_hardware"] = False
  lines = lib.check_bf16_targets(report)
  assert any("cnn b=256" in l and "0.95, no bf16 units): MISSED" in l
             for l in lines)


def test_memory_estimate_and_skip_reason():
  # TF-Privacy grows with the square of the batch, the others linearly.
  assert lib.memory_estimate_mb("tfprivacy", 256, 64, 2000) == 32000
  assert lib.memory_estimate_mb("dp", 256, 64, 450) == 1800
  assert lib.skip_reason("tfprivacy", 256, None, 8000, 1500) is None
  assert lib.skip_reason("dp", 256, (64, 450.0), 8000, 1500) is None
  why = lib.skip_reason("tfprivacy", 256, (64, 1987.0), 8000, 1500)
  assert "estimated 31792 MB" in why and "quadratic" in why
  assert "8000 MB limit" in why


def test_watchdog_stops_a_worker_over_the_memory_limit():
  import sys  # pylint: disable=g-import-not-at-top
  hog = ("import time; print('LOG x b=1 big: warming up', flush=True); "
         "a = bytearray(400 * 2**20); a[::4096] = b'x' * len(a[::4096]); "
         "time.sleep(30)")
  logged = []
  lines, peak, killed, _ = lib.run_watched([sys.executable, "-c", hog], 200,
                                           logged.append, poll_s=0.05)
  assert killed and peak > 200
  assert lines == ["LOG x b=1 big: warming up"] and logged == ["x b=1 big: warming up"]
  lines, peak, killed, code = lib.run_watched(
      [sys.executable, "-c", "print('CASE {}')"], 2000)
  assert not killed and code == 0 and lines == ["CASE {}"]


@pytest.mark.slow
def test_benchmark_case_times_bf16_contenders_beside_fp32_dp():
  s = lib.Settings(rounds=1, steps=1, warmup=1,
                   contenders=("dp", "dp_bf16_100"))
  case = lib.run_case("cnn", 8, s)
  assert case["dp_ms"] > 0 and case["dp_bf16_100_ms"] > 0
  assert case["dp_vs_dp_bf16_100"] == pytest.approx(
      case["dp_ms"] / case["dp_bf16_100_ms"], rel=1e-2)
  assert set(case["dp_bf16_100_execution"].values()) == {"bfloat16 (native)"}


def _fake_runner(sizes, limit, calls):
  """A worker whose memory is the sum of its contenders' sizes (nothing freed)."""
  def run_group(group):
    calls.append(list(group))
    used = 0
    for kind in group:
      used += sizes[kind]
      if used > limit:
        return None, kind, used, f"resident memory reached {used} MB"
    case = {"model": "m", "batch_size": 1}
    for kind in group:
      case[f"{kind}_ms"] = float(len(calls))          # which worker timed it
      if kind != "dp" and "dp" in group:
        case[f"dp_vs_{kind}"] = float(len(calls))
    return case, None, used, ""
  return run_group


def test_contenders_that_do_not_fit_together_run_in_further_workers():
  sizes = {"plain": 100, "dp": 300, "tfprivacy": 7000, "dp_quant": 300,
           "dp_bf16_50": 2000, "dp_bf16_100": 2000}
  kinds = list(sizes)
  calls, skipped = [], {}
  case, groups = lib.run_in_groups(kinds, _fake_runner(sizes, 3000, calls),
                                   skipped)
  # tfprivacy cannot fit even beside plain and dp: skipped with the reason.
  assert list(skipped) == ["tfprivacy"]
  assert "7400 MB" in skipped["tfprivacy"] and "beside plain, dp" in skipped["tfprivacy"]
  # Every other contender was timed, each beside both references.
  assert [g["contenders"] for g in groups] == [
      ["plain", "dp", "dp_quant", "dp_bf16_50"], ["plain", "dp", "dp_bf16_100"]]
  for kind in ("dp_quant", "dp_bf16_50", "dp_bf16_100"):
    assert f"{kind}_ms" in case and f"dp_vs_{kind}" in case
  # The later contender's fields come from its own worker (ratios to the
  # references timed there); the references' from the first.
  assert case["dp_bf16_100_ms"] == case["dp_vs_dp_bf16_100"] == len(calls)
  assert case["dp_ms"] == case["dp_bf16_50_ms"] != case["dp_bf16_100_ms"]
  assert max(g["worker_peak_rss_mb"] for g in groups) <= 3000


def test_a_reference_that_cannot_fit_is_skipped_not_retried_forever():
  sizes = {"plain": 100, "dp": 5000, "dp_bf16_100": 100}
  calls, skipped = [], {}
  case, groups = lib.run_in_groups(list(sizes), _fake_runner(sizes, 3000, calls),
                                   skipped)
  assert list(skipped) == ["dp"] and len(calls) == 2
  assert groups[0]["contenders"] == ["plain", "dp_bf16_100"]
  assert "dp_vs_dp_bf16_100" not in case

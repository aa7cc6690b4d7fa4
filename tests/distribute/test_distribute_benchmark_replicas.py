"""tools/benchmark_replicas_lib on tiny sizes: the report's shape, the fast
path under 2 replicas, ratios to one device measured in the same run."""

import pytest

from tools import benchmark_replicas_lib as lib


@pytest.mark.slow
def test_tiny_run_reports_the_fast_path_and_ratios():
  s = lib.Settings(model="cnn", input_shape=(16, 16, 1), num_classes=3,
                   global_batch=8, steps=1, warmup_steps=1, replicas=(1, 2),
                   plain_baseline=True)
  report = lib.run(s)
  rows = report["rows"]
  assert [(r["optimizer"], r["replicas"]) for r in rows] == [
      ("dp", 1), ("dp", 2), ("plain", 1), ("plain", 2)]
  assert all(not r["fallback"] for r in rows), [r["fallback"] for r in rows]
  assert rows[0]["ratio"] == rows[2]["ratio"] == 1.0
  for r in rows:
    assert r["seconds_per_example"] > 0
    assert r["ratio"] == pytest.approx(
        r["seconds_per_example"]
        / rows[0 if r["optimizer"] == "dp" else 2]["seconds_per_example"])
  # No timing target is asserted; only fallbacks and ratios are reported.
  assert not [m for m in lib.check_target(report, max_ratio=1e9)]
  assert "| dp | 2 |" in lib.markdown(report)


def test_refuses_a_batch_the_replicas_do_not_divide():
  with pytest.raises(ValueError, match="global_batch"):
    lib.run(lib.Settings(global_batch=7, replicas=(1, 2)))

"""Smoke test of tools/benchmark_lib (the timing itself is not asserted)."""

import json
import os
import sys

import pytest

import dpquant_tf  # noqa: F401  (Keras 2 first)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))

from tools import benchmark_lib  # noqa: E402


@pytest.mark.slow
def test_benchmark_report_has_the_documented_fields():
  settings = benchmark_lib.Settings(rounds=1, steps=1, warmup=1,
                                    contenders=("plain", "tfprivacy", "dp"))
  report = benchmark_lib.run(["cnn:8"], settings)
  case = json.loads(benchmark_lib.to_json(report))["cases"][0]
  assert case["model"] == "cnn" and case["batch_size"] == 8
  for key in ("plain_ms", "tfprivacy_ms", "dp_ms", "dp_vs_plain",
              "tfprivacy_vs_dp", "dp_examples_per_s", "dp_peak_mb"):
    assert case[key] is not None and case[key] > 0, key
  lines = benchmark_lib.check_targets(report)
  assert any(line.startswith("cnn b=8 dp_vs_plain") for line in lines)

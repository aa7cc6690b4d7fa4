"""Smoke test of tools/benchmark_quantization_lib (slow: builds four models)."""

import dpquant_tf  # noqa: F401  (Keras 2 before TensorFlow)
import pytest

from tools import benchmark_quantization_lib as lib


@pytest.mark.slow
def test_benchmark_reports_every_contender_and_ratios():
  report = lib.run(lib.Settings(batch_size=8, rounds=1, steps=1, warmup=1))
  assert set(report["ms_per_step"]) == set(lib.CONTENDERS)
  assert report["ratio_vs_plain"]["plain"] == 1.0
  assert all(v > 0 for v in report["ms_per_step"].values())
  assert "x plain" in lib.table(report)

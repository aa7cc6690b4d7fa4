"""Bytes per step on the wire (tools/traffic_lib.py, the tool)."""

import math

import numpy as np
import pytest
import tensorflow as tf

from dpquant_tf.privacy import _mechanisms
from tools import benchmark_traffic_lib
from tools import code_sum_packing_lib
from tools import traffic_lib


def test_float32_and_per_example_codes():
  row = traffic_lib.step_traffic([1000, 10], [4, 4], global_batch=6,
                                num_replicas=2)
  assert row.bits == 4
  assert row.payload_bytes["float32_sum"] == 4 * 1010
  assert row.payload_bytes["codes_per_example"] == 3 * (500 + 5 + 4)
  # Sum of 6 codes in [-7, 7]: 85 values -> 7 bits per coordinate.
  assert traffic_lib.code_sum_bits(4, 6) == 7
  assert row.payload_bytes["code_sum"] == math.ceil(1000 * 7 / 8) + math.ceil(
      10 * 7 / 8)
  assert row.ratio_vs_float32["float32_sum"] == 1.0


def test_exact_variables_travel_as_float32():
  row = traffic_lib.step_traffic([100, 7], [8, 0], global_batch=4,
                                num_replicas=4)
  assert row.bits is None
  assert row.payload_bytes["codes_per_example"] == 1 * (100 + 28 + 4)
  assert row.payload_bytes["code_sum"] == math.ceil(
      100 * traffic_lib.code_sum_bits(8, 4) / 8) + 28
  off = traffic_lib.step_traffic([100, 7], [0, 0], global_batch=4,
                                num_replicas=4)
  assert off.payload_bytes["codes_per_example"] == 4 * 107


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_code_sum_width_holds_real_quantized_sums(bits):
  """Sums of the optimizer's real grid codes fit the computed integer width
  and a narrower width would not hold the extreme sums."""
  batch, clip = 16, 1.0
  gen = tf.random.Generator.from_seed(0)
  grads = gen.normal([batch, 200])
  clipped = _mechanisms.clip_per_example([grads], clip)
  (q,) = _mechanisms.quantize_per_example(clipped, tf.constant([bits]), clip,
                                          gen)
  levels = 2 ** (bits - 1) - 1
  codes = q.numpy() / clip * levels
  np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
  total = np.round(codes).sum(axis=0)
  width = traffic_lib.code_sum_bits(bits, batch)
  assert np.abs(total).max() <= batch * levels
  assert 2 * batch * levels + 1 <= 2 ** width
  assert 2 * batch * levels + 1 > 2 ** (width - 1)


def test_ring_factor():
  assert traffic_lib.ring_factor(1) == 0.0
  assert traffic_lib.ring_factor(4) == pytest.approx(1.5)


def test_validation_messages():
  with pytest.raises(ValueError, match="Expected bits="):
    traffic_lib.step_traffic([10], [4, 4], global_batch=2, num_replicas=1)
  with pytest.raises(ValueError, match="Expected num_replicas=0"):
    traffic_lib.step_traffic([10], [4], global_batch=2, num_replicas=0)


def test_benchmark_traffic_tool_on_the_tutorial_cnn():
  settings = benchmark_traffic_lib.Settings(replicas=(2,), epochs=3)
  report = benchmark_traffic_lib.run(settings)
  assert report["schedule_bits"] == [2, 5, 8]
  (block,) = report["by_replicas"]
  rows = block["per_epoch"]
  assert all(r["payload_bytes"]["float32_sum"] == 4 * report["parameters"]
             for r in rows)
  ratios = [r["ratio_vs_float32"]["code_sum"] for r in rows]
  assert ratios == sorted(ratios) and ratios[-1] < 1.0
  text = benchmark_traffic_lib.markdown(report)
  assert "| 2 | average |" in text


def test_packed_column_matches_the_packing_layout():
  row = traffic_lib.step_traffic([26010], [4], global_batch=256,
                                num_replicas=4)
  layout = code_sum_packing_lib.pack_layout(4, 256)
  assert row.payload_bytes["packed_code_sum"] == layout.payload_bytes(26010)
  assert row.ratio_vs_float32["code_sum"] < row.ratio_vs_float32[
      "packed_code_sum"] < 1.0

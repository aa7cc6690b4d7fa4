"""Cost model: native execution precisions vs simulated formats."""

import dpquant_tf  # noqa: F401  (Keras 2 before TensorFlow)
import pytest

from dpquant_tf import costmodel
from dpquant_tf import quantization as dq

LAYERS = [costmodel.LayerCost("a", 100.0, 200.0),
          costmodel.LayerCost("b", 300.0, 600.0)]
BF16 = dq.LayerQuantConfig(fwd_bits=0, bwd_bits=0, precision="bf16")
FP4 = dq.LayerQuantConfig()  # INT4-SAWB forward, LUQ-FP4 backward, float32 op


def test_native_bf16_speedup_comes_from_hardware():
  plan = dq.QuantPlan({"a": BF16, "b": BF16})
  fast = costmodel.epoch_cost(LAYERS, plan, hardware={"bf16": 2.0})
  assert fast.speedup == pytest.approx(2.0)
  assert fast.hardware_speedup == pytest.approx(2.0)
  assert fast.native_layers == ["a", "b"] and fast.simulated_layers == []
  slow = costmodel.epoch_cost(LAYERS, plan, hardware={"bf16": 1.0})
  assert slow.speedup == pytest.approx(1.0)
  assert slow.hardware_speedup == pytest.approx(1.0)


def test_simulated_formats_are_modelled_not_hardware():
  plan = dq.QuantPlan({"a": FP4, "b": BF16})
  cost = costmodel.epoch_cost(LAYERS, plan, hardware={"bf16": 2.0})
  # a: 300 MACs at s = 4 (modelled) but s = 1 on this hardware; b: 900 at 2.
  assert cost.speedup == pytest.approx(1200 / (300 / 4 + 900 / 2))
  assert cost.hardware_speedup == pytest.approx(1200 / (300 + 900 / 2))
  assert cost.simulated_layers == ["a"] and cost.native_layers == ["b"]
  fp8 = dq.LayerQuantConfig(fwd_bits=0, bwd_bits=0, precision="fp8_e4m3")
  cost = costmodel.epoch_cost(LAYERS, {"a": fp8, "b": fp8},
                              hardware={"bf16": 2.0})
  assert cost.speedup == pytest.approx(2.0)  # modelled FP8
  assert cost.hardware_speedup == pytest.approx(1.0)  # simulated here
  assert cost.simulated_layers == ["a", "b"]
  run = costmodel.run_hardware_speedup([cost, costmodel.epoch_cost(
      LAYERS, {"a": BF16, "b": BF16}, hardware={"bf16": 2.0})])
  assert run == pytest.approx(2 / (1 + 0.5))


def test_native_speedups_follow_detection(monkeypatch):
  monkeypatch.setenv("DPQUANT_ASSUME_BF16_HARDWARE", "1")
  assert costmodel.native_speedups()["bf16"] == costmodel.BF16_HARDWARE_SPEEDUP
  assert dq.hardware_accelerated("bf16")
  monkeypatch.setenv("DPQUANT_ASSUME_BF16_HARDWARE", "0")
  assert costmodel.native_speedups()["bf16"] == 1.0
  assert not dq.hardware_accelerated("fp8_e4m3")
  with pytest.raises(ValueError, match="Expected precision="):
    costmodel.epoch_cost(LAYERS, {"a": {"enabled": True, "fwd_bits": 0,
                                        "bwd_bits": 0, "precision": "fp16"}})

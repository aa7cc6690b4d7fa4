"""examples/train_cost_lib: the measured speed-up beside the cost model's."""

from examples import train_cost_lib as lib


def _plan(epoch, quantized, step, speedup=1.5, hw=1.2):
  return {"epoch": epoch, "quantized": quantized, "step_time_s": step,
          "speedup": speedup, "hardware_speedup": hw}


def test_measured_speedup_compares_float32_and_quantized_epochs():
  plans = [_plan(0, [], 0.2), _plan(1, ["c1"], 0.1, 2.0, 1.4),
           _plan(2, ["c1", "d1"], 0.3, 1.0, 1.0), _plan(3, [], None)]
  r = lib.measured_speedup(plans)
  assert r["measured"] == 0.2 / 0.2  # mean of 0.1 and 0.3
  assert r["modelled"] == 1.5 and r["modelled_hardware"] == 1.2
  assert r["float32_epochs"] == [0] and r["quantized_epochs"] == [1, 2]
  line = lib.format_speedups(r, {"simulated_layers": ["d1"]})
  assert "measured 1.000x" in line and "cost model 1.500x" in line
  assert "simulated (no native speed-up): ['d1']" in line


def test_measured_speedup_needs_a_baseline_epoch():
  r = lib.measured_speedup([_plan(0, ["c1"], 0.1)])
  assert r["measured"] is None and "no epoch without" in r["reason"]
  assert "not measured (no epoch without" in lib.format_speedups(r, {})
  r = lib.measured_speedup([_plan(0, [], 0.1)])
  assert r["measured"] is None and r["modelled"] is None

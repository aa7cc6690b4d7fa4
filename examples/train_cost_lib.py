"""Cost report of examples/train.py: modelled speed-ups next to measured step times.

Per epoch: the plan run, the cost model's modelled speed-up
(:mod:`dpquant_tf.costmodel`, simulated formats at the paper's s), the
speed-up this hardware gives what it runs natively (``hardware_speedup``),
which layers ran natively in low precision and which were simulated, and the
measured ``step_time_s`` / ``epoch_time_s`` (``StepTimeCallback``).
"""

from typing import Any, Dict

from dpquant_tf import costmodel

__all__ = ["cost_report", "execution_summary", "measured_speedup"]


def cost_report(layers, history, base_cfg, analysis_fraction, step_times=()):
  """Per-epoch plans, the cost model's speed-ups and the measured step times.

  Args:
    layers: the model's quantizable layers (``quantizable_layers``).
    history: the scheduler's per-epoch entries (``epoch``, ``quantized``,
      ``analysis``).
    base_cfg: the ``LayerQuantConfig`` of a quantized layer.
    analysis_fraction: T_analysis / T_train of an epoch with an analysis.
    step_times: ``StepTimeCallback.history``.

  Returns:
    (plans per epoch, modelled run speed-up, hardware run speed-up).
  """
  plans, costs = [], []
  times = {t["epoch"]: t for t in step_times}
  for entry in history:
    plan = {name: base_cfg.to_dict() for name in entry["quantized"]}
    frac = analysis_fraction if entry.get("analysis") is not None else 0.0
    cost = costmodel.epoch_cost(layers, plan, analysis_fraction=frac)
    costs.append(cost)
    measured = times.get(entry["epoch"], {})
    plans.append({"epoch": entry["epoch"], "plan": plan,
                  "quantized": list(entry["quantized"]),
                  "analysis_fraction": frac,
                  "analysis": entry.get("analysis"),
                  "quantized_fraction": cost.quantized_fraction,
                  "speedup": cost.speedup,
                  "hardware_speedup": cost.hardware_speedup,
                  "native_layers": list(cost.native_layers),
                  "simulated_layers": list(cost.simulated_layers),
                  "step_time_s": measured.get("step_time_s"),
                  "epoch_time_s": measured.get("epoch_time_s"),
                  "epoch_wall_s": measured.get("epoch_wall_s"),
                  "first_step_s": measured.get("first_step_s")})
  speedup = costmodel.run_speedup(costs) if costs else 1.0
  hw = costmodel.run_hardware_speedup(costs) if costs else 1.0
  return plans, speedup, hw


def execution_summary(format_name, base, plans) -> Dict[str, Any]:
  """Which layers ran natively in low precision and which were simulated.

  Args:
    format_name: the run's --format.
    base: the ``LayerQuantConfig`` of its quantized layers.
    plans: the per-epoch entries of :func:`cost_report`.
  """
  from dpquant_tf import quantization  # pylint: disable=g-import-not-at-top
  native = sorted({n for p in plans for n in p["native_layers"]})
  simulated = sorted({n for p in plans for n in p["simulated_layers"]})
  return {"format": str(format_name), "precision": base.precision.name.lower(),
          "native_precision": base.precision is quantization.Precision.BFLOAT16,
          "hardware_accelerated": bool(quantization.hardware_accelerated(
              base.precision)),
          "native_layers": native, "simulated_layers": simulated}


def measured_speedup(plans) -> Dict[str, Any]:
  """The speed-up this run measured, next to the cost model's for the same epochs.

  Measured: mean step time of the run's epochs with no layer quantized
  (float32) over the mean step time of its epochs with quantized layers
  (``step_time_s`` of :func:`cost_report`'s entries; wall clock, noisy on a
  shared machine). Needs at least one epoch of each kind in the run;
  otherwise ``measured`` is None and ``reason`` says why. No extra steps are
  run to measure a baseline (every DP step spends privacy budget).

  Args:
    plans: the per-epoch entries of :func:`cost_report`.

  Returns:
    A dict: ``measured`` (float or None), ``modelled`` (the cost model's mean
    speed-up of the quantized epochs, simulated formats at the paper's s),
    ``modelled_hardware`` (its speed-up for what runs natively here),
    ``float32_epochs`` and ``quantized_epochs`` (epoch numbers), ``reason``.
  """
  timed = [p for p in plans if p.get("step_time_s")]
  full = [p for p in timed if not p["quantized"]]
  quant = [p for p in timed if p["quantized"]]
  out = {"measured": None,
         "modelled": (sum(p["speedup"] for p in quant) / len(quant)
                      if quant else None),
         "modelled_hardware": (sum(p["hardware_speedup"] for p in quant)
                               / len(quant) if quant else None),
         "float32_epochs": [p["epoch"] for p in full],
         "quantized_epochs": [p["epoch"] for p in quant], "reason": None}
  if not full or not quant:
    out["reason"] = ("no epoch without quantized layers to compare with" if
                     quant else "no epoch with quantized layers")
    return out
  base = sum(p["step_time_s"] for p in full) / len(full)
  low = sum(p["step_time_s"] for p in quant) / len(quant)
  out["measured"] = base / low
  return out


def format_speedups(report: Dict[str, Any], execution: Dict[str, Any]) -> str:
  """One line: measured speed-up next to the cost model's (FP8: simulated)."""
  def fmt(v):
    return "n/a" if v is None else f"{v:.3f}x"
  measured = (fmt(report["measured"]) if report["measured"] is not None
              else f"not measured ({report['reason']})")
  simulated = (f"; simulated (no native speed-up): {execution['simulated_layers']}"
               if execution.get("simulated_layers") else "")
  return (f"Speed-up of quantized epochs: measured {measured} (step time of "
          f"float32 epochs / quantized epochs), cost model {fmt(report['modelled'])}"
          f" (formats at the paper's s), on this hardware "
          f"{fmt(report['modelled_hardware'])}{simulated}")

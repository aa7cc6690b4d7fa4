"""Cost report of examples/train.py: modelled speed-ups next to measured step times.

Per epoch: the plan run, the cost model's modelled speed-up
(:mod:`dpquant_tf.costmodel`, simulated formats at the paper's s), the
speed-up this hardware gives what it runs natively (``hardware_speedup``),
which layers ran natively in low precision and which were simulated, and the
measured ``step_time_s`` / ``epoch_time_s`` (``StepTimeCallback``).
"""

from typing import Any, Dict

from dpquant_tf import costmodel

__all__ = ["cost_report", "execution_summary"]


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
                  "epoch_time_s": measured.get("epoch_time_s")})
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

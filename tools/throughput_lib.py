"""Logic of tools/throughput.py: the cost model applied to a run's metrics.

The cost model itself (the paper's formula, MAC-weighted p, format
speed-ups) is library code: :mod:`dpquant_tf.costmodel`. This module holds
what only the tool needs: parsing the ``--speedups`` flag and recomputing the
model from a metrics JSON written by examples/train.py.
"""

from typing import Any, Dict, Mapping, Optional

from dpquant_tf import _validation
from dpquant_tf import costmodel

__all__ = ["parse_speedups", "report_from_metrics"]


def parse_speedups(text: str) -> Dict[str, float]:
  """Parses ``"fp4=4,fp8=2"`` into a dict (empty text -> {})."""
  out = {}
  for item in filter(None, (t.strip() for t in (text or "").split(","))):
    key, sep, value = item.partition("=")
    if not sep:
      _validation.fail("speedups", text, "comma-separated format=s pairs")
    try:
      out[key.strip().lower()] = _validation.check_positive(
          f"speedups[{key.strip()!r}]", float(value))
    except ValueError:
      _validation.fail("speedups", text, "comma-separated format=s pairs")
  return out


def report_from_metrics(metrics: Mapping[str, Any], *,
                        speedups: Optional[Mapping[str, float]] = None,
                        overhead_fraction: float = 0.0) -> Dict[str, Any]:
  """Recomputes the cost model from a train_lib metrics dict.

  Uses ``metrics["layers"]`` (per-layer MACs), ``metrics["plan_per_epoch"]``
  (one entry per epoch: ``{"epoch", "plan", "analysis_fraction"}``) and
  ``metrics["steps_per_epoch"]`` when present.

  Returns:
    ``{"per_epoch": [{epoch, quantized_fraction, speedup, quantized_layers}],
    "run_speedup": float}``.
  """
  layers = costmodel.layer_costs(metrics["layers"])
  per_epoch, costs = [], []
  for entry in metrics.get("plan_per_epoch", []):
    cost = costmodel.epoch_cost(layers, entry.get("plan", {}), speedups=speedups,
                      analysis_fraction=float(entry.get("analysis_fraction", 0.0)),
                      overhead_fraction=overhead_fraction)
    costs.append(cost)
    per_epoch.append({"epoch": entry.get("epoch", len(per_epoch)),
                      "quantized_fraction": cost.quantized_fraction,
                      "speedup": cost.speedup,
                      "quantized_layers": cost.quantized_layers})
  return {"per_epoch": per_epoch,
          "run_speedup": costmodel.run_speedup(costs) if costs else 1.0}

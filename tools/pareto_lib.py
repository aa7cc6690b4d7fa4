"""Accuracy against theoretical compute: the Pareto plot of a set of runs.

Reads the metrics written by ``examples/train.py --metrics_json`` (one JSON
object per file) or a study log (``tools/run_study.py``: one JSON object per
line) and draws test accuracy against the relative compute ``1 / speed-up``
of the cost model (``tools/throughput_lib.py``): the fp32 DP baseline sits at
compute 1.0. Static random subsets, rotation and DPQuant (rotation +
loss-aware) are marked differently; the Pareto front (no other run is both
cheaper and more accurate) is drawn as a line.
"""

import collections
import json
import math
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

from dpquant_tf import _validation

__all__ = ["CATEGORIES", "category", "filter_results", "load_results",
           "pareto_front", "plot_pareto", "relative_compute", "summarize"]

# Category -> (label, matplotlib marker, colour).
CATEGORIES = collections.OrderedDict([
    ("fp32", ("fp32 DP-SGD baseline", "*", "black")),
    ("static", ("static random subset", "o", "tab:gray")),
    ("rotation", ("rotation (PLS)", "^", "tab:blue")),
    ("dpquant", ("DPQuant (PLS + LLP)", "D", "tab:red")),
    ("other", ("other policy", "s", "tab:green")),
])


def load_results(paths: Iterable[str]) -> List[Dict[str, Any]]:
  """Loads metrics from JSON files (one object) and JSONL files (one per line)."""
  out = []
  for path in paths:
    if not os.path.isfile(path):
      _validation.fail("path", path, "an existing JSON or JSONL file")
    with open(path) as f:
      text = f.read()
    stripped = text.strip()
    if not stripped:
      continue
    try:
      obj = json.loads(stripped)
      out.extend(obj if isinstance(obj, list) else [obj])
    except json.JSONDecodeError:
      for line in stripped.splitlines():
        if line.strip():
          out.append(json.loads(line))
  return out


def _config(result: Mapping[str, Any]) -> Mapping[str, Any]:
  return result.get("config", result)


def category(result: Mapping[str, Any]) -> str:
  """fp32, static, rotation, dpquant or other, from the run's policy."""
  policy = str(_config(result).get("policy", "none")).lower()
  if policy in ("none", "fp32"):
    return "fp32"
  if policy == "static":
    return "static"
  if policy == "rotation":
    return "rotation"
  if policy in ("loss_aware", "dpquant"):
    return "dpquant"
  return "other"


def relative_compute(result: Mapping[str, Any]) -> float:
  speedup = float(result.get("theoretical_speedup") or 1.0)
  return 1.0 / speedup


def pareto_front(points: Sequence[Sequence[float]]) -> List[int]:
  """Indices of the non-dominated (compute, accuracy) points, by compute.

  A point is dominated when another has compute <= and accuracy >= with one
  of them strict.
  """
  order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
  front, best = [], -math.inf
  for i in order:
    if points[i][1] > best:
      front.append(i)
      best = points[i][1]
  return front


def summarize(results: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
  """Mean/std of accuracy and compute per (category, ratio, dp, epsilon)."""
  groups = collections.defaultdict(list)
  for r in results:
    cfg = _config(r)
    cat = category(r)
    key = (cat, None if cat == "fp32" else cfg.get("ratio"), bool(cfg.get("dp", True)),
           cfg.get("target_epsilon"))
    groups[key].append(r)
  rows = []
  for (cat, ratio, dp, eps), rs in sorted(groups.items(), key=lambda kv: str(kv[0])):
    accs = [float(r["test_accuracy"]) for r in rs]
    comps = [relative_compute(r) for r in rs]
    mean = sum(accs) / len(accs)
    std = (math.sqrt(sum((a - mean) ** 2 for a in accs) / (len(accs) - 1))
           if len(accs) > 1 else 0.0)
    rows.append({"category": cat, "ratio": ratio, "dp": dp, "target_epsilon": eps,
                 "n": len(rs), "accuracy_mean": mean, "accuracy_std": std,
                 "compute_mean": sum(comps) / len(comps)})
  return rows


def plot_pareto(results: Sequence[Mapping[str, Any]], out_png: str, *,
                title: str = "Accuracy vs theoretical compute",
                include_nondp: bool = False) -> str:
  """Draws accuracy (percent) against relative compute and saves a PNG.

  Args:
    results: metrics dicts (see :func:`load_results`).
    out_png: output path (directories are created).
    title: plot title.
    include_nondp: also draw non-DP runs (hollow markers).

  Returns:
    `out_png`.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  runs = [r for r in results if include_nondp or _config(r).get("dp", True)]
  if not runs:
    _validation.fail("results", len(results), "at least one (DP) run")
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for cat, (label, marker, colour) in CATEGORIES.items():
    for dp in (True, False):
      pts = [r for r in runs if category(r) == cat and bool(_config(r).get("dp", True)) == dp]
      if not pts:
        continue
      ax.scatter([relative_compute(r) for r in pts],
                 [100 * float(r["test_accuracy"]) for r in pts],
                 marker=marker, s=90 if cat in ("fp32", "dpquant") else 40,
                 facecolors=colour if dp else "none", edgecolors=colour,
                 alpha=0.85, label=label + ("" if dp else " (no DP)"))
  for row in summarize(runs):
    if row["category"] == "static" and row["n"] > 1:
      ax.errorbar(row["compute_mean"], 100 * row["accuracy_mean"],
                  yerr=100 * row["accuracy_std"], fmt="_", color="tab:gray",
                  capsize=4, markersize=14)
  dp_runs = [r for r in runs if _config(r).get("dp", True)]
  pts = [(relative_compute(r), 100 * float(r["test_accuracy"])) for r in dp_runs]
  front = pareto_front(pts)
  if len(front) > 1:
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--",
            color="tab:orange", lw=1, label="Pareto front (DP runs)")
  ax.set_xlabel("relative compute (1 / theoretical speed-up; fp32 = 1)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
  fig.savefig(out_png, dpi=120)
  plt.close(fig)
  return out_png


def filter_results(results: Sequence[Mapping[str, Any]], *,
                   target_epsilon: Optional[float] = None) -> List[Mapping[str, Any]]:
  """Keeps DP runs at `target_epsilon` (and every non-DP run)."""
  if target_epsilon is None:
    return list(results)
  keep = []
  for r in results:
    cfg = _config(r)
    if not cfg.get("dp", True):
      keep.append(r)
    elif cfg.get("target_epsilon") is not None and math.isclose(
        float(cfg["target_epsilon"]), float(target_epsilon)):
      keep.append(r)
  return keep

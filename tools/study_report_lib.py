"""Report of the paired small-ResNet study: cells, claims, plot, compact log.

Everything is regenerated from the study log (tools/run_study.py
--grid=small_resnet) by tools/study_report.py. The claims follow
docs/METHOD.md and are judged on per-seed paired differences of test
accuracy (points) with tools/study_stats_lib.py:

* ``DPQuant - static``: DPQuant beats the static random subsets (the paper's
  "static mean"; per seed, the mean over that seed's static subsets).
  Margin 0: holds when the difference is positive.
* ``DPQuant - rotation``: loss-aware selection (LLP) adds to rotation (PLS).
  Margin 0.
* ``DPQuant - fp32 DP``: DPQuant loses under 2 points against the
  unquantized DP model. Margin -2.
* ``DP amplification`` (only when the log has the non-DP static runs):
  (fp32 - static) with DP minus (fp32 - static) without DP, margin 0: the
  quantization loss is larger under DP.

All claims of one report form one Holm-Bonferroni family.
"""

import collections
import json
import math
import os
import statistics
from typing import Any, Dict, List, Mapping, Optional, Sequence

from dpquant_tf import _validation
from tools import pareto_lib
from tools import run_study_lib
from tools import study_stats_lib

__all__ = ["FP32_MARGIN", "build_claims", "cell_table", "compact_lines",
           "kind", "markdown_report", "per_seed", "plot_compute", "split_records"]

FP32_MARGIN = -2.0
_KINDS = ("fp32", "static", "rotation", "dpquant")


def kind(record: Mapping[str, Any]) -> str:
  """fp32, static, rotation or dpquant (or the policy name) of a record."""
  policy = record["config"].get("policy")
  return {"none": "fp32", "loss_aware": "dpquant"}.get(policy, policy)


def _tag(record: Mapping[str, Any]) -> str:
  cfg = record["config"]
  return "nodp" if not cfg.get("dp", True) else f"eps{float(cfg['target_epsilon']):g}"


def split_records(records: Sequence[Mapping[str, Any]]):
  """(study records, sweep records): sweep runs have ids ``sweep-...``."""
  sweep = [r for r in records if str(r["run_id"]).startswith("sweep-")]
  study = [r for r in records if not str(r["run_id"]).startswith("sweep-")]
  return study, sweep


def per_seed(records: Sequence[Mapping[str, Any]]) -> Dict[tuple, Dict[int, float]]:
  """{(tag, format, ratio, kind): {seed: accuracy %}}; fp32 has format=ratio=None.

  Several static subsets of one seed are averaged (the seed's static mean).
  """
  acc: Dict[tuple, Dict[int, List[float]]] = collections.defaultdict(
      lambda: collections.defaultdict(list))
  for r in records:
    cfg, k = r["config"], kind(r)
    key = ((_tag(r), None, None, k) if k == "fp32" else
           (_tag(r), cfg.get("format"), float(cfg["ratio"]), k))
    acc[key][int(cfg["seed"])].append(100.0 * float(r["test_accuracy"]))
  return {key: {s: statistics.fmean(v) for s, v in seeds.items()}
          for key, seeds in acc.items()}


def build_claims(records: Sequence[Mapping[str, Any]], *,
                 fp32_margin: float = FP32_MARGIN,
                 nodp_margin: Optional[float] = None) -> List[Dict[str, Any]]:
  """The claims of the log, each with its per-seed paired differences.

  With `nodp_margin` (points, e.g. -10) also ``fp32 DP - non-private`` per
  DP setting, when the log has the non-private fp32 runs.
  """
  seeds = per_seed(records)
  claims = []
  if nodp_margin is not None and ("nodp", None, None, "fp32") in seeds:
    for tag in sorted({k[0] for k in seeds if k[0] != "nodp" and k[3] == "fp32"}):
      claims.append(_claim(f"fp32 DP - non-private ({tag})",
                           seeds[(tag, None, None, "fp32")],
                           seeds[("nodp", None, None, "fp32")], nodp_margin))
  cells = sorted({(k[0], k[1], k[2]) for k in seeds if k[3] == "dpquant"
                  and k[0] != "nodp"}, key=lambda c: (c[0], str(c[1]), c[2]))
  for tag, fmt, ratio in cells:
    dq = seeds[(tag, fmt, ratio, "dpquant")]
    where = f"{tag} {fmt} r{ratio:g}"
    for other, margin, label in (("static", 0.0, "static"),
                                 ("rotation", 0.0, "rotation")):
      if (tag, fmt, ratio, other) in seeds:
        claims.append(_claim(f"DPQuant - {label} ({where})", dq,
                             seeds[(tag, fmt, ratio, other)], margin))
    if (tag, None, None, "fp32") in seeds:
      claims.append(_claim(f"DPQuant - fp32 DP ({where})", dq,
                           seeds[(tag, None, None, "fp32")], fp32_margin))
    amp = _amplification(seeds, tag, fmt, ratio)
    if amp is not None:
      claims.append({"name": f"DP amplification ({where})", "margin": 0.0,
                     "differences": list(amp.values()), "seeds": sorted(amp)})
  return claims


def _claim(name, a, b, margin):
  d = study_stats_lib.paired_differences(a, b)
  return {"name": name, "margin": margin, "differences": list(d.values()),
          "seeds": sorted(d)}


def _amplification(seeds, tag, fmt, ratio) -> Optional[Dict[int, float]]:
  parts = [seeds.get(k) for k in ((tag, None, None, "fp32"), (tag, fmt, ratio, "static"),
                                  ("nodp", None, None, "fp32"),
                                  ("nodp", fmt, ratio, "static"))]
  if any(p is None for p in parts):
    return None
  common = set.intersection(*(set(p) for p in parts))
  if not common:
    return None
  fd, sd, fn, sn = parts
  return {s: (fd[s] - sd[s]) - (fn[s] - sn[s]) for s in sorted(common)}


def cell_table(records: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
  """Per (tag, format, ratio, kind): accuracy mean/sd, seeds, time, compute."""
  groups = collections.defaultdict(list)
  for r in records:
    cfg, k = r["config"], kind(r)
    key = ((_tag(r), "", -1.0, k) if k == "fp32" else
           (_tag(r), cfg.get("format"), float(cfg["ratio"]), k))
    groups[key].append(r)
  rows = []
  for (tag, fmt, ratio, k), rs in sorted(
      groups.items(), key=lambda kv: (kv[0][0] == "nodp", kv[0][0], kv[0][1], kv[0][2],
                                      _KINDS.index(kv[0][3]) if kv[0][3] in _KINDS else 9)):
    accs = [100.0 * float(r["test_accuracy"]) for r in rs]
    secs = [float(r["train_seconds"]) for r in rs if r.get("train_seconds") is not None]
    rows.append({
        "tag": tag, "format": fmt or None, "ratio": None if ratio < 0 else ratio,
        "kind": k, "n": len(rs), "acc_mean": statistics.fmean(accs),
        "acc_sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "seeds": sorted({int(r["config"]["seed"]) for r in rs}),
        "train_seconds": statistics.fmean(secs) if secs else None,
        "compute": statistics.fmean(pareto_lib.relative_compute(r) for r in rs),
        "noise_seeded": sum(_noise_seeded(r) for r in rs)})
  return rows


def _noise_seeded(record: Mapping[str, Any]) -> bool:
  """A full record notes it under research, a compact one at the top level."""
  research = record.get("research") or {}
  return bool(research.get("noise_seeded", record.get("noise_seeded", False)))


def _num(x: Optional[float], fmt: str = "{:.2f}") -> str:
  return "n/a" if x is None else fmt.format(x)


STATEMENT = (
    "Test: per claim, the paired differences over seeds (same --seed, same "
    "research noise and sampling seeds for every policy of a seed); 95% "
    "paired t interval (unadjusted); two-sided paired t test of "
    "mean difference = margin; Holm-Bonferroni correction over all claims of "
    "this table at family-wise alpha = 0.05. Verdict: holds if the "
    "Holm-adjusted p < 0.05 and the mean is above the margin, does not hold "
    "if the Holm-adjusted p < 0.05 and the mean is below it, otherwise "
    "undecided at this n (also with fewer than 2 pairs or zero spread); an "
    "undecided claim gives the number of pairs that would decide it if "
    "further pairs had the observed mean and sd (Bonferroni at alpha / m, "
    "the most conservative Holm step).")


def markdown_report(records: Sequence[Mapping[str, Any]], *,
                    fp32_margin: float = FP32_MARGIN, alpha: float = 0.05,
                    plot: Optional[str] = None,
                    nodp_margin: Optional[float] = None) -> str:
  """Cells, per-claim table (with verdicts) and sweep, in Markdown."""
  study, sweep = split_records(records)
  lines = []
  if study:
    lines += ["| setting | format | ratio | policy | accuracy % mean ± sd | n | seeds "
              "| train s (mean, measured) | modelled compute | noise seeded |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for row in cell_table(study):
      lines.append(
          f"| {row['tag']} | {row['format'] or '-'} | "
          f"{'-' if row['ratio'] is None else format(row['ratio'], 'g')} | "
          f"{row['kind']} | {row['acc_mean']:.2f} ± {row['acc_sd']:.2f} | {row['n']} | "
          f"{','.join(map(str, row['seeds']))} | {_num(row['train_seconds'], '{:.1f}')} | "
          f"{row['compute']:.3f} | {row['noise_seeded']}/{row['n']} |")
    lines.append("")
    results = study_stats_lib.decide_claims(
        build_claims(study, fp32_margin=fp32_margin, nodp_margin=nodp_margin),
        alpha=alpha)
    lines += ["| claim | margin | n pairs | mean diff (points) | sd | "
              f"{100 * (1 - alpha):g}% CI | p | p (Holm) | verdict |",
              "|---|---|---|---|---|---|---|---|---|"]
    for c in results:
      ci = ("n/a" if c.ci_low is None else f"[{c.ci_low:.2f}, {c.ci_high:.2f}]")
      verdict = c.verdict.value
      if c.verdict.name == "UNDECIDED":
        if c.n < 2 or c.sd is None:
          verdict += " (spread unknown: fewer than 2 pairs)"
        elif c.pairs_needed is not None:
          verdict += f" (about {c.pairs_needed} pairs would decide it at this spread)"
        else:
          verdict += " (no number of pairs decides it at this spread)"
      lines.append(f"| {c.name} | {c.margin:g} | {c.n} | {_num(c.mean)} | {_num(c.sd)} | "
                   f"{ci} | {_num(c.p_value, '{:.3g}')} | {_num(c.p_holm, '{:.3g}')} | "
                   f"{'**' + verdict + '**' if c.verdict.name != 'UNDECIDED' else verdict} |")
    lines += ["", STATEMENT, ""]
  if sweep:
    lines += ["Learning-rate / epochs sweep (fp32 DP):", "",
              "| run | learning rate | epochs | accuracy % | epsilon | train s |",
              "|---|---|---|---|---|---|"]
    for r in sorted(sweep, key=lambda r: (r["config"]["learning_rate"], r["config"]["epochs"])):
      lines.append(f"| {r['run_id']} | {r['config']['learning_rate']:g} | "
                   f"{r['config']['epochs']} | {100 * r['test_accuracy']:.2f} | "
                   f"{_num(r.get('epsilon'), '{:.3f}')} | {_num(r.get('train_seconds'), '{:.1f}')} |")
    lines.append("")
  if plot:
    lines.append(f"![Accuracy vs measured and modelled compute]({plot})\n")
  return "\n".join(lines)


def compact_lines(records: Sequence[Mapping[str, Any]]) -> List[str]:
  """One JSON line per record (run_study_lib.compact_record + the study notes)."""
  out = []
  for rec in sorted(records, key=lambda r: r.get("finished_utc") or ""):
    line = run_study_lib.compact_record(rec)
    line["study"] = rec.get("study")
    out.append(json.dumps(line))
  return out


def plot_compute(records: Sequence[Mapping[str, Any]], out_png: str, *,
                 title: str = "Paired small-ResNet study") -> str:
  """Accuracy against measured train seconds (left) and modelled compute (right).

  DP runs only; one small point per run, a large marker with sd bars per
  (format, ratio, policy).
  """
  study, _ = split_records(records)
  runs = [r for r in study if r["config"].get("dp", True)]
  if not runs:
    _validation.fail("records", len(records), "at least one DP study run")
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
  xs = (("train_seconds", "measured train time per run (s)"),
        ("compute", "modelled compute (1 / theoretical speed-up; fp32 = 1)"))
  groups = collections.defaultdict(list)
  for r in runs:
    cfg = r["config"]
    groups[(kind(r), cfg.get("format") if kind(r) != "fp32" else None,
            cfg.get("ratio") if kind(r) != "fp32" else None)].append(r)
  for ax, (field, label) in zip(axes, xs):
    seen = set()
    for (k, fmt, ratio), rs in sorted(groups.items(), key=lambda kv: str(kv[0])):
      _, marker, colour = pareto_lib.CATEGORIES.get(k, pareto_lib.CATEGORIES["other"])
      x = [pareto_lib.relative_compute(r) if field == "compute" else
           float(r.get("train_seconds") or math.nan) for r in rs]
      y = [100.0 * float(r["test_accuracy"]) for r in rs]
      ax.scatter(x, y, marker=marker, color=colour, alpha=0.3, s=18)
      name = pareto_lib.CATEGORIES.get(k, ("other",))[0]
      ax.errorbar(statistics.fmean(x), statistics.fmean(y),
                  yerr=statistics.stdev(y) if len(y) > 1 else 0.0, fmt=marker,
                  color=colour, markersize=9, capsize=3,
                  label=None if name in seen else name)
      seen.add(name)
      if fmt is not None:
        ax.annotate(f"{fmt} r{float(ratio):g}", (statistics.fmean(x), statistics.fmean(y)),
                    fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel(label)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("test accuracy (%)")
  axes[1].legend(fontsize=8, loc="lower right")
  fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
  fig.savefig(out_png, dpi=110)
  plt.close(fig)
  return out_png

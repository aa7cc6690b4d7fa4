"""The reproduction study of DPQuant's claims: run grid, resumable log, tables.

A study is a list of :class:`RunSpec` (a stable id + the keyword arguments of
``examples.train_lib.TrainConfig``, which are also the flags of
examples/train.py). :func:`run_study` trains them in order (each run is one
``examples/train.py`` process: tools/ do not import examples/) and
appends one JSON line per finished run to a log; runs whose id is already in
the log are skipped, so an interrupted study resumes where it stopped.
:func:`summarize` and :func:`markdown_report` turn the log into the tables and
the claim checks of docs/RESULTS.md.

Static subsets: the tutorial CNN has 4 quantizable layers, so k = round(ratio
* 4) is 2, 3 and 4 at ratios 0.5, 0.75 and 0.9. There are only C(4, 2) = 6,
C(4, 3) = 4 and C(4, 4) = 1 distinct subsets; the study draws min(n_subsets,
number of distinct subsets) of them without replacement (seeded), and at
ratio 0.9 every policy quantizes every layer (static = rotation = DPQuant).
"""

import dataclasses
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

from dpquant_tf import _validation

__all__ = ["Phase", "RunSpec", "claim_checks", "compact_record", "completed_ids",
           "load_log",
           "pareto_gaps", "markdown_report", "num_quantized",
           "run_study", "static_subsets", "study_runs", "summarize"]


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One run of the study: a stable id and TrainConfig keyword arguments."""
  run_id: str
  config: Mapping[str, Any]


def num_quantized(ratio: float, n: int) -> int:
  """k = round(ratio * n), half up (as the schedule's policies count)."""
  return int(math.floor(ratio * n + 0.5))


def static_subsets(layer_names: Sequence[str], ratio: float, count: int,
                   seed: int) -> List[tuple]:
  """`count` distinct random k-subsets (fewer when fewer exist), seeded."""
  k = num_quantized(ratio, len(layer_names))
  every = list(itertools.combinations(layer_names, k))
  rng = np.random.default_rng(seed)
  idx = rng.permutation(len(every))[:count]
  return [tuple(every[i]) for i in sorted(idx)]


def _eps_tag(eps: Optional[float]) -> str:
  return "nodp" if eps is None else f"eps{eps:g}"


@dataclasses.dataclass(frozen=True)
class Phase:
  """A block of the study: one seed at one epsilon (None = no DP)."""
  seed: int
  epsilon: Optional[float]
  with_static: bool = True


def study_runs(*, layer_names: Sequence[str], phases: Sequence[Phase],
               ratios: Sequence[float], n_subsets: int = 5,
               formats: Sequence[str] = ("luq_fp4",),
               common: Optional[Mapping[str, Any]] = None,
               nodp_overrides: Optional[Mapping[str, Any]] = None) -> List[RunSpec]:
  """The run grid, in phase order so that a partial study is already useful.

  Per phase (seed, epsilon) and format: the fp32 baseline, then per ratio
  DPQuant, rotation and (``with_static``) the static random subsets, whose
  spread is the paper's "static mean +- std". When k = round(ratio * n)
  equals n, every layer is quantized and rotation is the same run as the
  single static subset, so it is left out.

  Args:
    layer_names: the model's quantizable layers (for the static subsets).
    phases: the blocks, in run order.
    ratios: quantized fractions.
    n_subsets: static random subsets per ratio (fewer if fewer exist).
    formats: quantization formats.
    common: TrainConfig arguments shared by every run (epochs, batch_size...).
    nodp_overrides: TrainConfig arguments replacing `common` in the non-DP
      phases (e.g. the learning rate: plain SGD averages unclipped
      gradients, DP-SGD clipped ones, so they need different rates).
  """
  common = dict(common or {})
  runs = []
  for phase in phases:
    seed, eps = phase.seed, phase.epsilon
    base = dict(common, seed=seed, dp=eps is not None, target_epsilon=eps)
    if eps is None:
      base.update(nodp_overrides or {})
    tag = _eps_tag(eps)
    fp32_id = f"{tag}-fp32-s{seed}"
    if fp32_id not in {r.run_id for r in runs}:
      runs.append(RunSpec(fp32_id, dict(base, policy="none")))
    for fmt in formats:
      for ratio in ratios:
        head = f"{tag}-{fmt}-r{ratio:g}"
        everything = num_quantized(ratio, len(layer_names)) == len(layer_names)
        runs.append(RunSpec(f"{head}-dpquant-s{seed}", dict(
            base, policy="loss_aware", ratio=ratio, format=fmt)))
        if not everything:
          runs.append(RunSpec(f"{head}-rotation-s{seed}", dict(
              base, policy="rotation", ratio=ratio, format=fmt)))
        if phase.with_static:
          for subset in static_subsets(layer_names, ratio, n_subsets, seed):
            runs.append(RunSpec(
                f"{head}-static-{'+'.join(subset)}-s{seed}",
                dict(base, policy="static", ratio=ratio, format=fmt,
                     static_layers=tuple(subset))))
  ids = [r.run_id for r in runs]
  if len(set(ids)) != len(ids):
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    _validation.fail("phases", dupes, "phases that give distinct run ids")
  return runs


def completed_ids(log_path: str) -> set:
  """Ids of the successful runs in a study log (missing file: none)."""
  done = set()
  if not os.path.exists(log_path):
    return done
  with open(log_path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line cut by a crash; the run is redone
      if rec.get("status") == "ok":
        done.add(rec["run_id"])
  return done


def _append(log_path: str, record: Mapping[str, Any]) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
  prefix = ""
  if os.path.exists(log_path) and os.path.getsize(log_path) > 0:
    with open(log_path, "rb") as f:
      f.seek(-1, os.SEEK_END)
      if f.read(1) != b"\n":
        prefix = "\n"  # end a line cut by a crash, so this record parses
  with open(log_path, "a") as f:
    f.write(prefix + json.dumps(record, default=str) + "\n")
    f.flush()
    os.fsync(f.fileno())


def run_study(runs: Sequence[RunSpec], log_path: str, *,
              runner: Optional[Callable[[Mapping[str, Any]], Dict[str, Any]]] = None,
              max_runs: Optional[int] = None, verbose: bool = True,
              meta: Optional[Callable[[RunSpec], Mapping[str, Any]]] = None) -> int:
  """Runs the runs not yet in the log; appends one JSON line per run.

  Args:
    runs: the grid (:func:`study_runs`).
    log_path: the JSONL log (created; appended to).
    runner: config dict -> metrics dict; default runs examples/train.py in a
      subprocess (:func:`train_argv`) and reads its metrics JSON.
    max_runs: stop after this many new runs.
    verbose: print one line per run.
    meta: RunSpec -> dict stored under ``study`` in its record (grid, pairing).

  Returns:
    The number of runs executed now (failures included; a failed run is
    logged with ``status: "failed"`` and retried on the next call).
  """
  runner = runner or _train_runner
  done = completed_ids(log_path)
  executed = 0
  for spec in runs:
    if spec.run_id in done:
      continue
    if max_runs is not None and executed >= max_runs:
      break
    start = time.time()
    try:
      metrics = runner(spec.config)
      record = dict(metrics, run_id=spec.run_id, status="ok")
    except Exception as e:  # pylint: disable=broad-except
      record = {"run_id": spec.run_id, "status": "failed",
                "config": _withhold_research_seeds(spec.config),
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc()[-4000:]}
    if meta is not None:
      record["study"] = dict(meta(spec))
    record["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    record["run_seconds"] = time.time() - start
    _append(log_path, record)
    executed += 1
    if verbose:
      acc = record.get("test_accuracy")
      print(f"[study] {spec.run_id}: {record['status']} "
            f"acc={acc if acc is None else round(acc, 4)} "
            f"eps={record.get('epsilon')} {record['run_seconds']:.0f}s", flush=True)
  return executed


def _withhold_research_seeds(config: Mapping[str, Any]) -> Dict[str, Any]:
  """The config with research seed values replaced, as train.py's metrics do."""
  return {k: ("set (withheld)" if k.startswith("research_") and v is not None else v)
          for k, v in config.items()}


TRAIN_SCRIPT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
    "train.py")


def train_argv(config: Mapping[str, Any]) -> List[str]:
  """The examples/train.py flags of a TrainConfig keyword dict.

  None values are left out (the binary's default); ``dp`` becomes
  ``--dp``/``--nodp``; ``static_layers`` a comma-separated list.
  """
  argv = []
  for key, value in sorted(config.items()):
    if value is None:
      continue
    if isinstance(value, bool):
      argv.append(f"--{key}" if value else f"--no{key}")
    elif key == "static_layers":
      argv.append(f"--{key}=" + ",".join(str(v) for v in value))
    else:
      argv.append(f"--{key}={value}")
  return argv


def _train_runner(config: Mapping[str, Any]) -> Dict[str, Any]:
  """Runs examples/train.py on `config` in a fresh process; its metrics."""
  cfg = dict(config)
  if cfg.get("verbose") == "auto":
    cfg["verbose"] = None
  with tempfile.TemporaryDirectory() as tmp:
    cfg["metrics_json"] = os.path.join(tmp, "metrics.json")
    proc = subprocess.run([sys.executable, TRAIN_SCRIPT] + train_argv(cfg),
                          stderr=subprocess.PIPE, text=True,
                          check=False)
    if proc.returncode != 0:
      raise RuntimeError(f"examples/train.py exited with {proc.returncode}: "
                         f"{proc.stderr[-3000:]}")
    with open(cfg["metrics_json"]) as f:
      metrics = json.load(f)
  metrics.get("config", {})["metrics_json"] = config.get("metrics_json")
  return metrics


def _mean_std(values: Sequence[float]):
  values = list(values)
  if not values:
    return None, None, 0
  mean = statistics.fmean(values)
  std = statistics.stdev(values) if len(values) > 1 else 0.0
  return mean, std, len(values)


def load_log(log_path: str) -> List[Dict[str, Any]]:
  """Successful records of a study log (last record wins for a repeated id)."""
  by_id = {}
  with open(log_path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue
      if rec.get("status") == "ok":
        by_id[rec["run_id"]] = rec
  return list(by_id.values())


def _kind(rec) -> str:
  policy = rec["config"]["policy"]
  return {"none": "fp32", "loss_aware": "dpquant"}.get(policy, policy)


def summarize(records: Iterable[Mapping[str, Any]]) -> Dict[str, Any]:
  """Groups the records: {eps_tag: {"fp32": stats, (fmt, ratio): {kind: stats}}}.

  Each stats dict: accuracy mean/std/n (percent), speed-up mean, epsilon mean,
  analysis share max, wall seconds mean.
  """
  groups: Dict[tuple, List[Mapping[str, Any]]] = {}
  for rec in records:
    cfg = rec["config"]
    tag = _eps_tag(cfg.get("target_epsilon") if cfg.get("dp", True) else None)
    kind = _kind(rec)
    key = (tag, None, None, kind) if kind == "fp32" else (
        tag, cfg.get("format"), float(cfg.get("ratio")), kind)
    groups.setdefault(key, []).append(rec)
  out: Dict[str, Any] = {}
  for (tag, fmt, ratio, kind), recs in groups.items():
    mean, std, n = _mean_std([100 * r["test_accuracy"] for r in recs])
    eps = [r["epsilon"] for r in recs if r.get("epsilon") is not None]
    shares = [r["analysis_share"] for r in recs if r.get("analysis_share") is not None]
    stats = {"acc_mean": mean, "acc_std": std, "n": n,
             "speedup": statistics.fmean(r["theoretical_speedup"] for r in recs),
             "epsilon": statistics.fmean(eps) if eps else None,
             "analysis_share_max": max(shares) if shares else None,
             "wall_seconds": statistics.fmean(r["wall_seconds"] for r in recs),
             "seeds": sorted({r["config"].get("seed") for r in recs})}
    slot = out.setdefault(tag, {})
    if kind == "fp32":
      slot["fp32"] = stats
    else:
      slot.setdefault((fmt, ratio), {})[kind] = stats
  return out


def _fmt_stats(s) -> str:
  if not s:
    return "n/a"
  return f"{s['acc_mean']:.2f} ± {s['acc_std']:.2f} (n={s['n']})"


def pareto_gaps(records: Iterable[Mapping[str, Any]]) -> Dict[tuple, float]:
  """Gap (accuracy points) of each DPQuant group to the Pareto front of its setting.

  For every (eps_tag, format, ratio) DPQuant group: the best accuracy of any
  single run of the same setting (any policy) that is at most as expensive
  (relative compute = 1 / speed-up), minus the DPQuant group's mean accuracy;
  0 or less means DPQuant is on the front.
  """
  records = list(records)
  by_tag: Dict[str, List[Mapping[str, Any]]] = {}
  for rec in records:
    cfg = rec["config"]
    tag = _eps_tag(cfg.get("target_epsilon") if cfg.get("dp", True) else None)
    by_tag.setdefault(tag, []).append(rec)
  out = {}
  summary = summarize(records)
  for tag, recs in by_tag.items():
    for key, kinds in summary.get(tag, {}).items():
      if key == "fp32" or "dpquant" not in kinds:
        continue
      dq = [r for r in recs if _kind(r) == "dpquant" and
            (r["config"].get("format"), float(r["config"].get("ratio"))) == key]
      compute = statistics.fmean(1.0 / r["theoretical_speedup"] for r in dq)
      best = max(100 * r["test_accuracy"] for r in recs
                 if 1.0 / r["theoretical_speedup"] <= compute + 1e-9)
      out[(tag,) + tuple(key)] = best - kinds["dpquant"]["acc_mean"]
  return out


def claim_checks(summary: Mapping[str, Any]) -> List[Dict[str, Any]]:
  """The paper's claims, checked per (epsilon, format, ratio).

  Returns rows with: tag, fmt, ratio, above_static (DPQuant mean > static mean
  + static std), within_2 (fp32 mean - DPQuant mean <= 2 points),
  share_under_2pct (max analysis share < 0.02), and the numbers.
  """
  rows = []
  for tag, slot in sorted(summary.items()):
    fp32 = slot.get("fp32")
    for key, kinds in sorted(((k, v) for k, v in slot.items() if k != "fp32"),
                             key=lambda kv: (str(kv[0][0]), kv[0][1])):
      fmt, ratio = key
      dq, st = kinds.get("dpquant"), kinds.get("static")
      row = {"tag": tag, "format": fmt, "ratio": ratio, "dpquant": dq,
             "static": st, "rotation": kinds.get("rotation"), "fp32": fp32}
      row["above_static"] = (None if not (dq and st and st["n"] > 1) else
                             dq["acc_mean"] > st["acc_mean"] + st["acc_std"])
      row["within_2"] = (None if not (dq and fp32) else
                         fp32["acc_mean"] - dq["acc_mean"] <= 2.0)
      row["share_under_2pct"] = (None if not dq or dq["analysis_share_max"] is None
                                 or tag == "nodp" else dq["analysis_share_max"] < 0.02)
      rows.append(row)
  return rows


def _yes_no(value) -> str:
  return "n/a" if value is None else ("yes" if value else "**no**")


def markdown_report(records: Sequence[Mapping[str, Any]]) -> str:
  """The study's tables in Markdown (accuracy in percent)."""
  summary = summarize(records)
  gaps = pareto_gaps(records)
  lines = []
  for tag in sorted(summary, key=lambda t: (t == "nodp", t)):
    slot = summary[tag]
    title = "without DP (plain SGD)" if tag == "nodp" else f"epsilon = {tag[3:]}"
    lines.append(f"### {title}\n")
    fp32 = slot.get("fp32")
    if fp32:
      eps = f", epsilon spent {fp32['epsilon']:.3f}" if fp32["epsilon"] else ""
      lines.append(f"fp32 baseline: {_fmt_stats(fp32)}{eps}, "
                   f"wall {fp32['wall_seconds']:.0f} s per run\n")
    lines.append("| format | ratio | static mean ± std (subsets) | rotation | DPQuant | "
                 "DPQuant speed-up | DPQuant eps (analysis share) | DPQuant > static+std | "
                 "within 2 pts of fp32 | gap to Pareto front |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for row in claim_checks({tag: slot}):
      dq = row["dpquant"]
      speed = f"{dq['speedup']:.2f}x" if dq else "n/a"
      eps = ("n/a" if not dq or dq["epsilon"] is None else
             f"{dq['epsilon']:.3f} ({100 * (dq['analysis_share_max'] or 0):.3f}%)")
      gap = gaps.get((tag, row["format"], row["ratio"]))
      gap_text = "n/a" if gap is None else f"{max(gap, 0.0):.2f}"
      lines.append(f"| {row['format']} | {row['ratio']:g} | {_fmt_stats(row['static'])} | "
                   f"{_fmt_stats(row['rotation'])} | {_fmt_stats(dq)} | {speed} | {eps} | "
                   f"{_yes_no(row['above_static'])} | {_yes_no(row['within_2'])} | "
                   f"{gap_text} |")
    lines.append("")
  lines.extend(_static_detail(records))
  amp = dp_amplification(summary)
  if amp:
    lines.append("### Does DP amplify the quantization loss?\n")
    lines.append("Accuracy drop of the static subsets (mean) below the fp32 baseline "
                 "of the same setting, in points:\n")
    lines.append("| format | ratio | drop without DP | " +
                 " | ".join(f"drop at {t}" for t in amp["dp_tags"]) + " |")
    lines.append("|---|---|---|" + "---|" * len(amp["dp_tags"]))
    for (fmt, ratio), drops in sorted(amp["rows"].items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
      cells = " | ".join("n/a" if drops.get(t) is None else f"{drops[t]:.2f}"
                         for t in amp["dp_tags"])
      nodp = "n/a" if drops.get("nodp") is None else f"{drops['nodp']:.2f}"
      lines.append(f"| {fmt} | {ratio:g} | {nodp} | {cells} |")
    lines.append("")
  return "\n".join(lines)


def _static_detail(records: Sequence[Mapping[str, Any]]) -> List[str]:
  """One table row per static subset: its accuracy in every setting."""
  cells: Dict[tuple, Dict[str, float]] = {}
  tags = set()
  for rec in records:
    cfg = rec["config"]
    if cfg.get("policy") != "static" or not cfg.get("static_layers"):
      continue
    tag = _eps_tag(cfg.get("target_epsilon") if cfg.get("dp", True) else None)
    tags.add(tag)
    key = (cfg.get("format"), float(cfg["ratio"]), "+".join(cfg["static_layers"]))
    cells.setdefault(key, {})[tag] = 100 * rec["test_accuracy"]
  if not cells:
    return []
  order = sorted(tags, key=lambda t: (t == "nodp", t))
  lines = ["### Static subsets one by one (accuracy, %)\n",
           "| format | ratio | quantized layers | " + " | ".join(order) + " |",
           "|---|---|---|" + "---|" * len(order)]
  for (fmt, ratio, subset), by_tag in sorted(cells.items(), key=lambda kv: (str(kv[0][0]), kv[0][1], kv[0][2])):
    vals = " | ".join("" if t not in by_tag else f"{by_tag[t]:.1f}" for t in order)
    lines.append(f"| {fmt} | {ratio:g} | {subset} | {vals} |")
  lines.append("")
  return lines


def dp_amplification(summary: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
  """fp32 accuracy minus static mean accuracy, per (format, ratio), per setting."""
  if "nodp" not in summary:
    return None
  dp_tags = sorted(t for t in summary if t != "nodp")
  rows: Dict[tuple, Dict[str, Optional[float]]] = {}
  for tag in ["nodp"] + dp_tags:
    slot = summary[tag]
    fp32 = slot.get("fp32")
    for key, kinds in slot.items():
      if key == "fp32":
        continue
      st = kinds.get("static")
      rows.setdefault(key, {})[tag] = (
          None if not (fp32 and st) else fp32["acc_mean"] - st["acc_mean"])
  return {"dp_tags": dp_tags, "rows": rows}


_COMPACT_KEYS = ("run_id", "test_accuracy", "epsilon", "delta", "analysis_share",
                 "noise_multiplier", "steps", "theoretical_speedup", "wall_seconds",
                 "train_seconds", "finished_utc")


def compact_record(record: Mapping[str, Any]) -> Dict[str, Any]:
  """The fields of a study record that the report and the plot use."""
  out = {k: record.get(k) for k in _COMPACT_KEYS}
  out["status"] = record.get("status", "ok")
  out["config"] = {k: v for k, v in record["config"].items()
                   if k not in ("metrics_json", "export_dir", "tensorboard_dir", "verbose")}
  out["quantized_per_epoch"] = [p.get("quantized", []) for p in record.get("plan_per_epoch", [])]
  # Which runs used seeded (research) noise or sampling; older logs: unseeded.
  research = record.get("research") or {}
  out["noise_seeded"] = bool(research.get("noise_seeded", False))
  out["sampling_seeded"] = bool(research.get("sampling_seeded", False))
  return out

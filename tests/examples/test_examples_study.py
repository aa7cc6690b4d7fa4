"""Tests of tools/run_study_lib: the grid, resumability, the report."""

import json
import os
import subprocess
import sys

import pytest

from tools import run_study_lib as rs

LAYERS = ["conv1", "conv2", "dense1", "logits"]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_static_subsets_distinct_seeded_and_capped():
  subs = rs.static_subsets(LAYERS, 0.5, 5, seed=0)
  assert len(subs) == 5 and len(set(subs)) == 5 and all(len(s) == 2 for s in subs)
  assert subs == rs.static_subsets(LAYERS, 0.5, 5, seed=0)
  assert subs != rs.static_subsets(LAYERS, 0.5, 5, seed=1)
  assert len(rs.static_subsets(LAYERS, 0.75, 5, seed=0)) == 4  # only C(4,3) exist
  assert rs.static_subsets(LAYERS, 0.9, 5, seed=0) == [tuple(LAYERS)]


def test_grid_order_and_contents():
  runs = rs.study_runs(layer_names=LAYERS, phases=[rs.Phase(0, 8.0), rs.Phase(1, None, False)],
                       ratios=[0.5, 0.9], n_subsets=5, common={"epochs": 2},
                       nodp_overrides={"learning_rate": 0.1})
  ids = [r.run_id for r in runs]
  assert ids[0] == "eps8-fp32-s0"
  # ratio 0.9 quantizes all 4 layers: no separate rotation run.
  assert "eps8-luq_fp4-r0.9-rotation-s0" not in ids
  assert "eps8-luq_fp4-r0.9-static-conv1+conv2+dense1+logits-s0" in ids
  assert sum("-static-" in i for i in ids) == 6  # 5 at 0.5 + 1 at 0.9, seed 0 only
  nodp = [r for r in runs if r.run_id.startswith("nodp")]
  assert all(not r.config["dp"] and r.config["learning_rate"] == 0.1 for r in nodp)
  assert all(r.config["epochs"] == 2 for r in runs)
  static = next(r for r in runs if "-static-" in r.run_id)
  assert static.config["policy"] == "static" and len(static.config["static_layers"]) == 2


def _fake_metrics(config):
  acc = {"none": 0.8, "static": 0.6, "rotation": 0.7, "loss_aware": 0.75}[config["policy"]]
  if config["policy"] == "static":
    acc += 0.01 * len("".join(config["static_layers"])) % 0.05
  return {"test_accuracy": acc, "epsilon": None if not config["dp"] else 7.99,
          "analysis_share": 0.001 if config["policy"] == "loss_aware" else 0.0,
          "theoretical_speedup": 1.0 if config["policy"] == "none" else 2.0,
          "wall_seconds": 1.0, "config": dict(config)}


def test_resumable_and_failures_retried(tmp_path):
  log = str(tmp_path / "study.jsonl")
  runs = rs.study_runs(layer_names=LAYERS, phases=[rs.Phase(0, 8.0)], ratios=[0.5])
  calls = []

  def runner(config):
    calls.append(config)
    if len(calls) == 2:
      raise RuntimeError("boom")
    return _fake_metrics(config)

  assert rs.run_study(runs, log, runner=runner, max_runs=3, verbose=False) == 3
  assert len(rs.completed_ids(log)) == 2
  with open(log) as f:
    lines = [json.loads(l) for l in f]
  assert [l["status"] for l in lines] == ["ok", "failed", "ok"]
  assert "boom" in lines[1]["error"]
  # A truncated last line (crash mid-write) is ignored.
  with open(log, "a") as f:
    f.write('{"run_id": "x", "sta')
  n_left = len(runs) - 2
  assert rs.run_study(runs, log, runner=runner, verbose=False) == n_left
  assert rs.completed_ids(log) == {r.run_id for r in runs}
  assert rs.run_study(runs, log, runner=runner, verbose=False) == 0


def test_report_and_claims(tmp_path):
  log = str(tmp_path / "study.jsonl")
  runs = rs.study_runs(layer_names=LAYERS, phases=[rs.Phase(0, 8.0), rs.Phase(0, None)],
                       ratios=[0.5, 0.75])
  rs.run_study(runs, log, runner=_fake_metrics, verbose=False)
  records = rs.load_log(log)
  summary = rs.summarize(records)
  assert summary["eps8"]["fp32"]["acc_mean"] == pytest.approx(80.0)
  rows = {(r["tag"], r["ratio"]): r for r in rs.claim_checks(summary)}
  row = rows[("eps8", 0.5)]
  assert row["static"]["n"] == 5 and row["dpquant"]["n"] == 1
  assert row["above_static"] is True  # 75 > 60..62 + std
  assert row["within_2"] is False     # 80 - 75 > 2
  assert row["share_under_2pct"] is True
  text = rs.markdown_report(records)
  assert "### epsilon = 8" in text and "### without DP (plain SGD)" in text
  assert "Does DP amplify the quantization loss?" in text
  assert "**no**" in text


def test_run_study_binary_dry_run():
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", "run_study.py"), "--dry_run",
       "--phases=0:8:1", "--ratios=0.5"],
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "eps8-fp32-s0" in proc.stdout and proc.stdout.strip().endswith("8 runs")


def test_train_argv_round_trips_through_the_train_binary_flags():
  """run_study runs examples/train.py: its argv rebuilds the same config."""
  from absl import flags as absl_flags  # pylint: disable=import-outside-toplevel
  from examples import train as train_bin  # pylint: disable=import-outside-toplevel
  from examples import train_lib  # pylint: disable=import-outside-toplevel
  config = dict(dataset="digits", model="cnn", epochs=2, batch_size=32,
                target_epsilon=4.0, learning_rate=0.25, policy="static",
                ratio=0.5, static_layers=("conv1", "logits"), format="int4",
                seed=3, max_train=100, verbose=0)
  argv = rs.train_argv(config)
  absl_flags.FLAGS(["train.py"] + argv)
  try:
    rebuilt = train_bin.config_from_flags()
  finally:
    absl_flags.FLAGS.unparse_flags()
  assert rebuilt == train_lib.TrainConfig(**config)
  assert rs.train_argv({"dp": False, "seed": None}) == ["--nodp"]


def test_compact_record_marks_seeded_runs():
  base = {"run_id": "r", "config": {"policy": "none"}, "plan_per_epoch": []}
  seeded = rs.compact_record(dict(base, research={
      "noise_seeded": True, "sampling_seeded": True, "sample_sha256": "ab"}))
  assert seeded["noise_seeded"] and seeded["sampling_seeded"]
  old = rs.compact_record(base)  # a log written before the research fields
  assert not old["noise_seeded"] and not old["sampling_seeded"]

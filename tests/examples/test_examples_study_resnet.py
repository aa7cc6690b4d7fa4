"""Tests of the paired small-ResNet study: grid, records, report, binaries."""

import json
import re
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

from tools import run_study_lib as rs
from tools import study_grid_lib as sg
from tools import study_report_lib as sr

LAYERS = [f"l{i}" for i in range(10)]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _grid(**kw):
  args = dict(layer_names=LAYERS, seeds=range(5), ratios=[0.5, 0.9],
              formats=["luq_fp4"], common={"epochs": 2, "learning_rate": 0.5},
              nodp_overrides={"learning_rate": 0.1})
  args.update(kw)
  return sg.study_grid(**args)


def test_grid_pairs_every_policy_of_a_seed_on_the_same_research_seeds():
  runs = _grid()
  dp = [r for r in runs if r.config["dp"]]
  by_seed = {}
  for r in dp:
    cfg = r.config
    by_seed.setdefault(cfg["seed"], set()).add(
        (cfg["research_noise_seed"], cfg["research_sampling_seed"],
         cfg["research_estimator_seed"]))
    assert cfg["target_epsilon"] == 8.0 and cfg["model"] == "small_resnet"
  assert sorted(by_seed) == [0, 1, 2, 3, 4]
  assert all(len(v) == 1 for v in by_seed.values())  # one pair of streams per seed
  streams = [next(iter(v)) for v in by_seed.values()]
  assert len({s[0] for s in streams}) == 5 and len({s[1] for s in streams}) == 5
  assert len({s[2] for s in streams}) == 5
  assert all(len(set(s)) == 3 for s in streams)  # noise, sampling, estimator differ
  # Every seed has the four DP policies (with 10 layers ratio 0.9 is 9 of
  # them, so rotation differs from static there, unlike on the 4-layer CNN).
  kinds = {(sg.run_meta(r)["kind"], r.config["seed"]) for r in dp}
  assert kinds == {(k, s) for k in sg.DP_POLICIES for s in range(5)}
  ids = [r.run_id for r in runs]
  assert "eps8-luq_fp4-r0.9-rotation-s0" in ids
  assert not any("-rotation-" in r.run_id for r in _grid(ratios=[1.0]))  # k = n
  assert "eps8-luq_fp4-r0.5-rotation-s4" in ids and "eps8-fp32-s3" in ids
  assert len(ids) == len(set(ids))


def test_grid_nodp_runs_unseeded_and_static_subsets_shared_with_dp():
  runs = _grid()
  nodp = [r for r in runs if not r.config["dp"]]
  assert nodp and all("research_noise_seed" not in r.config for r in nodp)
  assert all(r.config["learning_rate"] == 0.1 for r in nodp)
  assert {sg.run_meta(r)["kind"] for r in nodp} == {"fp32", "static"}
  # The non-DP static runs of a seed quantize the same subset as the DP ones
  # (the amplification claim pairs them).
  def subsets(dp):
    return {(r.config["seed"], r.config["ratio"], r.config["static_layers"])
            for r in runs if r.config["dp"] == dp and r.config["policy"] == "static"}
  assert subsets(True) == subsets(False)
  assert len({s[2] for s in subsets(True) if s[1] == 0.5}) > 1  # differs by seed


def test_default_cnn_grid_and_plain_runs_stay_unseeded():
  cnn = rs.study_runs(layer_names=LAYERS[:4], phases=[rs.Phase(0, 8.0)], ratios=[0.5])
  assert all("research_noise_seed" not in r.config for r in cnn)
  assert not any(a.startswith("--research") for r in cnn for a in rs.train_argv(r.config))
  paired = _grid(seeds=[0])[0]
  argv = rs.train_argv(paired.config)
  assert "--research_noise_seed=1000000" in argv
  assert "--research_sampling_seed=2000000" in argv
  assert "--research_estimator_seed=3000000" in argv


def test_grid_validation_and_formats():
  with pytest.raises(ValueError, match="formats"):
    _grid(formats=["luq_fp4", "no_such_format"])
  with pytest.raises(ValueError, match="nodp_policies"):
    _grid(nodp_policies=["bogus"])
  with pytest.raises(ValueError, match="seeds"):
    _grid(seeds=[1, 1])
  have = sg.available_formats()
  assert "luq_fp4" in have and sg.default_formats()[0] == "luq_fp4"
  assert set(sg.default_formats()) <= set(have)
  from examples import train_lib  # pylint: disable=import-outside-toplevel
  assert have == train_lib.format_names()  # what train.py --format accepts
  assert ("bf16" in sg.default_formats()) == ("bf16" in train_lib.format_names())
  assert "fp8_e4m3" not in sg.default_formats()  # simulated, not native
  only = _grid(dp_policies=["fp32", "dpquant"], nodp_policies=[])
  assert {sg.run_meta(r)["kind"] for r in only} == {"fp32", "dpquant"}


def test_sweep_grid():
  runs = sg.sweep_grid(learning_rates=[0.5, 1.0], epochs=[2, 5])
  assert [r.run_id for r in runs] == [
      "sweep-eps8-fp32-lr0.5-e2-s0", "sweep-eps8-fp32-lr0.5-e5-s0",
      "sweep-eps8-fp32-lr1-e2-s0", "sweep-eps8-fp32-lr1-e5-s0"]
  assert all(r.config["policy"] == "none" and r.config["model"] == "small_resnet"
             for r in runs)
  assert sg.run_meta(runs[0])["sweep"] is True


def _synthetic_runner(effects, noise_sd=0.3):
  """Accuracy = seed effect + policy effect + small noise (paired data)."""
  def run(config):
    seed, kind = config["seed"], sg.run_meta(rs.RunSpec("x", config))["kind"]
    rng = np.random.default_rng(zlib.crc32(repr(
        (seed, kind, config.get("ratio"), config["dp"])).encode()))
    # Without DP: 15 points higher, a third of the policy effect.
    effect = effects[kind] if config["dp"] else 15 + effects[kind] / 3
    acc = 70 + 6 * np.sin(seed) + effect + rng.normal(0, noise_sd)
    return {"test_accuracy": acc / 100, "epsilon": 7.9 if config["dp"] else None,
            "theoretical_speedup": 1.0 if kind == "fp32" else 2.0,
            "wall_seconds": 3.0, "train_seconds": 2.0 + (kind != "fp32"),
            "research": {"noise_seeded": config.get("research_noise_seed") is not None},
            "config": {k: ("set (withheld)" if k.startswith("research_") else v)
                       for k, v in config.items()}}
  return run


def test_study_records_report_verdicts_and_plot(tmp_path):
  log = str(tmp_path / "study.jsonl")
  runs = _grid(ratios=[0.5])
  # DPQuant clearly above static, equal to rotation, 1 point under fp32.
  effects = {"fp32": 0.0, "static": -5.0, "rotation": -1.0, "dpquant": -1.0}
  assert rs.run_study(runs, log, runner=_synthetic_runner(effects), verbose=False,
                      meta=sg.run_meta) == len(runs)
  records = rs.load_log(log)
  assert all(r["study"]["grid"] == "small_resnet" for r in records)
  assert all(r["study"]["paired"] == r["config"]["dp"] for r in records)
  claims = {c["name"]: c for c in sr.build_claims(records)}
  assert set(claims) == {f"{c} (eps8 luq_fp4 r0.5)" for c in (
      "DPQuant - static", "DPQuant - rotation", "DPQuant - fp32 DP", "DP amplification")}
  assert claims["DPQuant - static (eps8 luq_fp4 r0.5)"]["seeds"] == [0, 1, 2, 3, 4]
  text = sr.markdown_report(records, plot="x.png")
  lines = {l.split(" | ")[0].lstrip("| "): l for l in text.splitlines() if l.startswith("| DP")}
  assert lines["DPQuant - static (eps8 luq_fp4 r0.5)"].endswith("**holds** |")
  assert re.search(r"\| undecided at this n \(about \d+ pairs would decide it at "
                   r"this spread\) \|$", lines["DPQuant - rotation (eps8 luq_fp4 r0.5)"])
  assert lines["DPQuant - fp32 DP (eps8 luq_fp4 r0.5)"].endswith("**holds** |")
  # DP loss 5 points, non-DP loss 5/3: amplification about 3.3 points.
  assert lines["DP amplification (eps8 luq_fp4 r0.5)"].endswith("**holds** |")
  assert "Holm-Bonferroni" in text and "| 5/5 |" in text and "![" in text
  png = sr.plot_compute(records, str(tmp_path / "p" / "c.png"))
  assert open(png, "rb").read(4) == b"\x89PNG"
  compact = [json.loads(l) for l in sr.compact_lines(records)]
  assert all(c["noise_seeded"] == c["config"]["dp"] for c in compact)
  assert all(c["study"]["pair_seed"] == c["config"]["seed"] for c in compact)


def test_dpquant_worse_than_fp32_by_more_than_the_margin_does_not_hold(tmp_path):
  log = str(tmp_path / "study.jsonl")
  runs = _grid(ratios=[0.5], dp_policies=["fp32", "dpquant"], nodp_policies=[])
  effects = {"fp32": 0.0, "static": 0.0, "rotation": 0.0, "dpquant": -6.0}
  rs.run_study(runs, log, runner=_synthetic_runner(effects), verbose=False)
  [result] = sr.markdown_report(rs.load_log(log)).split("| DPQuant - fp32 DP")[1:]
  assert "**does not hold**" in result.splitlines()[0]


def test_fp32_dp_against_non_private_claim_only_when_asked(tmp_path):
  log = str(tmp_path / "study.jsonl")
  runs = _grid(ratios=[0.5], dp_policies=["fp32", "dpquant"], nodp_policies=["fp32"])
  effects = {"fp32": 0.0, "static": 0.0, "rotation": 0.0, "dpquant": -1.0}
  rs.run_study(runs, log, runner=_synthetic_runner(effects), verbose=False)
  records = rs.load_log(log)
  assert not any("non-private" in c["name"] for c in sr.build_claims(records))
  # DP costs 15 points here (the runner's non-DP bonus): within -20, not -10.
  for margin, verdict in ((-20, "**holds**"), (-10, "**does not hold**")):
    [row] = [l for l in sr.markdown_report(records, nodp_margin=margin).splitlines()
             if l.startswith("| fp32 DP - non-private (eps8)")]
    assert row.endswith(verdict + " |"), row


def test_failed_record_withholds_research_seed_values(tmp_path):
  log = str(tmp_path / "study.jsonl")

  def boom(config):
    raise RuntimeError("no")

  rs.run_study(_grid(seeds=[3])[:1], log, runner=boom, verbose=False, meta=sg.run_meta)
  rec = json.loads(open(log).readline())
  assert rec["status"] == "failed" and rec["study"]["pair_seed"] == 3
  assert rec["config"]["research_noise_seed"] == "set (withheld)"
  assert "1000003" not in open(log).read()


def test_compact_results_regenerate_the_same_claims(tmp_path):
  log = tmp_path / "study.jsonl"
  rs.run_study(_grid(seeds=range(3), ratios=[0.75], nodp_policies=[]), str(log),
               runner=_synthetic_runner(
                   {"fp32": 0.0, "static": -3.0, "rotation": -2.0, "dpquant": -1.0}),
               verbose=False, meta=sg.run_meta)
  compact = tmp_path / "compact.jsonl"
  compact.write_text("".join(l + "\n" for l in sr.compact_lines(rs.load_log(str(log)))))
  full = sr.markdown_report(rs.load_log(str(log)))
  again = sr.markdown_report(rs.load_log(str(compact)))
  assert again == full and "| 3/3 |" in again


@pytest.mark.slow
def test_study_report_binary(tmp_path):
  log = tmp_path / "study.jsonl"
  runs = _grid(seeds=range(3), ratios=[0.75], nodp_policies=[])
  rs.run_study(runs, str(log), runner=_synthetic_runner(
      {"fp32": 0.0, "static": -3.0, "rotation": -2.0, "dpquant": -1.0}), verbose=False)
  prefix = tmp_path / "docs" / "pilot"
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", "study_report.py"), f"--log={log}",
       f"--out_prefix={prefix}"], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "DPQuant - static (eps8 luq_fp4 r0.75)" in proc.stdout
  assert (tmp_path / "docs" / "pilot_compute.png").read_bytes()[:4] == b"\x89PNG"
  assert "pilot_compute.png" in (tmp_path / "docs" / "pilot_report.md").read_text()
  compact = (tmp_path / "docs" / "pilot_results.jsonl").read_text().splitlines()
  assert len(compact) == len(runs)
  # The compact file regenerates the same claim table.
  again = subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", "study_report.py"),
       f"--log={tmp_path / 'docs' / 'pilot_results.jsonl'}"],
      capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-2000:]
  claim_rows = lambda t: [l for l in t.splitlines() if l.startswith("| DPQuant")]  # noqa: E731
  assert claim_rows(again.stdout) == claim_rows(proc.stdout)


@pytest.mark.slow
def test_run_study_binary_small_resnet_dry_run():
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", "run_study.py"), "--dry_run",
       "--grid=small_resnet", "--seeds=5", "--ratios=0.75", "--formats=luq_fp4",
       "--nodp_policies="], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  ids = proc.stdout.split()
  # 5 seeds x (fp32, dpquant, rotation, 1 static subset).
  assert proc.stdout.strip().endswith("20 runs")
  assert "eps8-fp32-s4" in ids and "eps8-luq_fp4-r0.75-dpquant-s0" in ids


@pytest.mark.slow
def test_end_to_end_tiny_paired_study(tmp_path):
  """Two seeds, fp32 and DPQuant, one tiny epoch each, through train.py."""
  log = tmp_path / "study.jsonl"
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", "run_study.py"), f"--log={log}",
       "--grid=small_resnet", "--seeds=2", "--ratios=0.5", "--formats=luq_fp4",
       "--policies=fp32,dpquant", "--nodp_policies=", "--max_train=64",
       "--max_test=32", "--epochs=1", "--batch_size=32"],
      capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = rs.load_log(str(log))
  assert len(records) == 4
  assert all(r["research"]["noise_seeded"] and r["research"]["sampling_seeded"]
             for r in records)
  assert all(r["config"]["research_noise_seed"] == "set (withheld)" for r in records)
  # Same seed, same Poisson batches for both policies; other seed, other batches.
  digest = {(r["config"]["seed"], r["study"]["kind"]): r["research"]["sample_sha256"]
            for r in records}
  assert digest[(0, "fp32")] == digest[(0, "dpquant")]
  assert digest[(0, "fp32")] != digest[(1, "fp32")]
  report = subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", "run_study.py"), f"--log={log}",
       "--grid=small_resnet", "--report"], capture_output=True, text=True, timeout=600)
  assert report.returncode == 0, report.stderr[-3000:]
  assert "DPQuant - fp32 DP (eps8 luq_fp4 r0.5)" in report.stdout
  assert "| 2/2 |" in report.stdout  # both fp32 runs noted as seeded noise

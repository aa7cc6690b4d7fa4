"""Tests of tools/pareto_lib: loading results, the front, the PNG."""

import json

import pytest

from tools import pareto_lib as pl


def _run(policy, acc, speedup, ratio=0.75, dp=True, eps=8.0):
  return {"test_accuracy": acc, "theoretical_speedup": speedup,
          "config": {"policy": policy, "ratio": ratio, "dp": dp, "target_epsilon": eps}}


RUNS = [_run("none", 0.80, 1.0), _run("static", 0.70, 2.0), _run("static", 0.60, 2.1),
        _run("static", 0.65, 2.0), _run("rotation", 0.74, 2.0),
        _run("loss_aware", 0.76, 2.0), _run("none", 0.90, 1.0, dp=False),
        _run("static", 0.40, 3.0, ratio=0.9, eps=4.0)]


def test_pareto_front():
  pts = [(1.0, 80), (0.5, 70), (0.5, 76), (0.4, 60), (0.6, 75)]
  assert pl.pareto_front(pts) == [3, 2, 0]


def test_categories_and_summary():
  assert [pl.category(r) for r in RUNS[:6]] == [
      "fp32", "static", "static", "static", "rotation", "dpquant"]
  rows = {(r["category"], r["ratio"], r["dp"], r["target_epsilon"]): r
          for r in pl.summarize(RUNS)}
  static = rows[("static", 0.75, True, 8.0)]
  assert static["n"] == 3 and static["accuracy_mean"] == pytest.approx(0.65)
  assert static["accuracy_std"] == pytest.approx(0.05)
  assert rows[("fp32", None, False, 8.0)]["n"] == 1


def test_load_json_and_jsonl_and_plot(tmp_path):
  single = tmp_path / "one.json"
  single.write_text(json.dumps(RUNS[0], indent=2))
  lines = tmp_path / "study.jsonl"
  lines.write_text("\n".join(json.dumps(r) for r in RUNS[1:]) + "\n")
  results = pl.load_results([str(single), str(lines)])
  assert len(results) == len(RUNS)
  eps8 = pl.filter_results(results, target_epsilon=8.0)
  assert len(eps8) == len(RUNS) - 1
  out = pl.plot_pareto(eps8, str(tmp_path / "plots" / "p.png"), include_nondp=True)
  with open(out, "rb") as f:
    head = f.read(8)
  assert head == b"\x89PNG\r\n\x1a\n"
  assert (tmp_path / "plots" / "p.png").stat().st_size > 10_000


def test_plot_needs_dp_runs(tmp_path):
  with pytest.raises(ValueError, match="at least one"):
    pl.plot_pareto([_run("none", 0.9, 1.0, dp=False)], str(tmp_path / "x.png"))


def test_pareto_binary(tmp_path):
  import os  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  log = tmp_path / "study.jsonl"
  log.write_text("\n".join(json.dumps(r) for r in RUNS) + "\n")
  out = tmp_path / "pareto.png"
  proc = subprocess.run(
      [sys.executable, os.path.join(repo, "tools", "pareto.py"), f"--results={log}",
       f"--out={out}", "--target_epsilon=8"],
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert out.read_bytes()[:4] == b"\x89PNG"
  assert "static    ratio=0.75 dp=True eps=8.0 n=3 acc=65.00+-5.00" in proc.stdout

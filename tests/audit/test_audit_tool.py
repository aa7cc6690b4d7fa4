"""tools/audit_privacy.py: table and --json (small runs)."""

import json
import os
import subprocess
import sys

import pytest

from tools import audit_privacy_lib as lib

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def test_lib_runs_mechanism_audit_and_formats_table():
  report = lib.run(lib.AuditConfig(audit="mechanism", trials=20,
                                   gradient_bits=4, sensitivity_mode="bound"))
  res = report["result"]
  assert res["trials"] == 20 and not res["violated"]
  assert res["epsilon_lower_bound"] <= res["claimed_epsilon"]
  table = lib.format_table(report)
  assert "claimed epsilon (ledger)" in table and "trials per side" in table
  json.loads(lib.to_json(report))


@pytest.mark.slow
def test_binary_prints_json():
  out = subprocess.run(
      [sys.executable, "tools/audit_privacy.py", "--audit=mechanism",
       "--trials=10", "--noise_multiplier=2", "--json"], cwd=_ROOT,
      capture_output=True, text=True, timeout=600, check=True)
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report["config"]["noise_multiplier"] == 2.0
  assert report["result"]["trials"] == 10


def test_lib_one_run_gradient_canaries():
  report = lib.run(lib.AuditConfig(audit="one_run", canaries=40, epochs=2,
                                   noise_multiplier=4.0,
                                   canary_kind="gradient"))
  res = report["result"]
  assert res["canary_kind"] == "gradient" and not res["violated"]
  assert "canaries / guesses / correct" in lib.format_table(report)


@pytest.mark.slow
def test_binary_audits_the_train_py_configuration():
  out = subprocess.run(
      [sys.executable, "tools/audit_privacy.py", "--audit=one_run",
       "--train_config", "--canaries=50", "--epochs=1", "--max_train=400",
       "--max_test=100", "--json"], cwd=_ROOT, capture_output=True, text=True,
      timeout=900, check=True)
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report["config"]["model"] == "cnn"
  assert report["config"]["epochs"] == 1
  res = report["result"]
  assert res["canaries"] == 50 and res["canary_kind"] == "gradient"
  assert res["epsilon_lower_bound"] <= res["claimed_epsilon"]

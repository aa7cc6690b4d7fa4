"""examples/train.py under tf.distribute (end to end, small)."""

import os
import re
import subprocess
import sys

import pytest

from tests.distribute import _cluster

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
TRAIN = os.path.join(REPO_ROOT, "examples", "train.py")
SMALL = ["--epochs=1", "--max_train=512", "--max_test=200", "--verbose=0",
         "--batch_size=64"]


def _numbers(stdout):
  acc = re.findall(r"Test accuracy: ([0-9.]+)", stdout)
  eps = re.findall(r"Privacy: epsilon=([0-9.]+)", stdout)
  return float(acc[-1]), float(eps[-1])


@pytest.mark.slow
def test_train_example_mirrored_two_cpu_devices():
  out = subprocess.run(
      [sys.executable, TRAIN, "--strategy=mirrored", "--cpu_devices=2",
       "--policy=none"] + SMALL, cwd=REPO_ROOT, capture_output=True,
      text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  acc, eps = _numbers(out.stdout)
  assert 0.0 <= acc <= 1.0 and 7.0 < eps <= 8.0 + 1e-6


@pytest.mark.slow
def test_train_example_two_workers_agree():
  results = _cluster.run_local_cluster(
      [sys.executable, TRAIN, "--strategy=multiworker", "--policy=rotation",
       "--seed=0"] + SMALL, num_workers=2, timeout_s=500, cwd=REPO_ROOT)
  numbers = []
  for r in results:
    assert r.returncode == 0 and not r.timed_out, r.stderr[-3000:]
    numbers.append(_numbers(r.stdout))
  assert numbers[0] == numbers[1]  # same weights and ledger on both workers
  assert 7.0 < numbers[0][1] <= 8.0 + 1e-6


def test_train_example_refuses_cpu_devices_without_mirrored():
  out = subprocess.run(
      [sys.executable, TRAIN, "--cpu_devices=2", "--epochs=1"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode != 0
  assert "Expected cpu_devices=2 to be None unless kind is 'mirrored'" in (
      out.stderr)

"""examples/train.py --checkpoint_dir: a killed run, resumed, reports the
uninterrupted run's epsilon (issue 20 item 3); delta and bad input of the
privacy CLIs (item 8): one line, exit status 2."""

import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(REPO, "examples", "train.py")
TOOL = os.path.join(REPO, "tools", "compute_dpquant_privacy.py")
AUDIT = os.path.join(REPO, "tools", "audit_privacy.py")
TINY = ["--dataset=digits", "--max_train=64", "--max_test=16",
        "--batch_size=16", "--epochs=3", "--analysis_period=1", "--verbose=0",
        "--seed=0", "--target_epsilon=8"]

# Runs train_lib.train with a callback that raises after epoch `kill_after`
# (listed last: BackupAndRestore has already written that epoch's backup):
# the process dies as a killed run would.
_KILLED = r"""
import sys
sys.path.insert(0, {repo!r})
import dpquant_tf  # noqa: F401
import tensorflow as tf
from examples import train_lib

class Kill(tf.keras.callbacks.Callback):
  def on_epoch_end(self, epoch, logs=None):
    if epoch == {kill_after}:
      raise SystemExit(17)

_orig = train_lib._callbacks
def _patched(*args, **kwargs):
  callbacks, scheduler = _orig(*args, **kwargs)
  return callbacks + [Kill()], scheduler
train_lib._callbacks = _patched
train_lib.train(train_lib.TrainConfig(
    dataset="digits", max_train=64, max_test=16, batch_size=16, epochs=3,
    analysis_period=1, verbose=0, seed=0, target_epsilon=8.0,
    checkpoint_dir={ckpt!r}))
"""


def _run(args, timeout=600):
  return subprocess.run(args, cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, check=False,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


def _user_lines(stderr):
  """stderr without TensorFlow's own log lines."""
  return [l for l in stderr.splitlines()
          if l.strip() and not re.match(r"[IWEF]\d{4} ", l)
          and "absl::" not in l and "rebuild TensorFlow" not in l]


@pytest.mark.slow
def test_killed_run_resumed_reports_the_uninterrupted_epsilon(tmp_path):
  ckpt = str(tmp_path / "ckpt")
  killed = _run([sys.executable, "-c",
                 _KILLED.format(repo=REPO, kill_after=1, ckpt=ckpt)])
  assert killed.returncode == 17, killed.stderr[-3000:]
  resumed_json = str(tmp_path / "resumed.json")
  resumed = _run([sys.executable, TRAIN] + TINY +
                 [f"--checkpoint_dir={ckpt}", f"--metrics_json={resumed_json}"])
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  full_json = str(tmp_path / "full.json")
  full = _run([sys.executable, TRAIN] + TINY + [f"--metrics_json={full_json}"])
  assert full.returncode == 0, full.stderr[-3000:]
  with open(resumed_json) as f:
    eps_resumed = json.load(f)["epsilon"]
  with open(full_json) as f:
    eps_full = json.load(f)["epsilon"]
  assert abs(eps_resumed - eps_full) <= 1e-9, (eps_resumed, eps_full)
  # Before the fix the flag did not exist; a resume that lost the killed
  # run's releases or steps would report less.
  assert eps_full > 0


@pytest.mark.slow
def test_train_refuses_delta_at_or_above_one_over_n():
  proc = _run([sys.executable, TRAIN] + TINY + ["--delta=0.9"])
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  lines = _user_lines(proc.stderr)
  assert len(lines) == 1, lines
  assert lines[0].startswith("train.py: flag --delta: Expected delta=0.9 "
                             "to be < 1/dataset_size"), lines


@pytest.mark.slow
def test_train_bad_flag_is_one_line():
  proc = _run([sys.executable, TRAIN, "--epochs=abc"])
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = _user_lines(proc.stderr)
  assert len(lines) == 1 and "--epochs" in lines[0], lines


@pytest.mark.slow  # a subprocess importing TensorFlow: ~30 s here
@pytest.mark.parametrize("args,expected", [
    (["--dataset_size=1000", "--batch_size=50", "--epochs=3",
      "--noise_multiplier=1", "--delta=0.5"], "Expected delta=0.5 to be < 1/"),
    (["--dataset_size=1000", "--batch_size=50", "--epochs=abc",
      "--noise_multiplier=1"], "--epochs"),
    (["--dataset_size=-5", "--batch_size=50", "--epochs=3",
      "--noise_multiplier=1"], "Expected dataset_size=-5"),
])
def test_privacy_tool_bad_input_is_one_line_exit_2(args, expected):
  proc = _run([sys.executable, TOOL] + args, timeout=120)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and proc.stdout == ""
  lines = _user_lines(proc.stderr)
  assert len(lines) == 1 and expected in lines[0], lines


@pytest.mark.slow
def test_audit_tool_bad_input_is_one_line_exit_2():
  for args in (["--trials=abc"], ["--audit=mechanism", "--delta=2"]):
    proc = _run([sys.executable, AUDIT] + args, timeout=120)
    assert proc.returncode == 2, (args, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    assert len(_user_lines(proc.stderr)) == 1, _user_lines(proc.stderr)

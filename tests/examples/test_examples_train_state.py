"""examples/train.py: the DP log line names the optimizer used; a run killed
with SIGKILL (or stopped at fewer epochs) and resumed from --checkpoint_dir
reports the uninterrupted run's epsilon to 1e-9 (issue 20 item 3)."""

import json
import os
import subprocess
import sys

import pytest

from examples import train_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(REPO, "examples", "train.py")
TINY = ["--dataset=digits", "--max_train=64", "--max_test=16",
        "--batch_size=16", "--analysis_period=1", "--verbose=0", "--seed=0"]

# train_lib.train with a callback that SIGKILLs the process after epoch
# `kill_after` (listed last: BackupAndRestore has written that epoch's
# backup; nothing else runs: no atexit, no flush).
_SIGKILLED = r"""
import os, signal, sys
sys.path.insert(0, {repo!r})
import dpquant_tf  # noqa: F401
import tensorflow as tf
from examples import train_lib

class Kill(tf.keras.callbacks.Callback):
  def on_epoch_end(self, epoch, logs=None):
    if epoch == {kill_after}:
      os.kill(os.getpid(), signal.SIGKILL)

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


def _run(args, timeout=900):
  return subprocess.run(args, cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, check=False,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


def _epsilon(path):
  with open(path) as f:
    return json.load(f)["epsilon"]


@pytest.mark.slow   # a real train_lib run: ~15 s alone, minutes under load
def test_dp_log_line_names_the_optimizer_used(capsys):
  result = train_lib.train(train_lib.TrainConfig(
      policy="none", optimizer="adam", target_epsilon=8.0, dataset="digits",
      max_train=64, max_test=16, batch_size=16, epochs=1, verbose=0))
  out = capsys.readouterr().out
  assert "DP-Adam: noise_multiplier=" in out
  assert "DP-SGD" not in out
  assert result.metrics["privacy_statement"].startswith("DP-Adam (dpquant_tf)")


@pytest.mark.slow
def test_sigkilled_run_resumed_reports_the_uninterrupted_epsilon(tmp_path):
  ckpt = str(tmp_path / "ckpt")
  killed = _run([sys.executable, "-c",
                 _SIGKILLED.format(repo=REPO, kill_after=1, ckpt=ckpt)])
  assert killed.returncode == -9, killed.stderr[-3000:]
  assert os.path.exists(train_lib.journal_path(ckpt))
  flags = TINY + ["--epochs=3", "--target_epsilon=8"]
  resumed = _run([sys.executable, TRAIN] + flags + [
      f"--checkpoint_dir={ckpt}", f"--metrics_json={tmp_path / 'r.json'}"])
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  full = _run([sys.executable, TRAIN] + flags +
              [f"--metrics_json={tmp_path / 'f.json'}"])
  assert full.returncode == 0, full.stderr[-3000:]
  eps_resumed = _epsilon(tmp_path / "r.json")
  eps_full = _epsilon(tmp_path / "f.json")
  assert eps_full > 0 and abs(eps_resumed - eps_full) <= 1e-9, (
      eps_resumed, eps_full)


@pytest.mark.slow
def test_fewer_epochs_then_resumed_with_more_reports_the_full_epsilon(
    tmp_path):
  # A fixed noise multiplier: the calibration would differ with --epochs.
  flags = TINY + ["--noise_multiplier=1.5"]
  ckpt = str(tmp_path / "ckpt")
  first = _run([sys.executable, TRAIN] + flags + [
      "--epochs=1", f"--checkpoint_dir={ckpt}",
      f"--metrics_json={tmp_path / 'one.json'}"])
  assert first.returncode == 0, first.stderr[-3000:]
  more = _run([sys.executable, TRAIN] + flags + [
      "--epochs=3", f"--checkpoint_dir={ckpt}",
      f"--metrics_json={tmp_path / 'r.json'}"])
  assert more.returncode == 0, more.stderr[-3000:]
  full = _run([sys.executable, TRAIN] + flags + [
      "--epochs=3", f"--metrics_json={tmp_path / 'f.json'}"])
  assert full.returncode == 0, full.stderr[-3000:]
  assert _epsilon(tmp_path / "one.json") < _epsilon(tmp_path / "f.json")
  assert abs(_epsilon(tmp_path / "r.json") -
             _epsilon(tmp_path / "f.json")) <= 1e-9

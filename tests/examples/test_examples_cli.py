"""What a user of examples/train.py meets: offline tfds, bad flags, research seeds.

Issue 14: a tfds set that is not on this machine fails at once with what to
do (it used to retry the network for minutes); a bad flag value is one line
naming the flag, the value and what was expected (it used to be a traceback);
research seeds give paired runs the same Poisson batches, and without them two
processes differ.
"""

import hashlib
import json
import os
import re
import subprocess
import sys
import time

import pytest

from examples import train_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(REPO, "examples", "train.py")
SMALL = dict(max_train=64, max_test=16, batch_size=16, epochs=1, verbose=0,
             seed=0)
SMALL_FLAGS = [f"--{k}={v}" for k, v in SMALL.items()]


def _run(args, *, env=None, timeout=240):
  start = time.monotonic()
  proc = subprocess.run([sys.executable, TRAIN] + list(args), cwd=REPO,
                        env=dict(os.environ, **(env or {})),
                        capture_output=True, text=True, timeout=timeout,
                        check=False)
  return proc, time.monotonic() - start


def _user_lines(stderr):
  """stderr without TensorFlow's and tfds' own log lines."""
  return [l for l in stderr.splitlines()
          if l.strip() and not re.match(r"[IWEF]\d{4} ", l)
          and "absl::" not in l and "rebuild TensorFlow" not in l]


def test_tfds_set_not_on_this_machine_fails_at_once(tmp_path):
  # An empty tfds data dir: before the fix tfds.load tried to download and
  # retried the network for minutes (the subprocess timeout would fire).
  proc, seconds = _run(["--dataset=tfds:mnist"] + SMALL_FLAGS,
                       env={"TFDS_DATA_DIR": str(tmp_path)}, timeout=150)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert seconds < 120, seconds
  assert "Traceback" not in proc.stderr
  line = _user_lines(proc.stderr)[-1]
  assert line.startswith("train.py: flag --dataset: Expected "
                         "dataset='tfds:mnist' to be prepared"), line
  assert f"tfds looked in {tmp_path}" in line
  for hint in ("--data_dir", "--tfds_download", "npz:"):
    assert hint in line, (hint, line)


@pytest.mark.parametrize("flag, expected", [
    ("--epochs=0", "train.py: flag --epochs: Expected epochs=0 to be an "
                   "integer in [1, inf]."),
    ("--ratio=1.5", "train.py: flag --ratio: Expected ratio=1.5 to be in "
                    "[0, 1]."),
])
def test_bad_flag_value_is_one_line_and_nonzero_exit(flag, expected):
  proc, _ = _run([flag, "--epochs=1"] if flag != "--epochs=0" else [flag])
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  assert _user_lines(proc.stderr) == [expected]


def test_research_seed_flags_reach_the_config():
  from absl import flags as absl_flags  # pylint: disable=import-outside-toplevel
  from examples import train as train_bin  # pylint: disable=import-outside-toplevel
  fv = absl_flags.FLAGS
  fv(["train.py", "--research_noise_seed=5", "--research_sampling_seed=6",
      "--policy=static", "--static_layers=conv1,dense1"])
  try:
    cfg = train_bin.config_from_flags()
  finally:
    fv.unparse_flags()
  assert cfg.research_noise_seed == 5 and cfg.research_sampling_seed == 6
  assert cfg.static_layers == ("conv1", "dense1")


def _train(**kwargs):
  return train_lib.train(train_lib.TrainConfig(**SMALL, **kwargs)).metrics


SEEDS = dict(research_noise_seed=11, research_sampling_seed=22)


@pytest.mark.slow  # two trainings (about 55 s on 2 cores); make test-all
def test_paired_runs_share_poisson_batches(capsys):
  fp32 = _train(policy="none", **SEEDS)
  quantized = _train(policy="static", ratio=0.5, **SEEDS)
  err = capsys.readouterr().err
  assert "WARNING: research_noise_seed is set" in err
  assert "WARNING: research_sampling_seed is set" in err
  # Same sampler seed, different policies: the same batches were consumed
  # (and some were: not the digest of an empty sequence).
  digest = fp32["research"]["sample_sha256"]
  assert digest not in (None, hashlib.sha256(b"").hexdigest())
  assert quantized["research"]["sample_sha256"] == digest
  assert fp32["research"]["noise_seeded"] and fp32["research"]["sampling_seeded"]
  assert fp32["config"]["research_noise_seed"] == "set (withheld)"
  assert "were seeded" in fp32["privacy_statement"]


@pytest.mark.slow  # two more trainings
def test_same_research_seeds_same_weights_other_seed_other_batches():
  first = _train(policy="none", **SEEDS)
  again = _train(policy="none", **SEEDS)
  assert again["weights_sha256"] == first["weights_sha256"]
  other = _train(policy="none", research_noise_seed=11,
                 research_sampling_seed=23)
  assert other["research"]["sample_sha256"] != first["research"][
      "sample_sha256"]


@pytest.mark.slow  # two training processes (about 1 minute on 2 idle cores)
def test_without_research_seeds_two_processes_differ(tmp_path):
  outs = []
  for i in range(2):
    path = tmp_path / f"m{i}.json"
    proc, _ = _run(["--policy=none", f"--metrics_json={path}"] + SMALL_FLAGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "research_" not in proc.stderr  # no warning when unseeded
    outs.append(json.loads(path.read_text()))
  for m in outs:
    assert m["research"] == {"noise_seeded": False, "sampling_seeded": False,
                             "estimator_seeded": False, "sample_sha256": None}
    assert "were seeded" not in m["privacy_statement"]
  # Same --seed (initialisation), different noise and samples.
  assert outs[0]["weights_sha256"] != outs[1]["weights_sha256"]

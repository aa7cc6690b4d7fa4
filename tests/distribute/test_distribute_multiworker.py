"""Two worker processes on 127.0.0.1 with MultiWorkerMirroredStrategy."""

import json
import math
import os
import sys

import numpy as np
import pytest

from tests.distribute import _cluster
from tests.distribute import _factories
from tests.distribute import _helpers

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
TIMEOUT_S = 150.0


def _run_cluster(kind):
  results = _cluster.run_local_cluster(
      [sys.executable, "-m", "tests.distribute._multiworker_worker", kind],
      num_workers=2, timeout_s=TIMEOUT_S, cwd=REPO_ROOT,
      env={"PYTHONPATH": REPO_ROOT})
  parsed = []
  for r in results:
    assert not r.timed_out and r.returncode == 0, (
        f"worker {r.index} rc={r.returncode} timed_out={r.timed_out}\n"
        f"{r.stderr[-3000:]}")
    lines = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
    assert len(lines) == 1, r.stdout[-2000:]
    parsed.append(json.loads(lines[0][len("RESULT "):]))
  return sorted(parsed, key=lambda p: p["task"])


@pytest.mark.slow
def test_two_workers_match_single_process_and_noise_is_sigma_clip():
  kinds = ("prototype", "dpquant", "dpquant_adam")
  w0, w1 = _run_cluster(",".join(kinds))
  assert w0["replicas"] == w1["replicas"] == 2
  x, y = _helpers.data(n=8)
  for kind in kinds:
    r0, r1 = w0["kinds"][kind], w1["kinds"][kind]
    # Mirrored variables stay identical on both workers, noise included.
    for a, b in zip(r0["deltas"], r1["deltas"]):
      np.testing.assert_array_equal(np.array(a), np.array(b))
    assert r0.get("noise_first") == r1.get("noise_first")
    # Noise-free: the same as one process on the same global batches.
    extra = {} if kind == "prototype" else {"dataset_size": 80}
    made = []

    def make(kind=kind, extra=extra, made=made):
      made.append(_factories.optimizer(kind, noise_multiplier=0.0, **extra)())
      return made[-1]

    single = _helpers.one_step_update(_helpers.mirrored(1), make, x, y,
                                      units=3, steps=2)
    for s, m in zip(single, r0["deltas"]):
      np.testing.assert_allclose(np.array(m), s, rtol=1e-5, atol=1e-6)
    if kind != "prototype":
      # Arrays, not the library's sampler: nothing proves Poisson sampling,
      # so each step is accounted at q = 1 (no amplification), one event
      # per step, the same on every worker.
      assert r0["events"] == r1["events"] == [[1.0, 0.0, 2]], r0["events"]
    if "noise_std" in r0:
      # Total noise std sigma*C (not sqrt(2) sigma*C, not sigma*C/sqrt(2)).
      target = _factories.SIGMA * _factories.CLIP
      se = 1 / math.sqrt(2 * r0["noise_size"])
      ratio = r0["noise_std"] / target
      assert abs(ratio - 1) < 5 * se, (kind, ratio)
      assert abs(ratio - math.sqrt(2)) > 10 * se
      assert abs(ratio - 1 / math.sqrt(2)) > 10 * se
  # Poisson input over disjoint per-worker shards (DatasetCreator).
  p0, p1 = w0["poisson"], w1["poisson"]
  for a, b in zip(p0["weights"], p1["weights"]):
    np.testing.assert_array_equal(np.array(a), np.array(b))
  assert p0["events"] == p1["events"] == [[0.125, 1.0, 2]], p0["events"]


def test_local_tf_config_and_free_ports():
  ports = _cluster.free_ports(3)
  assert len(set(ports)) == 3
  config = json.loads(_cluster.local_tf_config(ports, 2))
  assert config["task"] == {"type": "worker", "index": 2}
  assert config["cluster"]["worker"][1] == f"127.0.0.1:{ports[1]}"
  with pytest.raises(ValueError, match="Expected index=3"):
    _cluster.local_tf_config(ports, 3)


def test_cluster_worker_watchdog_stops_a_stuck_worker():
  results = _cluster.run_local_cluster(
      [sys.executable, "-c",
       "from tests.distribute import _cluster; import time; "
       "_cluster.install_watchdog(); time.sleep(60)"],
      num_workers=1, timeout_s=8.0, cwd=REPO_ROOT)
  assert results[0].timed_out
  assert results[0].returncode in (124, -9)

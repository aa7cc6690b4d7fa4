"""A local multi-worker cluster on 127.0.0.1, for the tests (not in the library).

`run_local_cluster` starts `num_workers` Python processes, each with its own
`TF_CONFIG` naming the same loopback cluster (ports chosen free at run time),
waits for them under one deadline, and kills only the processes it started
that overrun it. Each worker also bounds itself: `install_watchdog` (called by
the worker) ends the process with exit status 124 after
`DPQUANT_WORKER_TIMEOUT_S` seconds, so a worker stuck in a collective op after
its peer died stops by itself.
"""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence

from dpquant_tf import _validation

__all__ = [
    "WorkerResult",
    "free_ports",
    "install_watchdog",
    "local_tf_config",
    "run_local_cluster",
]

WATCHDOG_ENV = "DPQUANT_WORKER_TIMEOUT_S"
TIMEOUT_EXIT_CODE = 124


@dataclasses.dataclass(frozen=True)
class WorkerResult:
  """What one worker process left behind."""
  index: int
  returncode: Optional[int]
  stdout: str
  stderr: str
  timed_out: bool


def free_ports(count: int) -> List[int]:
  """Returns `count` distinct TCP ports that were free on 127.0.0.1 just now."""
  count = _validation.check_int("count", count, low=1)
  socks = []
  try:
    for _ in range(count):
      s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
      s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      s.bind(("127.0.0.1", 0))
      socks.append(s)
    return [s.getsockname()[1] for s in socks]
  finally:
    for s in socks:
      s.close()


def local_tf_config(ports: Sequence[int], index: int) -> str:
  """Returns the `TF_CONFIG` JSON of worker `index` in a loopback cluster."""
  ports = list(ports)
  _validation.check_int("index", index, low=0, high=len(ports) - 1)
  return json.dumps({
      "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
      "task": {"type": "worker", "index": index},
  })


def install_watchdog(timeout_s: Optional[float] = None) -> Optional[float]:
  """Ends this process with status 124 after `timeout_s` seconds.

  Args:
    timeout_s: seconds; None reads `DPQUANT_WORKER_TIMEOUT_S` (unset: no
      watchdog).

  Returns:
    The timeout installed, or None.
  """
  if timeout_s is None:
    raw = os.environ.get(WATCHDOG_ENV)
    if not raw:
      return None
    timeout_s = float(raw)
  timeout_s = _validation.check_positive("timeout_s", timeout_s)

  def _expire():
    sys.stderr.write(f"worker watchdog: {timeout_s:.0f} s elapsed, exiting\n")
    sys.stderr.flush()
    os._exit(TIMEOUT_EXIT_CODE)  # pylint: disable=protected-access

  timer = threading.Timer(timeout_s, _expire)
  timer.daemon = True
  timer.start()
  return timeout_s


def run_local_cluster(argv: Sequence[str], *, num_workers: int = 2,
                      timeout_s: float = 120.0,
                      env: Optional[Dict[str, str]] = None,
                      cwd: Optional[str] = None) -> List[WorkerResult]:
  """Runs `argv` as `num_workers` processes forming one loopback cluster.

  Args:
    argv: the worker command, e.g. `[sys.executable, "-m", "pkg.worker"]`.
    num_workers: number of worker processes (>= 1).
    timeout_s: deadline for all workers together; each worker also gets it
      (minus a margin) as its self-termination watchdog.
    env: extra environment variables for every worker.
    cwd: working directory of the workers.

  Returns:
    One `WorkerResult` per worker, by index.
  """
  num_workers = _validation.check_int("num_workers", num_workers, low=1)
  timeout_s = _validation.check_positive("timeout_s", timeout_s)
  ports = free_ports(num_workers)
  procs = []
  for i in range(num_workers):
    worker_env = dict(os.environ)
    worker_env.update(env or {})
    worker_env["TF_CONFIG"] = local_tf_config(ports, i)
    worker_env[WATCHDOG_ENV] = str(max(1.0, timeout_s - 5.0))
    worker_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    procs.append(subprocess.Popen(
        list(argv), env=worker_env, cwd=cwd, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True))
  deadline = time.monotonic() + timeout_s
  results = []
  for i, proc in enumerate(procs):
    timed_out = False
    try:
      out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      timed_out = True
      proc.kill()
      out, err = proc.communicate()
    results.append(WorkerResult(index=i, returncode=proc.returncode,
                                stdout=out, stderr=err,
                                timed_out=timed_out or
                                proc.returncode == TIMEOUT_EXIT_CODE))
  return results

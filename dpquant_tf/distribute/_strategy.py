"""Building `tf.distribute` strategies for dpquant_tf, also without GPUs.

`make_strategy` returns the strategy a training script asks for:

* `StrategyKind.DEFAULT`: the default (no-op) strategy, one device.
* `StrategyKind.MIRRORED`: `tf.distribute.MirroredStrategy` over all local
  GPUs, or over `cpu_devices` logical CPU devices (so it runs on a laptop or
  in CI).
* `StrategyKind.MULTI_WORKER`: `tf.distribute.MultiWorkerMirroredStrategy`;
  the cluster comes from the `TF_CONFIG` environment variable.

Logical CPU devices must be configured before TensorFlow initializes its
runtime (before the first op runs); `configure_cpu_devices` says so clearly
when it is too late.
"""

import enum
import json
import os
from typing import Optional

import tensorflow as tf

from dpquant_tf import _validation
from dpquant_tf._tf_utils import local_variable  # re-exported

__all__ = [
    "StrategyKind",
    "check_scheduler",
    "configure_cpu_devices",
    "is_multi_worker",
    "local_variable",
    "make_strategy",
]


class StrategyKind(enum.Enum):
  """Which `tf.distribute` strategy to train under."""
  DEFAULT = "default"
  MIRRORED = "mirrored"
  MULTI_WORKER = "multiworker"


def configure_cpu_devices(num_devices: int) -> int:
  """Splits the first physical CPU into at least `num_devices` logical devices.

  Idempotent: when the runtime already has at least `num_devices` logical CPU
  devices, nothing changes.

  Args:
    num_devices: how many logical CPU devices are needed (>= 1).

  Returns:
    The number of logical CPU devices now available.

  Raises:
    ValueError: `num_devices` is not a positive integer.
    RuntimeError: TensorFlow's runtime was initialized with fewer devices.
  """
  num_devices = _validation.check_int("num_devices", num_devices, low=1)
  cpu = tf.config.list_physical_devices("CPU")[0]
  current = tf.config.get_logical_device_configuration(cpu)
  if current is not None and len(current) >= num_devices:
    return len(current)
  try:
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * num_devices)
  except RuntimeError as e:
    have = len(tf.config.list_logical_devices("CPU"))
    if have >= num_devices:
      return have
    raise RuntimeError(
        f"Cannot create {num_devices} logical CPU devices: TensorFlow's "
        f"runtime is already initialized with {have}. Call "
        "configure_cpu_devices (or make_strategy(..., cpu_devices=N)) at the "
        "start of the program, before any TensorFlow op runs.") from e
  return len(tf.config.list_logical_devices("CPU"))


def make_strategy(kind=StrategyKind.DEFAULT, *,
                  cpu_devices: Optional[int] = None,
                  cross_device_ops=None) -> tf.distribute.Strategy:
  """Returns the `tf.distribute.Strategy` for `kind`.

  Create the optimizer, the model and compile it inside
  `with strategy.scope():` so that the optimizer's noise generator is
  mirrored (see `dpquant_tf.distribute.check_generator_strategy`).

  Args:
    kind: a `StrategyKind` or its name ("default", "mirrored", "multiworker").
    cpu_devices: MIRRORED only: use this many logical CPU devices instead of
      the GPUs (None: all GPUs, or the single CPU when there is none).
    cross_device_ops: MIRRORED only: a `tf.distribute.CrossDeviceOps`
      (None: TensorFlow's choice, NCCL on GPUs, collectives on CPUs).

  Returns:
    The strategy.

  Raises:
    ValueError: bad arguments, or MULTI_WORKER without a valid `TF_CONFIG`.
  """
  kind = _validation.check_enum("kind", kind, StrategyKind)
  if kind is not StrategyKind.MIRRORED:
    if cpu_devices is not None:
      _validation.fail("cpu_devices", cpu_devices,
                       "None unless kind is 'mirrored'")
    if cross_device_ops is not None:
      _validation.fail("cross_device_ops", cross_device_ops,
                       "None unless kind is 'mirrored'")
  if kind is StrategyKind.DEFAULT:
    return tf.distribute.get_strategy()
  if kind is StrategyKind.MIRRORED:
    devices = None
    if cpu_devices is not None:
      n = _validation.check_int("cpu_devices", cpu_devices, low=1)
      configure_cpu_devices(n)
      devices = [f"/cpu:{i}" for i in range(n)]
    return tf.distribute.MirroredStrategy(
        devices=devices, cross_device_ops=cross_device_ops)
  # MULTI_WORKER
  raw = os.environ.get("TF_CONFIG")
  try:
    config = json.loads(raw) if raw else None
  except ValueError:
    config = None
  if not (isinstance(config, dict) and "cluster" in config and
          "task" in config):
    _validation.fail(
        "TF_CONFIG", raw,
        'a JSON object with "cluster" and "task" (see docs/DISTRIBUTED.md) '
        "for kind='multiworker'")
  return tf.distribute.MultiWorkerMirroredStrategy()


def is_multi_worker(strategy: Optional[tf.distribute.Strategy] = None) -> bool:
  """Whether `strategy` (default: the current one) spans several workers."""
  strategy = strategy or tf.distribute.get_strategy()
  in_mw = getattr(strategy.extended, "_in_multi_worker_mode", None)
  return bool(in_mw()) if callable(in_mw) else False


def check_scheduler(scheduler, strategy: Optional[tf.distribute.Strategy] = None
                    ) -> None:
  """Raises if a `DPQuantScheduler` would break privacy across workers.

  Under a multi-worker strategy every worker runs its own copy of the
  callback. (1) Its policy must decide the same plan on every worker: give
  the scheduler the same `seed` everywhere (schedule randomness is public).
  (2) A `LossSensitivityEstimator` would run on every worker, releasing W
  noisy analyses while each worker's ledger records one: not allowed (use
  a policy that spends no privacy, or MirroredStrategy on one machine).

  Args:
    scheduler: a `dpquant_tf.schedule.DPQuantScheduler`.
    strategy: default: the current strategy.

  Raises:
    ValueError: multi-worker and (no seed or an estimator).
  """
  if not is_multi_worker(strategy):
    return
  if getattr(scheduler, "estimator", None) is not None:
    _validation.fail(
        "scheduler.estimator", type(scheduler.estimator).__name__,
        "None under MultiWorkerMirroredStrategy: every worker would release "
        "its own analysis while each ledger accounts one")
  if getattr(scheduler, "seed", None) is None:
    _validation.fail(
        "scheduler.seed", None,
        "an integer, the same on every worker, under "
        "MultiWorkerMirroredStrategy (workers must apply the same plan)")

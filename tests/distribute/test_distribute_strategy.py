"""Strategy construction and the multi-worker schedule check."""

import types

import pytest
import tensorflow as tf

from dpquant_tf import distribute
from dpquant_tf import schedule
from tests.distribute import conftest


def test_make_strategy_kinds_and_messages(monkeypatch):
  assert distribute.make_strategy("default") is tf.distribute.get_strategy()
  assert conftest.AVAILABLE_CPU_DEVICES >= 2
  mirrored = distribute.make_strategy(
      "mirrored", cpu_devices=2,
      cross_device_ops=tf.distribute.ReductionToOneDevice())
  assert mirrored.num_replicas_in_sync == 2
  assert not distribute.is_multi_worker(mirrored)
  with pytest.raises(ValueError, match="Expected kind='ring'"):
    distribute.make_strategy("ring")
  with pytest.raises(ValueError, match="Expected cpu_devices=2 to be None"):
    distribute.make_strategy("default", cpu_devices=2)
  monkeypatch.delenv("TF_CONFIG", raising=False)
  with pytest.raises(ValueError, match="Expected TF_CONFIG=None"):
    distribute.make_strategy("multiworker")
  monkeypatch.setenv("TF_CONFIG", "{not json")
  with pytest.raises(ValueError, match="TF_CONFIG"):
    distribute.make_strategy(distribute.StrategyKind.MULTI_WORKER)


def test_configure_cpu_devices_is_idempotent_and_says_when_too_late():
  have = conftest.AVAILABLE_CPU_DEVICES
  assert distribute.configure_cpu_devices(2) == have
  with pytest.raises(RuntimeError, match="already initialized"):
    distribute.configure_cpu_devices(have + 4)
  with pytest.raises(ValueError, match="Expected num_devices=0"):
    distribute.configure_cpu_devices(0)


def _scheduler_cls():
  cls = getattr(schedule, "DPQuantScheduler", None)
  if cls is None:
    from dpquant_tf.schedule import _scheduler  # pylint: disable=g-import-not-at-top
    cls = _scheduler.DPQuantScheduler
  return cls


def test_check_scheduler_under_multi_worker():
  # A strategy-shaped stand-in: only `extended._in_multi_worker_mode` is read.
  multi = types.SimpleNamespace(extended=types.SimpleNamespace(
      _in_multi_worker_mode=lambda: True))
  ramp = schedule.BitRampPolicy(b_start=2, b_end=8, epochs=3)
  seeded = _scheduler_cls()(ramp, seed=3)
  distribute.check_scheduler(seeded, multi)
  with pytest.raises(ValueError, match="Expected scheduler.seed=None"):
    distribute.check_scheduler(_scheduler_cls()(ramp), multi)
  estimating = types.SimpleNamespace(estimator=object(), seed=3)
  with pytest.raises(ValueError, match="scheduler.estimator"):
    distribute.check_scheduler(estimating, multi)
  distribute.check_scheduler(_scheduler_cls()(ramp))  # one worker: no-op

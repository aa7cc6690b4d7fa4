"""DP step time per example: R local MirroredStrategy replicas vs one device.

Logic of tools/benchmark_replicas.py. For each replica count R, builds the
same model (tapped with ``perexample.tap_model``, optionally quantized first)
under a ``MirroredStrategy`` over R logical devices (R = 1: no strategy),
trains it with ``DPQuantOptimizer`` on synthetic data at the same global
batch, and reports the seconds per example of a timed ``fit`` after a warm-up
``fit`` (tracing excluded), the ratio to R = 1 measured in the same run, and
whether any layer took the jacobian fallback (a log line of
``dpquant_tf.perexample``). Logical CPU devices share the cores: the ratio
measures the overhead of running R replicas, not a speed-up.
"""

import dataclasses
import json
import time
from typing import Dict, List, Sequence

import numpy as np

from dpquant_tf import _validation

__all__ = ["Settings", "check_target", "markdown", "run", "to_json"]


@dataclasses.dataclass(frozen=True)
class Settings:
  """What to measure."""
  model: str = "cnn"
  input_shape: Sequence[int] = (28, 28, 1)
  num_classes: int = 10
  global_batch: int = 64
  steps: int = 10
  warmup_steps: int = 2
  replicas: Sequence[int] = (1, 2)
  quantize: bool = False
  plain_baseline: bool = False   # also plain SGD: the strategy's own overhead
  seed: int = 0


def _check(s: Settings):
  _validation.check_int("global_batch", s.global_batch, low=1)
  _validation.check_int("steps", s.steps, low=1)
  _validation.check_int("warmup_steps", s.warmup_steps, low=1)
  for r in s.replicas:
    _validation.check_int("replicas", r, low=1)
    if s.global_batch % r:
      _validation.fail("global_batch", s.global_batch,
                       f"a multiple of every replica count ({r})")


def _strategy(r):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if r == 1:
    return tf.distribute.get_strategy()
  return tf.distribute.MirroredStrategy(
      [f"/cpu:{i}" for i in range(r)],
      cross_device_ops=tf.distribute.ReductionToOneDevice())


def _model(s: Settings):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from dpquant_tf import models  # pylint: disable=g-import-not-at-top
  from dpquant_tf import perexample  # pylint: disable=g-import-not-at-top
  from dpquant_tf import quantization  # pylint: disable=g-import-not-at-top
  tf.keras.utils.set_random_seed(s.seed)
  model = models.build_model(s.model, tuple(s.input_shape), s.num_classes)
  if s.quantize:
    model = quantization.quantize_model(model)
  return perexample.tap_model(model)


def _measure(s: Settings, r: int, x, y, dp: bool) -> Dict[str, object]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from dpquant_tf import optimizers  # pylint: disable=g-import-not-at-top
  strategy = _strategy(r)
  with strategy.scope():
    model = _model(s)
    if dp:
      optimizer = optimizers.DPQuantOptimizer(
          l2_norm_clip=1.0, noise_multiplier=1.0, learning_rate=0.05,
          seed=s.seed)
      reduction = tf.keras.losses.Reduction.NONE
    else:
      optimizer = tf.keras.optimizers.legacy.SGD(learning_rate=0.05)
      reduction = tf.keras.losses.Reduction.AUTO
    model.compile(optimizer=optimizer,
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True, reduction=reduction))
  if hasattr(model.optimizer, "dp_step"):  # DPQuant: the owned train step
    from dpquant_tf import training  # pylint: disable=g-import-not-at-top
    training.install_dp_train_step(model)
  from dpquant_tf import perexample  # pylint: disable=g-import-not-at-top
  with perexample.FallbackWatch() as watch:
    n_warm = s.warmup_steps * s.global_batch
    model.fit(x[:n_warm], y[:n_warm], batch_size=s.global_batch, epochs=1,
              shuffle=False, verbose=0)
    start = time.perf_counter()
    model.fit(x, y, batch_size=s.global_batch, epochs=1, shuffle=False,
              verbose=0)
    seconds = time.perf_counter() - start
  return {"optimizer": "dp" if dp else "plain", "replicas": r,
          "seconds": seconds,
          "seconds_per_example": seconds / len(x),
          "fallback": watch.messages}


def run(s: Settings) -> Dict[str, object]:
  """Measures every replica count; ratios are to the first count (R = 1).

  With ``plain_baseline``, plain SGD (no DP) is measured the same way: its
  ratio is the overhead of the strategy itself on this machine.

  Call before TensorFlow's runtime is initialized (the logical devices are
  created here).
  """
  _check(s)
  from dpquant_tf import distribute  # pylint: disable=g-import-not-at-top
  distribute.configure_cpu_devices(max(s.replicas))
  rng = np.random.default_rng(s.seed)
  n = s.steps * s.global_batch
  x = rng.standard_normal(size=(n, *s.input_shape)).astype(np.float32)
  y = rng.integers(0, s.num_classes, size=n).astype(np.int32)
  rows = []
  for dp in ((True, False) if s.plain_baseline else (True,)):
    part = [_measure(s, r, x, y, dp) for r in s.replicas]
    for row in part:
      row["ratio"] = row["seconds_per_example"] / part[0]["seconds_per_example"]
    rows.extend(part)
  return {"settings": dataclasses.asdict(s), "rows": rows}


def check_target(report, *, max_ratio=1.5) -> List[str]:
  """Missed targets of the DP rows: a fallback, or a ratio above max_ratio."""
  missed = []
  for row in report["rows"]:
    if row["optimizer"] != "dp":
      continue
    if row["fallback"]:
      missed.append(f"R={row['replicas']}: jacobian fallback "
                    f"({row['fallback'][0]})")
    if row["ratio"] > max_ratio:
      missed.append(f"R={row['replicas']}: {row['ratio']:.2f}x one device's "
                    f"time per example (target <= {max_ratio}x)")
  return missed


def markdown(report) -> str:
  s = report["settings"]
  lines = [f"model={s['model']} quantize={s['quantize']} "
           f"global_batch={s['global_batch']} steps={s['steps']}",
           "", "| optimizer | replicas | ms/example | ratio vs 1 | fast path |",
           "|:---|---:|---:|---:|:---|"]
  for row in report["rows"]:
    fast = "-" if row["optimizer"] != "dp" else (
        "no (jacobian fallback)" if row["fallback"] else "yes")
    lines.append(f"| {row['optimizer']} | {row['replicas']} | "
                 f"{1e3 * row['seconds_per_example']:.3f} | "
                 f"{row['ratio']:.2f}x | {fast} |")
  return "\n".join(lines)


def to_json(report) -> str:
  return json.dumps(report, indent=2, sort_keys=True)

"""Logic of examples/train.py: DP training on real data, metrics, export.

Importable and flag-free: :func:`train` takes a :class:`TrainConfig` and
returns a metrics dict (also written to ``metrics_json`` when set).
"""

import dataclasses
import json
import math
import os
import time
from typing import Any, Dict, Optional

import numpy as np

import dpquant_tf  # noqa: F401  (Keras 2 switch before TensorFlow)
from dpquant_tf import _validation
from dpquant_tf import data as dp_data
from dpquant_tf import models as dp_models

__all__ = ["TrainConfig", "compute_epsilon", "find_noise_multiplier", "train"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """Everything one training run needs (the flags of examples/train.py)."""
  dataset: str = "mnist"
  model: str = "cnn"
  epochs: int = 3
  batch_size: int = 64
  target_epsilon: Optional[float] = 8.0
  noise_multiplier: Optional[float] = None
  delta: float = 1e-5
  l2_norm_clip: float = 1.0
  learning_rate: float = 0.25
  policy: str = "none"
  ratio: float = 0.75
  format: str = "luq_fp4"
  optimizer: str = "sgd"
  seed: Optional[int] = None
  dp: bool = True
  max_train: Optional[int] = None
  max_test: Optional[int] = None
  export_dir: Optional[str] = None
  metrics_json: Optional[str] = None
  tensorboard_dir: Optional[str] = None
  verbose: Any = "auto"

  def validate(self) -> "TrainConfig":
    _validation.check_int("epochs", self.epochs, low=1)
    _validation.check_int("batch_size", self.batch_size, low=1)
    _validation.check_positive("delta", self.delta)
    _validation.check_positive("l2_norm_clip", self.l2_norm_clip)
    _validation.check_positive("learning_rate", self.learning_rate)
    _validation.check_one_of("optimizer", self.optimizer, ("sgd", "adam"))
    if self.dp:
      if (self.target_epsilon is None) == (self.noise_multiplier is None):
        _validation.fail("(target_epsilon, noise_multiplier)",
                         (self.target_epsilon, self.noise_multiplier),
                         "exactly one set when dp=True")
      if self.target_epsilon is not None:
        _validation.check_positive("target_epsilon", self.target_epsilon)
      else:
        _validation.check_non_negative("noise_multiplier", self.noise_multiplier)
    return self


def compute_epsilon(*, noise_multiplier: float, sampling_rate: float,
                    steps: int, delta: float) -> float:
  """Epsilon of `steps` Poisson-sampled Gaussian steps (RDP accountant)."""
  import dp_accounting  # pylint: disable=g-import-not-at-top
  from dp_accounting import rdp  # pylint: disable=g-import-not-at-top
  if noise_multiplier == 0:
    return math.inf
  event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          float(sampling_rate), dp_accounting.GaussianDpEvent(float(noise_multiplier))),
      int(steps))
  accountant = rdp.RdpAccountant()
  accountant.compose(event)
  return float(accountant.get_epsilon(float(delta)))


def find_noise_multiplier(*, target_epsilon: float, sampling_rate: float,
                          steps: int, delta: float, tol: float = 1e-3) -> float:
  """Smallest noise multiplier (bisection) whose epsilon <= target_epsilon."""
  lo, hi = 0.0, 1.0
  while compute_epsilon(noise_multiplier=hi, sampling_rate=sampling_rate,
                        steps=steps, delta=delta) > target_epsilon:
    lo, hi = hi, 2 * hi
    if hi > 1e4:
      raise ValueError(f"Expected target_epsilon={target_epsilon!r} to be "
                       "reachable with a noise multiplier below 1e4.")
  while hi - lo > tol:
    mid = (lo + hi) / 2
    if mid == 0 or compute_epsilon(noise_multiplier=mid, sampling_rate=sampling_rate,
                                   steps=steps, delta=delta) > target_epsilon:
      lo = mid
    else:
      hi = mid
  return hi


def _make_optimizer(cfg: TrainConfig, noise_multiplier: float):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorflow_privacy.privacy.optimizers import dp_optimizer_keras  # pylint: disable=g-import-not-at-top
  if not cfg.dp:
    if cfg.optimizer == "adam":
      return tf.keras.optimizers.legacy.Adam(cfg.learning_rate)
    return tf.keras.optimizers.legacy.SGD(cfg.learning_rate)
  cls = (dp_optimizer_keras.DPKerasAdamOptimizer if cfg.optimizer == "adam"
         else dp_optimizer_keras.DPKerasSGDOptimizer)
  return cls(l2_norm_clip=cfg.l2_norm_clip, noise_multiplier=noise_multiplier,
             num_microbatches=cfg.batch_size, learning_rate=cfg.learning_rate)


def train(config: TrainConfig) -> Dict[str, Any]:
  """Trains one model, evaluates it, optionally exports it and writes metrics.

  Returns:
    A dict with ``test_accuracy``, ``epsilon``, ``delta``, ``steps``,
    ``noise_multiplier``, ``wall_seconds`` and the configuration.
  """
  cfg = config.validate()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  start = time.time()
  if cfg.seed is not None:
    tf.keras.utils.set_random_seed(cfg.seed)
  ds = dp_data.load_dataset(cfg.dataset, max_train=cfg.max_train,
                            max_test=cfg.max_test)
  print(f"Data: {ds.description}")
  n = len(ds.x_train)
  batch = min(cfg.batch_size, n)
  steps_per_epoch = n // batch
  steps = steps_per_epoch * cfg.epochs
  sampling_rate = batch / n
  noise = 0.0
  if cfg.dp:
    if cfg.target_epsilon is not None:
      noise = find_noise_multiplier(target_epsilon=cfg.target_epsilon,
                                    sampling_rate=sampling_rate, steps=steps,
                                    delta=cfg.delta)
    else:
      noise = float(cfg.noise_multiplier)
    print(f"DP-SGD: noise_multiplier={noise:.4f} clip={cfg.l2_norm_clip} "
          f"batch={batch} steps={steps}")
  model = dp_models.build_model(cfg.model, ds.input_shape, ds.num_classes)
  loss = tf.keras.losses.SparseCategoricalCrossentropy(
      from_logits=True, reduction=tf.keras.losses.Reduction.NONE)
  model.compile(optimizer=_make_optimizer(cfg, noise), loss=loss,
                metrics=["accuracy"])
  train_ds = (tf.data.Dataset.from_tensor_slices((ds.x_train, ds.y_train))
              .shuffle(n, seed=cfg.seed).batch(batch, drop_remainder=True))
  callbacks = []
  if cfg.tensorboard_dir:
    callbacks.append(tf.keras.callbacks.TensorBoard(cfg.tensorboard_dir))
  model.fit(train_ds, epochs=cfg.epochs, callbacks=callbacks, verbose=cfg.verbose)
  _, acc = model.evaluate(ds.x_test, ds.y_test, batch_size=256, verbose=0)
  epsilon = (compute_epsilon(noise_multiplier=noise, sampling_rate=sampling_rate,
                             steps=steps, delta=cfg.delta) if cfg.dp else math.inf)
  metrics = {
      "test_accuracy": float(acc),
      "epsilon": epsilon if math.isfinite(epsilon) else None,
      "delta": cfg.delta,
      "analysis_share": 0.0,
      "steps": steps,
      "noise_multiplier": noise,
      "sampling": "shuffled fixed-size batches (epsilon computed with the "
                  "Poisson-sampling accountant, as TF-Privacy's tutorial does)",
      "theoretical_speedup": 1.0,
      "wall_seconds": time.time() - start,
      "plan_per_epoch": [],
      "config": dataclasses.asdict(cfg),
  }
  print(f"Test accuracy: {acc:.4f}")
  if cfg.dp:
    print(f"Privacy: epsilon={epsilon:.3f} at delta={cfg.delta:g} "
          f"({metrics['sampling']})")
  if cfg.metrics_json:
    os.makedirs(os.path.dirname(os.path.abspath(cfg.metrics_json)), exist_ok=True)
    with open(cfg.metrics_json, "w") as f:
      json.dump(metrics, f, indent=2)
  return metrics

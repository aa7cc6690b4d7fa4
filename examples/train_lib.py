"""Logic of examples/train.py: DPQuant training on real data, metrics, export.

Importable and flag-free: :func:`train` takes a :class:`TrainConfig` and
returns a :class:`TrainResult` (metrics dict + trained model); the metrics are
also written to ``metrics_json`` when set.

What a DP run does (``dp=True``):

1. loads the data (:mod:`dpquant_tf.data`) and builds the model
   (:mod:`dpquant_tf.models`) and wraps every quantizable layer
   (``quantize_model``; the fp32 baseline keeps them all switched off, so
   every run shares one per-example gradient path);
2. samples batches with Poisson sampling at rate q = batch_size / N
   (``poisson_dataset``), so the accounted epsilon is a proven guarantee;
3. calibrates the noise multiplier to ``target_epsilon`` counting the planned
   loss-sensitivity analyses (``calibrate_noise_multiplier``);
4. trains with ``DPQuantOptimizer`` (or the Adam variant) attached to a
   ``PrivacyLedger``; ``DPQuantScheduler`` applies the policy each epoch
   (running the DP ``LossSensitivityEstimator`` for ``loss_aware``); the
   ``PrivacyCallback`` logs epsilon each epoch;
5. evaluates the test accuracy with the trained weights in full precision
   (quantization is a training-time compute saving);
6. reports the cost model's theoretical speed-up (:mod:`dpquant_tf.costmodel`)
   from the per-layer MACs of the plans actually run, next to the measured
   step time of each epoch (``StepTimeCallback``: ``step_time_s`` in the
   Keras logs and in ``plan_per_epoch``), and which layers ran natively in a
   low precision and which were simulated (``execution`` in the metrics).

Formats and policies by name come from :mod:`dpquant_tf.presets`; the native
execution precisions ``bf16`` (the layer's matmul/convolution runs in
bfloat16, no simulated rounding) and ``fp8_e4m3`` (simulated FP8 E4M3 on
every device) are added here (:class:`NativeFormat`).

``seed`` fixes the weight initialisation, the schedule's random layer draws
and (non-DP runs) the data order. DP noise and Poisson sampling come from
non-deterministic generators (docs/METHOD.md invariant 3) unless a research
study asks by name for paired runs (common random numbers):
``research_noise_seed`` seeds the optimizer's noise stream (``noise_seed=``)
``research_sampling_seed`` the Poisson sampler and ``research_estimator_seed``
the loss-sensitivity estimator's sampling and noise. Each prints a warning, is
recorded in the metrics as ``research.noise_seeded`` /
``research.sampling_seeded`` / ``research.estimator_seeded`` (the seed values
are withheld), and makes the guarantee hold only while the seeds stay secret.
"""

import dataclasses
import enum
import hashlib
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import dpquant_tf  # noqa: F401  (Keras 2 switch before TensorFlow)
from dpquant_tf import _validation
from dpquant_tf import costmodel
from dpquant_tf import data as dp_data
from dpquant_tf import distribute
from dpquant_tf import models as dp_models
from dpquant_tf import presets
from dpquant_tf import training as dp_training
from examples import train_cost_lib

__all__ = ["ExportFailed", "FormatName", "NativeFormat", "OptimizerName",
           "PolicyName", "RESEARCH_SEEDS", "TrainConfig", "TrainResult",
           "base_layer_config", "check_output_paths", "format_names", "train"]


# The names a user passes (--policy, --format) are library presets.
PolicyName = presets.PolicyName
FormatName = presets.FormatPreset
# Research-only seeds of the private random streams (paired studies).
RESEARCH_SEEDS = ("research_noise_seed", "research_sampling_seed",
                  "research_estimator_seed")


class NativeFormat(enum.Enum):
  """Execution precisions by name (the op itself runs in this precision).

  bf16: inputs and kernel cast to bfloat16 (to nearest), the op and
  its backward pass in bfloat16; faster where the hardware has bf16 units.
  fp8_e4m3: FP8 E4M3 simulated (rounded, op in float32) on every device.
  """
  BF16 = "bf16"
  FP8_E4M3 = "fp8_e4m3"


def format_names() -> List[str]:
  """Every --format value: the library presets and the native precisions."""
  return [m.value for m in FormatName] + [m.value for m in NativeFormat]


def _check_format(name):
  if isinstance(name, (FormatName, NativeFormat)):
    return name
  for cls in (NativeFormat, FormatName):
    for member in cls:
      if isinstance(name, str) and name.lower() in (member.value,
                                                    member.name.lower()):
        return member
  _validation.fail("format", name, f"one of {format_names()}")


def base_layer_config(name):
  """The enabled ``LayerQuantConfig`` of a quantized layer in format ``name``.

  Presets (``luq_fp4``, ``int4``, ...) come from :mod:`dpquant_tf.presets`
  (simulated formats, float32 op). ``bf16`` / ``fp8_e4m3``: no simulated
  rounding (bits 0 both ways), the op in that execution precision.
  """
  fmt = _check_format(name)
  if isinstance(fmt, FormatName):
    return presets.layer_config(fmt)
  from dpquant_tf import quantization  # pylint: disable=g-import-not-at-top
  return quantization.LayerQuantConfig(enabled=True, fwd_bits=0, bwd_bits=0,
                                       precision=fmt.value)


class OptimizerName(enum.Enum):
  SGD = "sgd"
  ADAM = "adam"
  ADAMW = "adamw"   # decoupled weight decay (TrainConfig.weight_decay)


# The name of the DP algorithm each --optimizer trains with (log lines).
DP_ALGORITHM = {OptimizerName.SGD: "DP-SGD", OptimizerName.ADAM: "DP-Adam",
                OptimizerName.ADAMW: "DP-AdamW"}


def journal_path(checkpoint_dir: Optional[str]) -> Optional[str]:
  """The privacy journal of a --checkpoint_dir (None without one): the
  spent budget's high-water mark, read by every resumed run."""
  if not checkpoint_dir:
    return None
  return os.path.join(checkpoint_dir, "privacy_journal.json")


# --model=transformer* changes these defaults (flags the user did not set):
# the offline synthetic text task, DP-SGD at learning rate 1 (fp32 DP: 96.3%
# test accuracy at epsilon 8 in docs/RESULTS.md; DP-AdamW at 3e-3 and 1e-3
# stayed near chance), a batch that finishes in minutes on 2 CPU cores.
# transformer: 5 epochs (at 3 the synthetic task's sudden transition was
# missed by some seeds; docs/RESULTS.md "Transformer"); transformer_mini: not
# tuned.
MODEL_DEFAULTS = {
    "transformer": {"dataset": "synthetic_text", "optimizer": "sgd",
                    "learning_rate": 1.0, "batch_size": 256, "epochs": 5},
    "transformer_mini": {"dataset": "synthetic_text", "optimizer": "sgd",
                         "learning_rate": 1.0, "batch_size": 256,
                         "epochs": 3},
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """Everything one training run needs (the flags of examples/train.py)."""
  dataset: str = "mnist"
  model: str = "cnn"
  epochs: int = 5
  batch_size: int = 64
  target_epsilon: Optional[float] = 8.0
  noise_multiplier: Optional[float] = None
  delta: float = 1e-5
  l2_norm_clip: float = 1.0
  learning_rate: float = 0.5
  policy: str = "loss_aware"
  ratio: float = 0.75
  static_layers: Optional[Tuple[str, ...]] = None
  format: str = "luq_fp4"
  optimizer: str = "sgd"
  weight_decay: float = 0.01   # optimizer="adamw" only
  seed: Optional[int] = None
  dp: bool = True
  analysis_period: int = 2
  analysis_sampling_rate: float = 0.05
  analysis_noise_multiplier: float = 2.0
  analysis_clip: float = 0.2
  beta: float = 50.0
  max_train: Optional[int] = None
  max_test: Optional[int] = None
  export_dir: Optional[str] = None
  metrics_json: Optional[str] = None
  tensorboard_dir: Optional[str] = None
  verbose: Any = "auto"
  data_dir: Optional[str] = None
  tfds_download: bool = False
  research_noise_seed: Optional[int] = None
  research_sampling_seed: Optional[int] = None
  research_estimator_seed: Optional[int] = None
  # Resume a killed run: Keras BackupAndRestore in this directory (weights,
  # optimizer, its privacy event table and the ledger's releases).
  checkpoint_dir: Optional[str] = None

  def validate(self) -> "TrainConfig":
    """Checks every field; returns self. Raises ValueError/TypeError."""
    _validation.check_int("epochs", self.epochs, low=1)
    _validation.check_int("batch_size", self.batch_size, low=1)
    _validation.check_open_unit("delta", self.delta)
    if self.checkpoint_dir is not None:
      _validation.check_type("checkpoint_dir", self.checkpoint_dir, str,
                             "None or a directory path")
    _validation.check_positive("l2_norm_clip", self.l2_norm_clip)
    _validation.check_positive("learning_rate", self.learning_rate)
    _validation.check_probability("ratio", self.ratio, allow_zero=True)
    _validation.check_enum("policy", self.policy, PolicyName)
    _check_format(self.format)
    _validation.check_enum("optimizer", self.optimizer, OptimizerName)
    _validation.check_non_negative("weight_decay", self.weight_decay)
    _validation.check_int("analysis_period", self.analysis_period, low=1)
    _validation.check_probability("analysis_sampling_rate",
                                  self.analysis_sampling_rate)
    _validation.check_positive("analysis_noise_multiplier",
                               self.analysis_noise_multiplier)
    _validation.check_positive("analysis_clip", self.analysis_clip)
    _validation.check_non_negative("beta", self.beta)
    for name in ("seed",) + RESEARCH_SEEDS:
      if getattr(self, name) is not None:
        _validation.check_int(name, getattr(self, name), low=0)
    if not self.dp:
      for name in RESEARCH_SEEDS:
        if getattr(self, name) is not None:
          _validation.fail(name, getattr(self, name), "None when dp=False")
    if self.static_layers is not None:
      if _validation.check_enum("policy", self.policy,
                                PolicyName) is not PolicyName.STATIC:
        _validation.fail("static_layers", self.static_layers,
                         "None unless policy='static'")
      if isinstance(self.static_layers, str) or not all(
          isinstance(n, str) for n in self.static_layers):
        _validation.fail("static_layers", self.static_layers,
                         "a tuple of layer names", TypeError)
    if self.dp:
      if (self.target_epsilon is None) == (self.noise_multiplier is None):
        _validation.fail("(target_epsilon, noise_multiplier)",
                         (self.target_epsilon, self.noise_multiplier),
                         "exactly one set when dp=True")
      if self.target_epsilon is not None:
        _validation.check_positive("target_epsilon", self.target_epsilon)
      else:
        _validation.check_non_negative("noise_multiplier", self.noise_multiplier)
        if self.noise_multiplier == 0:
          _validation.fail("noise_multiplier", self.noise_multiplier,
                           "> 0 when dp=True (noise 0 is NOT private: "
                           "epsilon is infinite; use dp=False / --nodp for "
                           "a non-private baseline)")
    check_output_paths(self)
    return self


@dataclasses.dataclass
class TrainResult:
  """What :func:`train` returns: the metrics and the trained Keras model."""
  metrics: Dict[str, Any]
  model: Any


def _make_policy(cfg: TrainConfig, policy: PolicyName):
  return presets.make_policy(policy, ratio=cfg.ratio, beta=cfg.beta,
                             period=cfg.analysis_period, epochs=cfg.epochs,
                             static_layers=cfg.static_layers)


def _num_analyses(cfg: TrainConfig, policy) -> int:
  if policy is None or not policy.needs_sensitivities:
    return 0
  return sum(1 for e in range(cfg.epochs) if policy.analysis_due(e))


def _make_optimizer(cfg: TrainConfig, *, noise: float, ledger, n: int, q: float):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  opt = _validation.check_enum("optimizer", cfg.optimizer, OptimizerName)
  if not cfg.dp:
    if opt is OptimizerName.ADAMW:
      return tf.keras.optimizers.AdamW(cfg.learning_rate,
                                       weight_decay=cfg.weight_decay)
    cls = (tf.keras.optimizers.legacy.Adam if opt is OptimizerName.ADAM
           else tf.keras.optimizers.legacy.SGD)
    return cls(cfg.learning_rate)
  from dpquant_tf import optimizers  # pylint: disable=g-import-not-at-top
  cls = {OptimizerName.ADAM: optimizers.DPQuantAdamOptimizer,
         OptimizerName.ADAMW: optimizers.DPQuantAdamWOptimizer,
         OptimizerName.SGD: optimizers.DPQuantOptimizer}[opt]
  seeded = ({} if cfg.research_noise_seed is None
            else {"noise_seed": cfg.research_noise_seed})
  if opt is OptimizerName.ADAMW:
    seeded["weight_decay"] = cfg.weight_decay
  # Only the bit-width schedule sets gradient bits; other runs build a step
  # without the gradient quantization branch (a shorter first trace).
  bits_policy = (_validation.check_enum("policy", cfg.policy, PolicyName)
                 is PolicyName.BIT_RAMP)
  return cls(l2_norm_clip=cfg.l2_norm_clip, noise_multiplier=noise,
             ledger=ledger, expected_batch_size=q * n, sampling_probability=q,
             dataset_size=n, learning_rate=cfg.learning_rate,
             gradient_quantization=bits_policy, **seeded)


def _analysis_fraction(cfg: TrainConfig, layers, estimator) -> float:
  """T_analysis / T_train of an epoch with one analysis (theoretical).

  One analysis runs (1 + n_layers * R) forward passes over q_a * N examples;
  an epoch of training runs forward + backward over N examples.
  """
  if estimator is None:
    return 0.0
  costs = costmodel.layer_costs(layers)
  fwd = sum(c.fwd_macs for c in costs)
  total = sum(c.total for c in costs)
  passes = 1 + len(costs) * estimator.repeats
  return cfg.analysis_sampling_rate * passes * fwd / total


def _write_json(path: str, obj) -> None:
  """Writes `obj` as JSON atomically (a temporary file renamed over `path`)."""
  full = os.path.abspath(os.path.expanduser(path))
  os.makedirs(os.path.dirname(full), exist_ok=True)
  tmp = f"{full}.partial-{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, full)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _check_writable_under(name: str, path: str) -> None:
  """`path` can be created: its nearest existing ancestor is a writable dir."""
  ancestor = os.path.dirname(os.path.abspath(os.path.expanduser(path)))
  while not os.path.exists(ancestor):
    ancestor = os.path.dirname(ancestor)
  if not os.path.isdir(ancestor):
    _validation.fail(name, path, f"under a directory, but {ancestor!r} is a "
                     "file")
  if not os.access(ancestor, os.W_OK | os.X_OK):
    _validation.fail(name, path, f"in a writable directory ({ancestor!r} is "
                     "not writable)")


def check_output_paths(cfg: "TrainConfig") -> None:
  """Refuses, before any training step, an output path that would fail later.

  ``export_dir``: absent or an empty directory, under a writable directory
  (``dpquant_tf.export.check_export_path``). ``metrics_json``: not a
  directory, under a writable directory. ``tensorboard_dir``: not a file,
  under a writable directory. Nothing is created.
  """
  if cfg.export_dir is not None:
    from dpquant_tf import export  # pylint: disable=g-import-not-at-top
    export.check_export_path(cfg.export_dir, name="export_dir")
  if cfg.metrics_json is not None:
    _validation.check_type("metrics_json", cfg.metrics_json, str, "a file path")
    if not cfg.metrics_json or os.path.isdir(cfg.metrics_json):
      _validation.fail("metrics_json", cfg.metrics_json,
                       "a file path, not a directory")
    if os.path.exists(cfg.metrics_json) and not os.access(cfg.metrics_json,
                                                          os.W_OK):
      _validation.fail("metrics_json", cfg.metrics_json, "a writable file")
    _check_writable_under("metrics_json", cfg.metrics_json)
  if cfg.tensorboard_dir is not None:
    _validation.check_type("tensorboard_dir", cfg.tensorboard_dir, str,
                           "a directory path")
    if not cfg.tensorboard_dir or os.path.isfile(cfg.tensorboard_dir):
      _validation.fail("tensorboard_dir", cfg.tensorboard_dir,
                       "a directory, but it is an existing file")
    if os.path.isdir(cfg.tensorboard_dir):
      if not os.access(cfg.tensorboard_dir, os.W_OK | os.X_OK):
        _validation.fail("tensorboard_dir", cfg.tensorboard_dir,
                         "a writable directory")
    else:
      _check_writable_under("tensorboard_dir", cfg.tensorboard_dir)


class ExportFailed(OSError):
  """The run finished (metrics written) but its SavedModel export failed."""


def _warn(message: str) -> None:
  print(f"WARNING: {message}", file=sys.stderr, flush=True)


def _check_train_data(ds) -> None:
  """Refuses training data with no finite example; warns with the count.

  Examples holding a NaN or inf contribute zero to every DP step (they are
  zeroed, never clipped into the sum); the count is about the user's own
  data and is printed locally only (it is not a DP release: do not publish
  it).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  flat = np.asarray(ds.x_train).reshape(len(ds.x_train), -1)
  bad = int(np.sum(~np.all(np.isfinite(flat), axis=1)))
  if bad and bad == len(flat):
    _validation.fail("dataset", ds.name, f"training data with finite values "
                     f"(all {bad} training examples hold NaN or inf)")
  if bad:
    _warn(f"{bad} of {len(flat)} training examples hold NaN or inf; each "
          "contributes zero to every step (local diagnostic, not a DP "
          "release).")


def _quantized_model(cfg: TrainConfig, ds):
  """Builds the model with every quantizable layer wrapped and switched off.

  Every run (fp32 included) wraps the quantizable layers, so that all runs
  share one per-example gradient path; fp32 keeps every layer switched off
  (the wrapper is then the plain layer).

  Returns:
    (model, layer infos, the all-off plan; None when the layers are pinned).
  """
  from dpquant_tf import quantization  # pylint: disable=g-import-not-at-top
  from dpquant_tf import perexample  # pylint: disable=g-import-not-at-top
  # quantize_model wraps the quantizable layers (they tap); tap_model wraps the
  # remaining layers with weights that have a per-example rule (GroupNorm in
  # the ResNets), so no variable falls back to the jacobian.
  # One format per run: each wrapper builds only the plain op and that
  # format's structure (fixed_structure): smaller graphs, a shorter first
  # epoch and XLA compiles; the schedule only switches layers on and off.
  # A run that never quantizes (policy none, ratio 0) fixes the plain
  # structure: no branch at all, the same float32 ops as a disabled layer.
  # A static bf16 plan at ratio 1.0 keeps every layer on for the whole run:
  # its layers are pinned (QuantizedLayer switchable=False: no on/off
  # switch, bf16 taps, three casts fewer per layer and step).
  config = base_layer_config(cfg.format)
  policy = _validation.check_enum("policy", cfg.policy, PolicyName)
  structure = config
  if policy is PolicyName.NONE or cfg.ratio == 0:
    structure = quantization.LayerQuantConfig(fwd_bits=0, bwd_bits=0)
  pinned = (policy is PolicyName.STATIC and cfg.ratio == 1.0
            and cfg.static_layers is None
            and config.precision is quantization.Precision.BFLOAT16
            and config.fwd_bits == 0 and config.bwd_bits == 0)
  model = perexample.tap_model(quantization.quantize_model(
      dp_models.build_model(cfg.model, ds.input_shape, ds.num_classes,
                            vocab_size=getattr(ds, "vocab_size", None)),
      config=dataclasses.replace(structure, enabled=pinned),
      fixed_structure=True, switchable=not pinned))
  layers = quantization.quantizable_layers(model)
  if pinned:
    print("Static bf16 plan at ratio 1.0: every quantizable layer is pinned "
          "to bf16 in training (no on/off switch); evaluation and export "
          "run float32.")
    return model, layers, None
  all_off = quantization.QuantPlan.select(
      [l.name for l in layers], [], config=config)
  quantization.set_plan(model, all_off)
  return model, layers, all_off


def _make_estimator(cfg: TrainConfig, ds, policy, loss):
  if policy is None or not policy.needs_sensitivities:
    return None
  from dpquant_tf import schedule  # pylint: disable=g-import-not-at-top
  return schedule.LossSensitivityEstimator(
      ds.x_train, ds.y_train, sampling_rate=cfg.analysis_sampling_rate,
      noise_multiplier=cfg.analysis_noise_multiplier, clip=cfg.analysis_clip,
      loss=loss, seed=cfg.research_estimator_seed)


def _input_pipeline(cfg: TrainConfig, ds, *, batch: int, q: float, estimator,
                    policy):
  """Returns (train_data, steps_per_epoch, ledger, noise multiplier).

  DP: Poisson batches at rate q, a Poisson ledger, the noise calibrated to
  the target epsilon with the planned analyses. Non-DP: shuffled batches, and
  a ledger only to account the estimator (if any).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from dpquant_tf import privacy  # pylint: disable=g-import-not-at-top
  n = len(ds.x_train)
  if not cfg.dp:
    data = (tf.data.Dataset.from_tensor_slices((ds.x_train, ds.y_train))
            .shuffle(n, seed=cfg.seed).batch(batch))
    ledger = (privacy.PrivacyLedger(journal_path=journal_path(
        cfg.checkpoint_dir)) if estimator is not None else None)
    return data, int(math.ceil(n / batch)), ledger, 0.0
  # The library's one definition of an epoch's steps (calibration uses it).
  steps_per_epoch = privacy.steps_per_epoch(n, q)
  ledger = privacy.PrivacyLedger(sampling_method=privacy.SamplingMethod.POISSON,
                                 dataset_size=n,
                                 journal_path=journal_path(cfg.checkpoint_dir))
  # delta < 1/N (refused before any step; a warning above 1/(10 N)).
  ledger.check_delta(cfg.delta)
  if cfg.research_sampling_seed is not None:
    ledger.note_seeded("sampler")
  analyses = ([(estimator.dp_event(), _num_analyses(cfg, policy))]
              if estimator is not None else [])
  if cfg.target_epsilon is not None:
    noise = privacy.calibrate_noise_multiplier(
        cfg.target_epsilon, cfg.delta, n, batch, cfg.epochs, analyses=analyses)
  else:
    noise = float(cfg.noise_multiplier)
  # Under a multi-worker strategy: disjoint per-worker shards, each
  # Poisson-sampled at the global q (docs/DISTRIBUTED.md).
  data = distribute.poisson_input(tf.distribute.get_strategy(), ds.x_train,
                                  ds.y_train, q, steps=steps_per_epoch,
                                  seed=cfg.research_sampling_seed)
  algorithm = DP_ALGORITHM[_validation.check_enum("optimizer", cfg.optimizer,
                                                  OptimizerName)]
  print(f"{algorithm}: noise_multiplier={noise:.4f} clip={cfg.l2_norm_clip} "
        f"Poisson sampling q={q:.4g} (expected batch {batch}), "
        f"{steps_per_epoch} steps/epoch, {cfg.epochs} epochs")
  return data, steps_per_epoch, ledger, noise


def _warn_research_seeds(cfg: TrainConfig) -> None:
  for name, what in (("research_noise_seed", "DP noise"),
                     ("research_sampling_seed", "Poisson sampling"),
                     ("research_estimator_seed", "estimator sampling and noise")):
    if getattr(cfg, name) is not None:
      print(f"WARNING: {name} is set: the {what} stream is seeded (research "
            "runs with common random numbers only). The DP guarantee holds "
            "only while the seed stays secret; never reuse it for a release.",
            file=sys.stderr, flush=True)


class _BatchDigest:
  """SHA-256 of the batches fit consumed (research runs with a sampling seed).

  Records one digest per batch as the input pipeline produces it (in order);
  :meth:`hexdigest` hashes the first ``count`` of them, the batches `fit`
  actually consumed (prefetching may produce more). Only used when the
  sampling is seeded: then the sample sequence is a function of the seed
  anyway, and two runs can be compared without storing the samples.
  """

  def __init__(self):
    self._digests: List[str] = []

  def wrap(self, dataset):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    def record(y, mask):
      h = hashlib.sha256(y.numpy().tobytes())
      h.update(mask.numpy().tobytes())
      self._digests.append(h.hexdigest())
      return 0

    def fn(x, y, mask, *seal):
      # The sampler's seal (if any) passes through unchanged, in order.
      done = tf.py_function(record, [y, mask], tf.int32)
      with tf.control_dependencies([done]):
        return (x, tf.identity(y), tf.identity(mask)) + tuple(seal)

    return dataset.map(fn)

  def hexdigest(self, count: int) -> str:
    return hashlib.sha256("".join(self._digests[:count]).encode()).hexdigest()


def _weights_digest(model) -> str:
  """SHA-256 of the trained weights (post-processing of the released model)."""
  h = hashlib.sha256()
  for w in model.get_weights():
    h.update(w.tobytes())
  return h.hexdigest()


def _callbacks(cfg: TrainConfig, policy, ledger, estimator) -> Tuple[list, Any]:
  """Returns (callbacks, scheduler or None)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  callbacks: List[Any] = []
  if cfg.checkpoint_dir:
    # First, so weights, optimizer (with its privacy event table) and the
    # ledger's releases are restored before any other callback looks at them.
    # Kept after the run: a rerun resumes at the end instead of training (and
    # spending privacy) again.
    callbacks.append(tf.keras.callbacks.BackupAndRestore(
        cfg.checkpoint_dir, delete_checkpoint=False))
  scheduler = None
  if policy is not None:
    from dpquant_tf import schedule  # pylint: disable=g-import-not-at-top
    scheduler = schedule.DPQuantScheduler(
        policy, ledger=ledger, estimator=estimator,
        delta=cfg.delta if cfg.dp else None,
        base_config=base_layer_config(cfg.format), seed=cfg.seed)
    callbacks.append(scheduler)
  if cfg.dp:
    from dpquant_tf import privacy  # pylint: disable=g-import-not-at-top
    callbacks.append(privacy.PrivacyCallback(ledger, cfg.delta))
  if cfg.tensorboard_dir:
    callbacks.append(tf.keras.callbacks.TensorBoard(cfg.tensorboard_dir))
  # Last, so the epoch-start analysis of the scheduler is not timed.
  callbacks.append(costmodel.StepTimeCallback())
  return callbacks, scheduler


def _first_epoch_ratio(timer_history) -> Optional[float]:
  """The first epoch's wall time over the median later epoch's (None with
  fewer than two epochs): the fixed cost of a run (tracing, the first
  analysis) in units of a steady epoch."""
  walls = [t["epoch_wall_s"] for t in timer_history]
  if len(walls) < 2:
    return None
  median = statistics.median(walls[1:])
  return float(walls[0] / median) if median > 0 else None


def _report(cfg: TrainConfig, metrics: Dict[str, Any], ledger) -> None:
  """Prints the results; adds epsilon, analysis share and statement (DP)."""
  print(f"Test accuracy: {metrics['test_accuracy']:.4f}")
  print(f"Theoretical speed-up (cost model, {cfg.format}): "
        f"{metrics['theoretical_speedup']:.3f}x; on this hardware "
        f"{metrics['hardware_speedup']:.3f}x")
  ex = metrics["execution"]
  print(f"Execution: native {ex['precision'] if ex['native_layers'] else '-'} "
        f"layers {ex['native_layers']} (hardware accelerated: "
        f"{ex['hardware_accelerated']}); simulated layers "
        f"{ex['simulated_layers']}")
  print(train_cost_lib.format_speedups(metrics["measured_speedup"], ex))
  for p in metrics["plan_per_epoch"]:
    if p.get("step_time_s") is not None:
      wall = p.get("epoch_wall_s")
      print(f"  epoch {p['epoch']}: step {1000 * p['step_time_s']:.1f} ms "
            f"measured{f', epoch {wall:.1f} s wall' if wall else ''}, "
            f"modelled speed-up {p['speedup']:.3f}x")
  ratio = metrics.get("first_epoch_ratio")
  if ratio is not None:
    print(f"First epoch (tracing, first analysis): {ratio:.2f}x the median "
          "later epoch's wall time")
  if not cfg.dp:
    return
  fallback = metrics.get("jacobian_fallback") or []
  print("Per-example gradients: " + (
      f"jacobian fallback ({len(fallback)} warning(s)): {fallback[0]}"
      if fallback else "the fast path for every trainable variable (no "
      "jacobian fallback)"))
  # The proven figure (a seeded sampler or estimator voids amplification);
  # the Poisson-amplified one only under its own name.
  eps = ledger.proven_epsilon(cfg.delta)
  poisson_eps = ledger.epsilon(cfg.delta)
  metrics["epsilon"] = float(eps) if math.isfinite(eps) else None
  metrics["epsilon_if_poisson"] = (float(poisson_eps)
                                   if math.isfinite(poisson_eps) else None)
  metrics["analysis_share"] = float(ledger.analysis_share(cfg.delta))
  metrics["privacy_statement"] = ledger.statement(cfg.delta)
  seeded = [what for name, what in (("research_noise_seed", "noise"),
                                    ("research_sampling_seed", "sampling"),
                                    ("research_estimator_seed", "estimator"))
            if getattr(cfg, name) is not None]
  if seeded:
    metrics["privacy_statement"] += (
        f" Research run: the {' and '.join(seeded)} stream(s) were seeded "
        "(research_noise_seed / research_sampling_seed / "
        "research_estimator_seed); the guarantee holds only while the seeds "
        "stay secret.")
  if cfg.research_sampling_seed is not None:
    how = ("seeded sampler: every step accounted at rate 1, no "
           "amplification by sampling")
  elif eps == poisson_eps:
    how = "Poisson sampling"
  else:
    how = f"proven; {poisson_eps:.3f} if the seeded sample were secret"
  print(f"Privacy: epsilon={eps:.3f} at delta={cfg.delta:g} ({how}; "
        f"analysis share {100 * metrics['analysis_share']:.2f}%)")
  print(metrics["privacy_statement"])


def _public_config(cfg: TrainConfig) -> Dict[str, Any]:
  """The configuration for the metrics, research seed values withheld."""
  out = dataclasses.asdict(cfg)
  for name in RESEARCH_SEEDS:
    if out[name] is not None:
      out[name] = "set (withheld)"
  return out


def train(config: TrainConfig) -> TrainResult:
  """Trains one model, evaluates it, optionally exports it and writes metrics.

  Returns:
    A :class:`TrainResult`. ``metrics`` holds ``test_accuracy``, ``epsilon``
    (None without DP), ``delta``, ``analysis_share``, ``steps``,
    ``noise_multiplier``, ``theoretical_speedup``, ``wall_seconds``,
    ``plan_per_epoch``, ``layers`` (per-layer MACs) and the configuration.
  """
  cfg = config.validate()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from dpquant_tf import quantization  # pylint: disable=g-import-not-at-top
  start = time.time()
  if cfg.metrics_json:  # first, so that a run that dies leaves a record
    _write_json(cfg.metrics_json, {"status": "started",
                                   "config": _public_config(cfg)})
  if cfg.seed is not None:
    tf.keras.utils.set_random_seed(cfg.seed)
  _warn_research_seeds(cfg)
  ds = dp_data.load_dataset(cfg.dataset, max_train=cfg.max_train,
                            max_test=cfg.max_test, data_dir=cfg.data_dir,
                            tfds_download=cfg.tfds_download)
  print(f"Data: {ds.description}")
  _check_train_data(ds)
  n = len(ds.x_train)
  batch = min(cfg.batch_size, n)
  if batch < cfg.batch_size:
    _warn(f"batch_size={cfg.batch_size} is larger than the {n} training "
          f"examples: using {n} (sampling rate 1, no amplification).")
  q = batch / n
  model, layers, all_off = _quantized_model(cfg, ds)
  policy = _make_policy(cfg, _validation.check_enum("policy", cfg.policy, PolicyName))
  if cfg.ratio == 0 and policy is not None:
    print("ratio=0: no layer is quantized, so no schedule and no "
          "loss-sensitivity analysis run (no epsilon spent on them).")
    policy = None
  # DP optimizers need per-example losses (Reduction.NONE); plain SGD gets the
  # batch mean (a NONE loss would make Keras differentiate the batch sum).
  loss = tf.keras.losses.SparseCategoricalCrossentropy(
      from_logits=True, reduction=(tf.keras.losses.Reduction.NONE if cfg.dp
                                   else tf.keras.losses.Reduction.AUTO))
  estimator = _make_estimator(cfg, ds, policy, loss)
  train_data, steps_per_epoch, ledger, noise = _input_pipeline(
      cfg, ds, batch=batch, q=q, estimator=estimator, policy=policy)
  digest = None
  if cfg.research_sampling_seed is not None and isinstance(train_data,
                                                            tf.data.Dataset):
    digest = _BatchDigest()
    train_data = digest.wrap(train_data)
  optimizer = _make_optimizer(
      cfg, noise=noise, ledger=ledger if cfg.dp else None, n=n, q=q)
  model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])
  callbacks, scheduler = _callbacks(cfg, policy, ledger, estimator)
  # Variables the first step would create, created now: one trace, not two
  # (a multi-worker DatasetCreator has no element_spec: traced twice there).
  if getattr(train_data, "element_spec", None) is not None:
    dp_training.prepare_first_step(model, train_data)
  from dpquant_tf import perexample  # pylint: disable=g-import-not-at-top
  with perexample.FallbackWatch() as fallback:
    model.fit(train_data, epochs=cfg.epochs, callbacks=callbacks,
              verbose=cfg.verbose, steps_per_epoch=steps_per_epoch)
  train_seconds = time.time() - start
  steps_run = int(optimizer.iterations.numpy())
  if steps_run < steps_per_epoch * cfg.epochs:
    print(f"Training stopped after {steps_run} of "
          f"{steps_per_epoch * cfg.epochs} planned steps (a callback set "
          "model.stop_training).")

  if all_off is not None:   # pinned layers run float32 in evaluate anyway
    quantization.set_plan(model, all_off)  # evaluate in full precision
  _, acc = model.evaluate(ds.x_test, ds.y_test, batch_size=256, verbose=0)
  history = scheduler.history if scheduler is not None else [
      {"epoch": e, "quantized": [], "analysis": None} for e in range(cfg.epochs)]
  timer = next(c for c in callbacks if isinstance(c, costmodel.StepTimeCallback))
  # The attention products (QK^T, AV) are matmul work no plan quantizes.
  layers = costmodel.layer_costs(layers) + costmodel.attention_costs(model)
  plans, speedup, hw_speedup = train_cost_lib.cost_report(
      layers, history, base_layer_config(cfg.format),
      _analysis_fraction(cfg, layers, estimator), timer.history)
  metrics: Dict[str, Any] = {
      "test_accuracy": float(acc),
      "epsilon": None, "delta": cfg.delta if cfg.dp else None,
      "analysis_share": None, "noise_multiplier": noise,
      "steps": steps_per_epoch * cfg.epochs, "steps_per_epoch": steps_per_epoch,
      "dataset": ds.description, "train_size": n, "test_size": len(ds.x_test),
      "theoretical_speedup": speedup,
      "hardware_speedup": hw_speedup,
      "execution": train_cost_lib.execution_summary(
          cfg.format, base_layer_config(cfg.format), plans),
      "step_time_s": [t["step_time_s"] for t in timer.history],
      "epoch_wall_s": [t["epoch_wall_s"] for t in timer.history],
      "first_epoch_ratio": _first_epoch_ratio(timer.history),
      "measured_speedup": train_cost_lib.measured_speedup(plans),
      "wall_seconds": time.time() - start, "train_seconds": train_seconds,
      "layers": [dataclasses.asdict(c) for c in costmodel.layer_costs(layers)],
      "plan_per_epoch": plans,
      "weights_sha256": _weights_digest(model),
      "research": {
          "noise_seeded": bool(getattr(optimizer, "noise_is_seeded", False)),
          "sampling_seeded": cfg.research_sampling_seed is not None,
          "estimator_seeded": cfg.research_estimator_seed is not None,
          "sample_sha256": (digest.hexdigest(steps_per_epoch * cfg.epochs)
                            if digest is not None else None),
      },
      "config": _public_config(cfg),
      # The per-example path's own warnings during fit (empty: every
      # trainable variable took the fast path, no jacobian fallback).
      "jacobian_fallback": list(fallback.messages) if cfg.dp else None,
  }
  _report(cfg, metrics, ledger)
  metrics["status"] = "finished"
  if cfg.metrics_json:  # before the export: a failed export loses nothing
    _write_json(cfg.metrics_json, metrics)
  if cfg.export_dir:
    from examples import serve_lib  # pylint: disable=g-import-not-at-top
    try:
      tokenizer = None
      if ds.is_text:   # raw strings too, where the vocabulary is public
        tokenizer = dp_data.public_tokenizer(
            cfg.dataset, vocab_size=ds.vocab_size, max_length=ds.input_shape[0])
      serve_lib.export_for_serving(model, cfg.export_dir, tokenizer=tokenizer)
    except OSError as e:
      metrics["export_error"] = str(e)
      if cfg.metrics_json:
        _write_json(cfg.metrics_json, metrics)
      raise ExportFailed(f"{e} The metrics were kept"
                         f"{' in ' + cfg.metrics_json if cfg.metrics_json else ''}"
                         ".") from e
    metrics["export_dir"] = cfg.export_dir
    print(f"Exported SavedModel (serving_default"
          f"{', serve_texts: raw strings' if tokenizer is not None else ''}) "
          f"to {cfg.export_dir}")
    if cfg.metrics_json:
      _write_json(cfg.metrics_json, metrics)
  return TrainResult(metrics=metrics, model=model)

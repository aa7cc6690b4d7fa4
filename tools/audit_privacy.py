r"""Empirical privacy audit of a dpquant_tf configuration.

  python tools/audit_privacy.py --audit=mechanism --noise_multiplier=1 \
      --trials=2000
  python tools/audit_privacy.py --audit=mechanism --gradient_bits=4 \
      --sensitivity_mode=bound --format=luq_fp4 --json
  python tools/audit_privacy.py --audit=checkpoint --noise_multiplier=4
  python tools/audit_privacy.py --audit=one_run --canaries=200 --epochs=4
  python tools/audit_privacy.py --audit=one_run --canary_kind=gradient
  # The configuration `make demo` trains (examples/train.py defaults), with
  # 1000 gradient canaries; train.py's flags (--epochs, --dataset, ...)
  # select another configuration:
  python tools/audit_privacy.py --audit=one_run --train_config \
      --canaries=1000

Prints a table, or one JSON object with --json. A lower bound above the
claimed (ledger) epsilon means the configuration leaks more than it claims.
Flag names follow examples/train.py. Logic: tools/audit_privacy_lib.py;
method: docs/AUDIT.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dpquant_tf  # noqa: E402,F401  (Keras 2 before TensorFlow)
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from dpquant_tf import _cli  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("audit", "mechanism", ["mechanism", "checkpoint", "one_run"],
                  "Which audit (docs/AUDIT.md).")
flags.DEFINE_float("noise_multiplier", 1.0, "Noise multiplier z.")
flags.DEFINE_float("l2_norm_clip", 1.0, "Per-example clip norm C.")
flags.DEFINE_float("learning_rate", None, "Learning rate (default: 1 for the "
                   "step audits, 20 for one_run).")
flags.DEFINE_enum("optimizer", "sgd", ["sgd", "adam"], "DP-SGD or DP-Adam.")
flags.DEFINE_integer("gradient_bits", 0, "Per-example gradient quantization "
                     "bits (0 = off).")
flags.DEFINE_enum("sensitivity_mode", "reclip", ["reclip", "bound"],
                  "Gradient quantization sensitivity mode.")
flags.DEFINE_enum("format", None, ["int4", "fp4", "luq_fp4", "fp8", "int8"],
                  "Quantized compute of the probe model (quantize_model with "
                  "this preset); default off.")
flags.DEFINE_float("delta", 1e-5, "Delta of the claim and of the bound.")
flags.DEFINE_float("confidence", 0.95, "Confidence of the lower bound.")
flags.DEFINE_integer("trials", 1000, "Trials per side (mechanism, "
                     "checkpoint).")
flags.DEFINE_integer("canaries", 100, "Canaries (one_run).")
flags.DEFINE_integer("epochs", 4, "Epochs (one_run).")
flags.DEFINE_integer("batch_size", 50, "Expected batch size (one_run).")
flags.DEFINE_integer("seed", 0, "Public seed of data, canaries and split; "
                     "the DP noise is never seeded.")
flags.DEFINE_enum("strategy", "default", ["default", "mirrored"],
                  "tf.distribute strategy (mechanism audit).")
flags.DEFINE_integer("cpu_devices", None, "With --strategy=mirrored: this "
                     "many logical CPU devices.")
flags.DEFINE_enum("canary_kind", "input", ["input", "gradient"],
                  "one_run: input canaries (scored by loss) or gradient "
                  "canaries (through the optimizer's audit hook).")
flags.DEFINE_enum("score", "per_step", ["per_step", "final"],
                  "Gradient canaries: per-step likelihood ratio (plain SGD) "
                  "or the total parameter change.")
flags.DEFINE_bool("train_config", False, "one_run: audit the configuration "
                  "examples/train.py runs (its defaults = `make demo`, "
                  "overridden by the train.py flags below and by "
                  "--epochs/--batch_size/--learning_rate/--format/"
                  "--noise_multiplier/--l2_norm_clip/--delta/--optimizer "
                  "when given), with gradient canaries.")
flags.DEFINE_string("dataset", None, "--train_config: as train.py.")
flags.DEFINE_string("model", None, "--train_config: as train.py.")
flags.DEFINE_float("target_epsilon", None, "--train_config: as train.py.")
flags.DEFINE_string("policy", None, "--train_config: as train.py.")
flags.DEFINE_float("ratio", None, "--train_config: as train.py.")
flags.DEFINE_integer("max_train", None, "--train_config: as train.py.")
flags.DEFINE_integer("max_test", None, "--train_config: as train.py.")
flags.DEFINE_integer("guesses", None, "--train_config: 'in' and 'out' "
                     "guesses each (default canaries // 10).")
flags.DEFINE_bool("json", False, "Print one JSON object.")


def _train_config():
  """examples/train.py's TrainConfig: its defaults, then the flags given."""
  # pylint: disable=g-import-not-at-top
  import dataclasses
  from examples import train_lib
  changes = {}
  for name in ("dataset", "model", "target_epsilon", "policy", "ratio",
               "max_train", "max_test", "epochs", "batch_size",
               "learning_rate", "format", "noise_multiplier", "l2_norm_clip",
               "delta", "optimizer", "seed"):
    if FLAGS[name].present:
      changes[name] = FLAGS[name].value
  if "noise_multiplier" in changes and "target_epsilon" not in changes:
    changes["target_epsilon"] = None
  return dataclasses.replace(train_lib.TrainConfig(verbose=0), **changes)


def main(argv):
  try:
    _main(argv)
  except (ValueError, TypeError, app.UsageError) as e:
    _cli.usage_exit(e)


def _main(argv):
  del argv
  # pylint: disable=g-import-not-at-top
  from tools import audit_privacy_lib as lib
  if FLAGS.train_config:
    if FLAGS.audit != "one_run":
      raise app.UsageError("--train_config needs --audit=one_run")
    report = lib.audit_train_config(
        _train_config(), canaries=FLAGS.canaries, seed=FLAGS.seed,
        score=FLAGS.score, guesses=FLAGS.guesses,
        confidence=FLAGS.confidence)
    print(lib.to_json(report) if FLAGS.json else lib.format_table(report))
    return
  strategy = None
  if FLAGS.strategy == "mirrored":
    from dpquant_tf import distribute
    import tensorflow as tf
    if FLAGS.cpu_devices:
      distribute.configure_cpu_devices(FLAGS.cpu_devices)
    strategy = tf.distribute.MirroredStrategy()
  cfg = lib.AuditConfig(
      audit=FLAGS.audit, noise_multiplier=FLAGS.noise_multiplier,
      l2_norm_clip=FLAGS.l2_norm_clip, learning_rate=FLAGS.learning_rate,
      optimizer=FLAGS.optimizer, gradient_bits=FLAGS.gradient_bits,
      sensitivity_mode=FLAGS.sensitivity_mode, format=FLAGS.format,
      delta=FLAGS.delta, confidence=FLAGS.confidence, trials=FLAGS.trials,
      canaries=FLAGS.canaries, epochs=FLAGS.epochs,
      batch_size=FLAGS.batch_size, seed=FLAGS.seed, strategy=strategy,
      canary_kind=FLAGS.canary_kind, score=FLAGS.score)
  report = lib.run(cfg)
  print(lib.to_json(report) if FLAGS.json else lib.format_table(report))


if __name__ == "__main__":
  app.run(main, flags_parser=_cli.one_line_flags_parser())

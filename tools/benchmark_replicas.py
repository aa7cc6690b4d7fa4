r"""DP step time per example under MirroredStrategy: R local replicas vs 1.

  python tools/benchmark_replicas.py                      # cnn, batch 64, R=1,2
  python tools/benchmark_replicas.py --model=small_resnet --input_shape=32,32,3 \
      --global_batch=64 --steps=10
  python tools/benchmark_replicas.py --tiny               # smoke test (seconds)

Prints, for each replica count, the seconds per example of DPQuantOptimizer
training (same global batch, tracing excluded), the ratio to one device
measured in the same run, and whether the per-example fast path was taken
(no jacobian fallback). Exits with status 1 when a target is missed (a
fallback, or a ratio above --max_ratio) and --check is set. The logic lives
in tools/benchmark_replicas_lib.py; docs/DISTRIBUTED.md explains the setup.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dpquant_tf  # noqa: E402,F401  (Keras 2 before TensorFlow)
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from tools import benchmark_replicas_lib as lib  # noqa: E402

_D = lib.Settings()
FLAGS = flags.FLAGS
flags.DEFINE_enum("model", _D.model, ["cnn", "small_resnet", "resnet18"],
                  "Model of dpquant_tf.models (tapped with tap_model).")
flags.DEFINE_list("input_shape", [str(v) for v in _D.input_shape],
                  "Input shape, e.g. 28,28,1.")
flags.DEFINE_integer("num_classes", _D.num_classes, "Output classes.")
flags.DEFINE_integer("global_batch", _D.global_batch,
                     "Examples per step over all replicas.")
flags.DEFINE_integer("steps", _D.steps, "Timed steps per replica count.")
flags.DEFINE_integer("warmup_steps", _D.warmup_steps,
                     "Untimed steps first (tracing).")
flags.DEFINE_list("replicas", [str(r) for r in _D.replicas],
                  "Replica counts; the first is the baseline (use 1).")
flags.DEFINE_bool("quantize", _D.quantize,
                  "quantize_model before tapping (QuantizedLayer taps).")
flags.DEFINE_bool("plain_baseline", False,
                  "Also plain SGD (no DP): the strategy's own overhead.")
flags.DEFINE_bool("tiny", False,
                  "Smoke test: cnn on 16x16x1 inputs, batch 8, 2 steps.")
flags.DEFINE_float("max_ratio", 1.5, "Target: ratio to one device at most.")
flags.DEFINE_bool("check", False, "Exit 1 when a target is missed.")
flags.DEFINE_bool("json", False, "Print JSON instead of a Markdown table.")


def main(argv):
  del argv
  settings = lib.Settings(
      model=FLAGS.model, input_shape=tuple(int(v) for v in FLAGS.input_shape),
      num_classes=FLAGS.num_classes, global_batch=FLAGS.global_batch,
      steps=FLAGS.steps, warmup_steps=FLAGS.warmup_steps,
      replicas=tuple(int(r) for r in FLAGS.replicas), quantize=FLAGS.quantize,
      plain_baseline=FLAGS.plain_baseline)
  if FLAGS.tiny:
    settings = lib.Settings(
        model="cnn", input_shape=(16, 16, 1), num_classes=3, global_batch=8,
        steps=2, warmup_steps=1, replicas=settings.replicas,
        quantize=FLAGS.quantize, plain_baseline=FLAGS.plain_baseline)
  report = lib.run(settings)
  print(lib.to_json(report) if FLAGS.json else lib.markdown(report))
  missed = lib.check_target(report, max_ratio=FLAGS.max_ratio)
  for line in missed:
    print("MISSED:", line)
  if FLAGS.check and missed:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)

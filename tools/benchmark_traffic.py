r"""Bytes exchanged per DP step under tf.distribute: float32 vs b-bit codes.

  python tools/benchmark_traffic.py
  python tools/benchmark_traffic.py --model=small_resnet --global_batch=512 \
      --replicas=2,4,8 --b_start=2 --b_end=8 --epochs=7 --json

Prints, for every epoch of a bit-ramp schedule and every replica count, the
payload one replica sends per step: the float32 noised sum dpquant_tf
all-reduces, b-bit per-example codes plus one scale per example, and the
integer sum of grid codes a b-bit transport would all-reduce. The logic lives
in tools/benchmark_traffic_lib.py; docs/DISTRIBUTED.md has the table.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dpquant_tf  # noqa: E402,F401  (Keras 2 before TensorFlow)
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from tools import benchmark_traffic_lib as lib  # noqa: E402

_D = lib.Settings()
FLAGS = flags.FLAGS
flags.DEFINE_enum("model", _D.model, ["cnn", "small_resnet", "resnet18"],
                  "Model of dpquant_tf.models.")
flags.DEFINE_list("input_shape", [str(v) for v in _D.input_shape],
                  "Input shape, e.g. 28,28,1.")
flags.DEFINE_integer("num_classes", _D.num_classes, "Output classes.")
flags.DEFINE_integer("global_batch", _D.global_batch,
                     "Examples per step over all replicas.")
flags.DEFINE_list("replicas", [str(r) for r in _D.replicas],
                  "Replica counts to tabulate.")
flags.DEFINE_integer("b_start", _D.b_start, "Gradient bits at epoch 0.")
flags.DEFINE_integer("b_end", _D.b_end, "Gradient bits at the ramp's end.")
flags.DEFINE_integer("epochs", _D.epochs, "Ramp length in epochs.")
flags.DEFINE_enum("ramp", _D.ramp, ["linear", "exponential"], "Ramp shape.")
flags.DEFINE_bool("json", False, "Print JSON instead of a Markdown table.")


def main(argv):
  del argv
  settings = lib.Settings(
      model=FLAGS.model, input_shape=tuple(int(v) for v in FLAGS.input_shape),
      num_classes=FLAGS.num_classes, global_batch=FLAGS.global_batch,
      replicas=tuple(int(r) for r in FLAGS.replicas), b_start=FLAGS.b_start,
      b_end=FLAGS.b_end, epochs=FLAGS.epochs, ramp=FLAGS.ramp)
  report = lib.run(settings)
  print(lib.to_json(report) if FLAGS.json else lib.markdown(report))


if __name__ == "__main__":
  app.run(main)

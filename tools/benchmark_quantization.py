r"""Train-step cost of quantized compute: plain vs wrapped (0/50/100 percent).

  python tools/benchmark_quantization.py
  python tools/benchmark_quantization.py --batch_size=128 --rounds=9 --jit_compile

Prints median ms per step of the tutorial CNN, unwrapped and wrapped with 0,
50 and 100 percent of its layers quantized, and the ratios to the unwrapped
model, from one run (contenders alternate round by round). The logic lives in
tools/benchmark_quantization_lib.py; docs/QUANTIZATION.md records results.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dpquant_tf  # noqa: E402,F401  (Keras 2 before TensorFlow)
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from tools import benchmark_quantization_lib as lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch_size", 64, "Examples per step.")
flags.DEFINE_integer("rounds", 7, "Timed rounds (median over rounds).")
flags.DEFINE_integer("steps", 5, "Steps per contender per round.")
flags.DEFINE_integer("warmup", 3, "Warm-up steps per contender.")
flags.DEFINE_bool("jit_compile", False, "Compile every step with XLA.")
flags.DEFINE_string("fwd_format", "int4_sawb", "Forward format of quantized layers.")
flags.DEFINE_integer("fwd_bits", 4, "Forward bits.")
flags.DEFINE_string("bwd_format", "luq_fp4", "Backward format of quantized layers.")
flags.DEFINE_integer("bwd_bits", 4, "Backward bits.")
flags.DEFINE_integer("seed", 0, "Seed of weights and batch.")
flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")


def main(argv):
  del argv
  settings = lib.Settings(
      batch_size=FLAGS.batch_size, rounds=FLAGS.rounds, steps=FLAGS.steps,
      warmup=FLAGS.warmup, jit_compile=FLAGS.jit_compile,
      fwd_format=FLAGS.fwd_format, fwd_bits=FLAGS.fwd_bits,
      bwd_format=FLAGS.bwd_format, bwd_bits=FLAGS.bwd_bits, seed=FLAGS.seed)
  report = lib.run(settings, log=logging.info)
  print(lib.to_json(report) if FLAGS.json else lib.table(report))


if __name__ == "__main__":
  app.run(main)

r"""fp32 DP step with and without the shifted-window per-example conv contraction.

  python tools/benchmark_shifted.py --case=small_resnet:64
  python tools/benchmark_shifted.py --case=resnet18:32 --rounds=5 --steps=1

Builds two fp32 DP contenders (`tools/benchmark_lib.make_contender("dp")`) in
one process: one traced as the library runs (stride-1 convolutions with deep
patches contract one shifted input window per kernel tap,
``dpquant_tf.perexample._rules._shifted_contract``), one traced with that
choice switched off (patches for every convolution, as before 2026-12-05).
Rounds interleave the two (order alternating); prints the median ms per step
and patches / shifted (> 1: the shifted contraction is faster).
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dpquant_tf  # noqa: E402,F401  (Keras 2 before TensorFlow)
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import tensorflow as tf  # noqa: E402

from dpquant_tf import training  # noqa: E402
from dpquant_tf.perexample import _rules  # noqa: E402
from tools import benchmark_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("case", "small_resnet:64", "model:batch (benchmark_lib).")
flags.DEFINE_integer("rounds", 9, "Timed rounds (median).")
flags.DEFINE_integer("steps", 3, "Steps per contender per round.")
flags.DEFINE_integer("warmup", 3, "Warm-up steps per contender.")


def main(argv):
  del argv
  model_name, batch = FLAGS.case.split(":")
  batch = int(batch)
  settings = benchmark_lib.Settings()
  tf.keras.utils.set_random_seed(settings.seed)
  base = benchmark_lib.build_model(model_name)
  weights = base.get_weights()
  data = benchmark_lib.load_data(batch, base.input_shape[1:], model_name)
  batches = iter(data)
  chosen = _rules._use_shifted  # pylint: disable=protected-access
  funcs = {}
  for name, rule in (("shifted", chosen), ("patches", lambda *_: False)):
    _rules._use_shifted = rule  # pylint: disable=protected-access
    try:
      model, _ = benchmark_lib.make_contender("dp", model_name, batch,
                                              weights, settings)
      training.prepare_first_step(model, data)
      fn = model.make_train_function()
      for _ in range(FLAGS.warmup):   # traces with this rule
        fn(batches)
    finally:
      _rules._use_shifted = chosen  # pylint: disable=protected-access
    funcs[name] = fn
  times = {k: [] for k in funcs}
  for r in range(FLAGS.rounds):
    for name in (list(funcs) if r % 2 == 0 else list(funcs)[::-1]):
      t0 = time.perf_counter()
      for _ in range(FLAGS.steps):
        funcs[name](batches)
      times[name].append((time.perf_counter() - t0) / FLAGS.steps * 1e3)
  med = {k: statistics.median(v) for k, v in times.items()}
  per_round = statistics.median(
      p / s for p, s in zip(times["patches"], times["shifted"]))
  print(f"{FLAGS.case}: shifted {med['shifted']:.1f} ms, patches "
        f"{med['patches']:.1f} ms, patches/shifted "
        f"{med['patches'] / med['shifted']:.3f} (per-round median "
        f"{per_round:.3f}); load average {os.getloadavg()}")


if __name__ == "__main__":
  app.run(main)

r"""One contender traced with and without one of the library's fast paths.

  python tools/benchmark_switch.py --switch=shifted --case=small_resnet:64
  python tools/benchmark_switch.py --switch=fused_group_norm \
      --case=small_resnet:64 --contender=dp_bf16_100
  python tools/benchmark_switch.py --switch=shifted --case=resnet18:32 \
      --rounds=5 --steps=1

Builds the contender twice in one process
(`tools/benchmark_lib.make_contender`): once traced as the library runs,
once traced with the switch's fast path turned off. Rounds interleave the two
(order alternating); prints the median ms per step and off / on (> 1: the
fast path is faster). Switches:

* ``shifted``: stride-1 convolutions with deep patches contract one shifted
  input window per kernel tap (``perexample._rules._shifted_contract``);
  off: patches for every convolution (as before 2026-12-05).
* ``fused_group_norm``: tapped GroupNormalization runs as fused programs
  (``perexample._norms``) in the forward, backward and per-example rule;
  off: Keras' own layer and the general normalization rule (as before
  2026-12-05, second session).
* ``bf16_conv_contraction``: layers built for bf16 contract their
  per-example gradients on bf16 operands
  (``perexample._gradients._bf16_contraction``); off: float32 everywhere
  (slower than before 2026-12-05, when wide convolutions were already in
  bf16: use it with a bf16 contender to see the whole bf16 contraction).
* ``expanded_norm_params``: a fused GroupNorm takes its parameters as
  per-example copies, whose gradient (out of the backward program) is the
  per-example result (``perexample._taps.expand_norm_params``); off: the
  rule recomputes the normalization from the tap input (as before
  2026-12-05, third session).
* ``pinned``: the bf16 plan at ratio 1.0 (``--contender=dp_bf16_100``)
  builds pinned layers (``QuantizedLayer(switchable=False)``: no switch,
  bf16 taps); off: switchable layers, all switched on.
* ``bf16_group_norm_input``: a fused GroupNorm after a pinned bf16 layer
  reads its bf16 output (``perexample._taps.bf16_source``); off: the
  float32 cast of it.
* ``bf16_epilogue``: a pinned layer with a bias and a ReLU-like activation
  adds the bias and applies the activation in bf16, one cast after
  (``quantization._layers.bf16_epilogue``); off: the float32 bias and
  activation after the op's output cast (as before 2026-12-05, seventh
  session).
* ``bf16_one_hot_patches``: bf16 patches of depth 129-256 are copied by the
  one-hot convolution (``perexample._rules._identity_conv_max_depth``);
  off: ``extract_patches`` above depth 128, as in float32.
"""

import dataclasses
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
from dpquant_tf.perexample import _gradients  # noqa: E402
from dpquant_tf.perexample import _norms  # noqa: E402
from dpquant_tf.perexample import _rules  # noqa: E402
from dpquant_tf.perexample import _taps  # noqa: E402
from dpquant_tf.quantization import _layers  # noqa: E402
from tools import benchmark_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("case", "small_resnet:64", "model:batch (benchmark_lib).")
flags.DEFINE_enum("switch", "shifted", ["shifted", "fused_group_norm",
                                        "bf16_conv_contraction",
                                        "expanded_norm_params", "pinned",
                                        "bf16_group_norm_input",
                                        "bf16_epilogue",
                                        "bf16_one_hot_patches"],
                  "The fast path to turn off in the second copy.")
flags.DEFINE_string("contender", "dp", "benchmark_lib contender to build.")
flags.DEFINE_integer("rounds", 9, "Timed rounds (median).")
flags.DEFINE_integer("steps", 3, "Steps per contender per round.")
flags.DEFINE_integer("warmup", 3, "Warm-up steps per contender.")


_SWITCHES = {"shifted": (_rules, "_use_shifted"),
             "fused_group_norm": (_norms, "fusable"),
             "bf16_conv_contraction": (_gradients, "_bf16_contraction"),
             "expanded_norm_params": (_taps, "expand_norm_params"),
             "pinned": None,   # benchmark_lib.Settings.bf16_pinned
             "bf16_group_norm_input": (_taps, "bf16_source"),
             "bf16_epilogue": (_layers, "bf16_epilogue"),
             "bf16_one_hot_patches": (_rules, "_identity_conv_max_depth")}
# What the switched-off function answers (default False: a predicate).
_OFF = {"bf16_group_norm_input": None,   # a source finder: no bf16 source
        "bf16_one_hot_patches": _rules._IDENTITY_CONV_MAX_DEPTH}  # pylint: disable=protected-access


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
  module, attr = _SWITCHES[FLAGS.switch] or (None, None)
  chosen = getattr(module, attr) if module else None
  funcs = {}
  off = _OFF.get(FLAGS.switch, False)
  for name, rule in (("on", chosen), ("off", lambda *_, **__: off)):
    if module:
      setattr(module, attr, rule)
    try:
      model, _ = benchmark_lib.make_contender(
          FLAGS.contender, model_name, batch, weights,
          settings if module else dataclasses.replace(
              settings, bf16_pinned=name == "on"))
      training.prepare_first_step(model, data)
      fn = model.make_train_function()
      for _ in range(FLAGS.warmup):   # traces with this choice
        fn(batches)
    finally:
      if module:
        setattr(module, attr, chosen)
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
      off / on for off, on in zip(times["off"], times["on"]))
  print(f"{FLAGS.case} {FLAGS.contender}, {FLAGS.switch}: on {med['on']:.1f} "
        f"ms, off {med['off']:.1f} ms, off/on {med['off'] / med['on']:.3f} "
        f"(per-round median {per_round:.3f}); load average "
        f"{os.getloadavg()}")


if __name__ == "__main__":
  app.run(main)

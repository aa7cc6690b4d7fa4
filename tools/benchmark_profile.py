r"""Where one DP step's time goes: fp32 DP vs a bf16 plan, part by part and op by op.

  python tools/benchmark_profile.py --cases=small_resnet:64,encoder:64
  python tools/benchmark_profile.py --cases=cnn:256 --ops=0   # parts only

For each case and contender (``dp``: fp32 DP, quantization off; ``dp_bf16``:
every quantizable layer's op in bfloat16) it times, interleaved over rounds
(median), the parts of a step, each a ``tf.function`` of its own:

* ``forward``: the model's forward pass and the per-example loss;
* ``backward``: forward + the one backward pass to every layer's output
  (``perexample.collect``: the input gradients, no weight gradients);
* ``clip``: forward + backward + the clipped sum (per-example norms, ghost
  norms, clipped-sum contractions) = the DP gradient without noise;
* ``step``: Keras' train function (adds the noise and the update).

With ``--ops`` it also records one TensorFlow profiler trace per contender
(``tf.profiler.experimental``, 5 steps) and prints the op types that took the
most time, with their dtype share: ``bf16_share`` is the share of the step's
op time spent in ops whose inputs are bfloat16 (parsed from the trace's XPlane
protobuf; no TensorBoard plugin needed), and ``dtype_share`` the share per
dtype of the op's input (``T``/``Ta``/``SrcT`` attribute: float32, float64,
bfloat16, ``other`` for ops without one). Logic: tools/benchmark_lib.py builds
the models and contenders. Results: docs/PERFORMANCE.md.
"""

import collections
import glob
import json
import os
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dpquant_tf  # noqa: E402,F401  (Keras 2 before TensorFlow)
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tools import benchmark_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("cases", ["small_resnet:64", "encoder:64"], "model:batch pairs.")
flags.DEFINE_list("contenders", ["dp", "dp_bf16_100"], "Contenders (benchmark names).")
flags.DEFINE_integer("rounds", 5, "Timed rounds per part (median).")
flags.DEFINE_integer("steps", 2, "Calls per part per round.")
flags.DEFINE_integer("ops", 5, "Profiled steps per contender (0: no op profile).")
flags.DEFINE_integer("top", 12, "Op types listed per contender.")
flags.DEFINE_integer("names", 0, "Op names (graph nodes) listed per "
                     "contender, by time (0: none).")
flags.DEFINE_bool("parts", True, "Time the cumulative parts (forward, "
                  "backward, clip, step); false: the train step only (each "
                  "part holds its own buffers: the encoder's 8 part "
                  "functions took more than 13 GB).")
flags.DEFINE_enum("bf16_rounding", "nearest", ["nearest", "stochastic"],
                  "Rounding of the bf16 contenders' casts.")


def _parts(model, data):
  """tf.functions for the parts of one DP step (see module docstring)."""
  from dpquant_tf import perexample  # pylint: disable=g-import-not-at-top
  loss_fn = model.compiled_loss
  variables = model.trainable_variables
  clip = model.optimizer.l2_norm_clip_var

  def forward(x, y):
    with tf.GradientTape(persistent=True) as tape:
      loss = loss_fn(y, model(x, training=True))
    return loss, tape

  @tf.function
  def fwd(x, y):
    return forward(x, y)[0]

  @tf.function
  def bwd(x, y):
    loss, tape = forward(x, y)
    taps = perexample.collect(loss, variables, tape)
    return [g for *_, g in taps._layers]  # pylint: disable=protected-access

  @tf.function
  def clip_sum(x, y):
    loss, tape = forward(x, y)
    return perexample.collect(loss, variables, tape).clipped_sum(clip)[0]

  step = model.make_train_function()
  batch = next(data)
  return {"forward": lambda: fwd(*batch), "backward": lambda: bwd(*batch),
          "clip": lambda: clip_sum(*batch), "step": lambda: step(data)}


def _sync(out):
  for t in tf.nest.flatten(out):
    if hasattr(t, "numpy"):
      t.numpy()
      break


def _xplane_op_times(logdir):
  """{(op type, dtype class): microseconds} from the host plane of a trace."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top
  times = collections.Counter()
  for path in glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True):
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
      space.ParseFromString(f.read())
    for plane in space.planes:
      if not plane.name.startswith("/host:CPU"):
        continue
      meta = plane.event_metadata
      for line in plane.lines:
        for ev in line.events:
          name = meta[ev.metadata_id].name
          if ":" not in name or name.startswith("__inference") or "/" not in name:
            continue
          op_name, op_type = name.rsplit(":", 1)
          if op_type in ("PartitionedCall", "StatefulPartitionedCall", "If",
                         "StatelessIf", "While", "_Send", "_Recv", "Identity",
                         "NoOp", "Case", "StatelessCase"):
            continue
          times[(op_type, op_name)] += ev.duration_ps / 1e6
  return times


def _op_profile(fn, steps, dtypes):
  logdir = tempfile.mkdtemp(prefix="dpq_prof_")
  tf.profiler.experimental.start(logdir)
  for _ in range(steps):
    _sync(fn())
  tf.profiler.experimental.stop()
  times = _xplane_op_times(logdir)
  by_type = collections.Counter()
  by_dtype = collections.Counter()
  by_name = collections.Counter()
  for (op_type, op_name), us in times.items():
    dtype = dtypes(op_name)
    mark = {"bfloat16": " [bf16]", "float64": " [f64]"}.get(dtype, "")
    by_type[op_type + mark] += us / steps
    by_dtype[dtype] += us / steps
    by_name[f"{op_name} ({op_type}{mark})"] += us / steps
  total = sum(by_type.values())
  return by_type, total, by_dtype, by_name


def _graph_dtypes(model, data):
  """A resolver: traced op name -> dtype of its input ('other' if unknown).

  Ops inside ``tf.cond`` branches are traced as ``<cond>/then/_N/<node>``
  (or ``else``): the name is resolved through the If node's branch function,
  recursively, so a branch's bf16 op and the other branch's float32 op of
  the same name are told apart.
  """
  fn = model.train_function
  try:
    concrete = fn.get_concrete_function(data)
  except Exception:  # pylint: disable=broad-except
    return lambda name: "other"
  gdef = concrete.graph.as_graph_def()
  functions = {f.signature.name: {n.name: n for n in f.node_def}
               for f in gdef.library.function}
  top = {n.name: n for n in gdef.node}

  def dtype_of(node):
    for attr in ("T", "Ta", "SrcT", "dtype"):
      if attr in node.attr and node.attr[attr].type:
        return tf.as_dtype(node.attr[attr].type).name
    return "other"

  def resolve(name, nodes):
    if name in nodes:
      return dtype_of(nodes[name])
    m = re.match(r"^(.*?)/(then|else)/_\d+/(.*)$", name)
    if m and m.group(1) in nodes:
      attr = "then_branch" if m.group(2) == "then" else "else_branch"
      branch = nodes[m.group(1)].attr[attr].func.name
      if branch in functions:
        return resolve(m.group(3), functions[branch])
    return "other"

  return lambda name: resolve(name, top)


def main(argv):
  del argv
  s = benchmark_lib.Settings(bf16_rounding=FLAGS.bf16_rounding,
                             contenders=tuple(FLAGS.contenders))
  report = {"uptime_load": os.getloadavg(), "cases": []}
  for spec in FLAGS.cases:
    name, batch = spec.split(":")
    batch = int(batch)
    tf.keras.utils.set_random_seed(0)
    base = benchmark_lib.build_model(name)
    weights = base.get_weights()
    data = iter(benchmark_lib.load_data(batch, base.input_shape[1:], name))
    parts, models = {}, {}
    for kind in FLAGS.contenders:
      model, _ = benchmark_lib.make_contender(kind, name, batch, weights, s)
      model.train_function = model.make_train_function()
      parts[kind] = _parts(model, data)
      if not FLAGS.parts:
        parts[kind] = {"step": parts[kind]["step"]}
      models[kind] = model
      for fn in parts[kind].values():
        _sync(fn())
        _sync(fn())
    times = {(k, p): [] for k in parts for p in parts[k]}
    for r in range(FLAGS.rounds):
      for kind in FLAGS.contenders[r % 2:] + FLAGS.contenders[:r % 2]:
        for part, fn in parts[kind].items():
          t0 = time.perf_counter()
          for _ in range(FLAGS.steps):
            out = fn()
          _sync(out)
          times[(kind, part)].append((time.perf_counter() - t0) / FLAGS.steps * 1e3)
    case = {"model": name, "batch_size": batch, "load": os.getloadavg()[0]}
    print(f"\n== {name} b={batch} (load {os.getloadavg()[0]:.1f}); median ms, "
          "cumulative parts")
    names = [p for p in ("forward", "backward", "clip", "step")
             if p in parts[FLAGS.contenders[0]]]
    print("contender     " + " ".join(f"{p:>8}" for p in names))
    for kind in FLAGS.contenders:
      med = {p: statistics.median(times[(kind, p)]) for p in parts[kind]}
      case[kind] = {p: round(v, 2) for p, v in med.items()}
      print(f"{kind:<13} " + " ".join(f"{med[p]:8.1f}" for p in names))
    if FLAGS.ops:
      for kind in FLAGS.contenders:
        dtypes = _graph_dtypes(models[kind], data)
        by_type, total, by_dtype, by_name = _op_profile(
            parts[kind]["step"], FLAGS.ops, dtypes)
        case[kind]["op_ms"] = round(total / 1e3, 2)
        case[kind]["bf16_share"] = (round(by_dtype["bfloat16"] / total, 3)
                                    if total else None)
        case[kind]["dtype_share"] = {k: round(v / total, 3)
                                     for k, v in by_dtype.most_common()}
        print(f"-- {kind}: op time by dtype of the op's input: " + ", ".join(
            f"{k} {v / total:.1%}" for k, v in by_dtype.most_common()))
        case[kind]["top_ops"] = {k: round(v / 1e3, 2)
                                 for k, v in by_type.most_common(FLAGS.top)}
        print(f"-- {kind}: op time {total / 1e3:.1f} ms/step (summed over threads), "
              f"bf16 share {case[kind]['bf16_share']}")
        for op, us in by_type.most_common(FLAGS.top):
          print(f"   {op:<40} {us / 1e3:7.2f} ms  {us / total:6.1%}")
        if FLAGS.names:
          print(f"-- {kind}: op names by time")
          for op, us in by_name.most_common(FLAGS.names):
            print(f"   {us / 1e3:7.2f} ms  {op}")
    report["cases"].append(case)
  print("\nJSON " + json.dumps(report))


if __name__ == "__main__":
  app.run(main)

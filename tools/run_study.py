r"""The reproduction study of DPQuant's claims (docs/RESULTS.md).

Runs the grid of tools/run_study_lib.py on real MNIST digits (offline), the
TF-Privacy tutorial CNN, delta 1e-5, appending one JSON line per finished run
to --log and skipping runs already there (resumable):

  nohup python tools/run_study.py --log=runs/study.jsonl > runs/study.out 2>&1 &
  python tools/run_study.py --log=runs/study.jsonl --report   # tables only

Phases run in order (seed:epsilon:static, epsilon 'nodp' = plain SGD):
--phases=0:8:1,0:nodp:1,1:8:0,2:8:0,0:4:1,1:nodp:0,1:4:0,2:nodp:0,2:4:0
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dpquant_tf  # noqa: E402,F401
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from tools import run_study_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("log", "runs/study.jsonl", "JSONL log (appended; resumable).")
flags.DEFINE_list("phases", ["0:8:1", "0:nodp:1", "1:8:0", "2:8:0", "0:4:1",
                             "1:nodp:0", "1:4:0", "2:nodp:0", "2:4:0"],
                  "seed:epsilon:with_static blocks in run order.")
flags.DEFINE_list("ratios", ["0.5", "0.75", "0.9"], "Quantized fractions.")
flags.DEFINE_list("formats", ["luq_fp4"], "Quantization formats.")
flags.DEFINE_integer("n_subsets", 5, "Static random subsets per ratio.")
flags.DEFINE_string("dataset", "mnist", "Dataset spec.")
flags.DEFINE_string("model", "cnn", "Model.")
flags.DEFINE_integer("epochs", 5, "Epochs per run.")
flags.DEFINE_integer("batch_size", 64, "Expected batch size.")
flags.DEFINE_float("learning_rate", 0.5, "Learning rate of the DP runs.")
flags.DEFINE_float("nodp_learning_rate", 0.1, "Learning rate of the non-DP runs.")
flags.DEFINE_float("l2_norm_clip", 1.0, "Clip norm.")
flags.DEFINE_float("delta", 1e-5, "Delta.")
flags.DEFINE_integer("max_train", None, "Training subset size.")
flags.DEFINE_integer("max_runs", None, "Stop after this many new runs.")
flags.DEFINE_boolean("report", False, "Only print the Markdown tables of --log.")
flags.DEFINE_boolean("dry_run", False, "Only list the run ids.")
flags.DEFINE_string("export_compact", None, "With --report: also write the "
                    "successful runs, compacted, one JSON line each, to this path.")


def _phases():
  out = []
  for item in FLAGS.phases:
    seed, eps, static = item.split(":")
    out.append(run_study_lib.Phase(
        seed=int(seed), epsilon=None if eps == "nodp" else float(eps),
        with_static=static not in ("0", "false", "no")))
  return out


def main(argv):
  del argv
  if FLAGS.report:
    records = run_study_lib.load_log(FLAGS.log)
    print(run_study_lib.markdown_report(records))
    if FLAGS.export_compact:
      import json  # pylint: disable=g-import-not-at-top
      with open(FLAGS.export_compact, "w") as f:
        for rec in sorted(records, key=lambda r: r.get("finished_utc") or ""):
          f.write(json.dumps(run_study_lib.compact_record(rec)) + "\n")
    return
  from dpquant_tf import data, models, quantization  # pylint: disable=g-import-not-at-top,g-multiple-import
  ds = data.load_dataset(FLAGS.dataset, max_test=10)
  layer_names = [info.name for info in quantization.quantizable_layers(
      quantization.quantize_model(models.build_model(FLAGS.model, ds.input_shape,
                                                     ds.num_classes)))]
  common = dict(dataset=FLAGS.dataset, model=FLAGS.model, epochs=FLAGS.epochs,
                batch_size=FLAGS.batch_size, learning_rate=FLAGS.learning_rate,
                l2_norm_clip=FLAGS.l2_norm_clip, delta=FLAGS.delta,
                max_train=FLAGS.max_train, verbose=2)
  runs = run_study_lib.study_runs(
      layer_names=layer_names, phases=_phases(),
      ratios=[float(r) for r in FLAGS.ratios], n_subsets=FLAGS.n_subsets,
      formats=FLAGS.formats, common=common,
      nodp_overrides={"learning_rate": FLAGS.nodp_learning_rate})
  if FLAGS.dry_run:
    for spec in runs:
      print(spec.run_id)
    print(f"{len(runs)} runs")
    return
  done = run_study_lib.run_study(runs, FLAGS.log, max_runs=FLAGS.max_runs)
  print(f"[study] executed {done} runs; log: {FLAGS.log}")


if __name__ == "__main__":
  app.run(main)

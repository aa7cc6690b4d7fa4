r"""The reproduction study of DPQuant's claims (docs/RESULTS.md).

Runs the grid of tools/run_study_lib.py on real MNIST digits (offline), the
TF-Privacy tutorial CNN, delta 1e-5, appending one JSON line per finished run
to --log and skipping runs already there (resumable):

  nohup python tools/run_study.py --log=runs/study.jsonl > runs/study.out 2>&1 &
  python tools/run_study.py --log=runs/study.jsonl --report   # tables only

Phases run in order (seed:epsilon:static, epsilon 'nodp' = plain SGD):
--phases=0:8:1,0:nodp:1,1:8:0,2:8:0,0:4:1,1:nodp:0,1:4:0,2:nodp:0,2:4:0

--grid=small_resnet runs the paired study of the small ResNet with GroupNorm
instead (tools/study_grid_lib.py): seeds 0..--seeds-1, every policy of a seed
with the same --seed and research noise / sampling seeds (common random
numbers; train.py warns and the records note seeded noise), at --epsilon,
plus the non-DP runs of --nodp_policies. --sweep runs the short fp32 DP
learning-rate / epochs sweep instead (ids sweep-...; same log). The report:
tools/study_report.py --log=... --out_prefix=docs/<name>.

  nohup nice -n 19 python tools/run_study.py --grid=small_resnet \
      --log=runs/resnet_study.jsonl > runs/resnet_study.out 2>&1 &
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dpquant_tf  # noqa: E402,F401
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from tools import run_study_lib  # noqa: E402
from tools import study_grid_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("log", "runs/study.jsonl", "JSONL log (appended; resumable).")
flags.DEFINE_list("phases", ["0:8:1", "0:nodp:1", "1:8:0", "2:8:0", "0:4:1",
                             "1:nodp:0", "1:4:0", "2:nodp:0", "2:4:0"],
                  "seed:epsilon:with_static blocks in run order.")
flags.DEFINE_list("ratios", ["0.5", "0.75", "0.9"], "Quantized fractions.")
flags.DEFINE_list("formats", ["luq_fp4"], "Quantization formats.")
flags.DEFINE_integer("n_subsets", 5, "Static random subsets per ratio.")
flags.DEFINE_string("dataset", "mnist", "Dataset spec.")
flags.DEFINE_string("model", None, "Model (default: cnn; the small_resnet "
                    "grid always uses small_resnet).")
flags.DEFINE_integer("epochs", None, "Epochs per run (default 5 for the cnn "
                     "grid, 10 for small_resnet).")
flags.DEFINE_integer("batch_size", 64, "Expected batch size.")
flags.DEFINE_float("learning_rate", 0.5, "Learning rate of the DP runs.")
flags.DEFINE_float("nodp_learning_rate", 0.1, "Learning rate of the non-DP runs.")
flags.DEFINE_enum("nodp_optimizer", None, ["sgd", "adam", "adamw"],
                  "Optimizer of the non-DP runs (default: the DP runs' one).")
flags.DEFINE_float("l2_norm_clip", 1.0, "Clip norm.")
flags.DEFINE_float("delta", 1e-5, "Delta.")
flags.DEFINE_integer("max_train", None, "Training subset size.")
flags.DEFINE_integer("max_test", None, "Test subset size.")
flags.DEFINE_enum("grid", "cnn", ["cnn", "small_resnet", "transformer"],
                  "cnn: the first study (--phases); small_resnet: the paired "
                  "study; transformer: the same paired grid on the BERT-like "
                  "encoder (examples/train.py --model=transformer; dataset, "
                  "epochs, batch size and learning rate default to train.py's "
                  "transformer defaults unless given).")
flags.DEFINE_integer("seeds", 5, "small_resnet grid: pairing seeds 0..seeds-1.")
flags.DEFINE_integer("first_seed", 0, "small_resnet grid: first pairing seed.")
flags.DEFINE_float("epsilon", 8.0, "small_resnet grid: target epsilon.")
flags.DEFINE_integer("n_static", 1, "small_resnet grid: static subsets per seed.")
flags.DEFINE_list("policies", ["fp32", "static", "rotation", "dpquant"],
                  "small_resnet grid: DP policies run (kinds).")
flags.DEFINE_list("nodp_policies", ["fp32", "static"], "small_resnet grid: "
                  "policies also run without DP (empty: none).")
flags.DEFINE_boolean("sweep", False, "small_resnet grid: run the fp32 DP "
                     "learning-rate / epochs sweep instead of the study.")
flags.DEFINE_list("sweep_learning_rates", ["0.25", "0.5", "1.0", "2.0"],
                  "Learning rates of --sweep.")
flags.DEFINE_list("sweep_epochs", ["2", "5"], "Epochs of --sweep.")
flags.DEFINE_integer("max_runs", None, "Stop after this many new runs.")
flags.DEFINE_boolean("report", False, "Only print the Markdown tables of --log "
                     "(small_resnet grid: tools/study_report.py also writes "
                     "the plot and the compact results).")
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
  if FLAGS.report and FLAGS.grid == "small_resnet":
    from tools import study_report_lib  # pylint: disable=g-import-not-at-top
    print(study_report_lib.markdown_report(run_study_lib.load_log(FLAGS.log)))
    return
  if FLAGS.report:
    records = run_study_lib.load_log(FLAGS.log)
    print(run_study_lib.markdown_report(records))
    if FLAGS.export_compact:
      import json  # pylint: disable=g-import-not-at-top
      with open(FLAGS.export_compact, "w") as f:
        for rec in sorted(records, key=lambda r: r.get("finished_utc") or ""):
          f.write(json.dumps(run_study_lib.compact_record(rec)) + "\n")
    return
  resnet = FLAGS.grid == "small_resnet"
  text = FLAGS.grid == "transformer"
  model = ("small_resnet" if resnet else
           FLAGS.model or ("transformer" if text else "cnn"))
  if resnet and FLAGS.model not in (None, "small_resnet"):
    raise app.UsageError(f"--model={FLAGS.model} with --grid=small_resnet")
  if text and not model.startswith("transformer"):
    raise app.UsageError(f"--model={FLAGS.model} with --grid=transformer")
  common = dict(dataset=FLAGS.dataset, model=model,
                epochs=FLAGS.epochs or (10 if resnet else 5),
                batch_size=FLAGS.batch_size, learning_rate=FLAGS.learning_rate,
                l2_norm_clip=FLAGS.l2_norm_clip, delta=FLAGS.delta,
                max_train=FLAGS.max_train, max_test=FLAGS.max_test, verbose=2)
  if text:
    # train.py's --model=transformer defaults hold for the flags not given.
    for name in ("dataset", "epochs", "batch_size", "learning_rate"):
      if not FLAGS[name].present:
        common[name] = None
  from examples import train_lib  # pylint: disable=g-import-not-at-top
  from dpquant_tf import data, models, quantization  # pylint: disable=g-import-not-at-top,g-multiple-import
  defaults = train_lib.MODEL_DEFAULTS.get(model, {})
  ds = data.load_dataset(common["dataset"] or defaults.get("dataset", "mnist"),
                         max_test=10)
  layer_names = [info.name for info in quantization.quantizable_layers(
      quantization.quantize_model(models.build_model(
          model, ds.input_shape, ds.num_classes,
          **({"vocab_size": ds.vocab_size} if getattr(ds, "vocab_size", None) else {}))))]
  meta = None
  if resnet or text:
    runs, meta = _resnet_runs(layer_names, common), study_grid_lib.run_meta
  else:
    runs = _cnn_runs(layer_names, common)
  if FLAGS.dry_run:
    for spec in runs:
      print(spec.run_id)
    print(f"{len(runs)} runs")
    return
  done = run_study_lib.run_study(runs, FLAGS.log, max_runs=FLAGS.max_runs, meta=meta)
  print(f"[study] executed {done} runs; log: {FLAGS.log}")


def _resnet_runs(layer_names, common):
  if FLAGS.sweep:
    return study_grid_lib.sweep_grid(
        learning_rates=[float(x) for x in FLAGS.sweep_learning_rates],
        epochs=[int(x) for x in FLAGS.sweep_epochs], epsilon=FLAGS.epsilon,
        seed=FLAGS.first_seed, common=common)
  return study_grid_lib.study_grid(
      layer_names=layer_names,
      seeds=range(FLAGS.first_seed, FLAGS.first_seed + FLAGS.seeds),
      ratios=[float(r) for r in FLAGS.ratios],
      formats=FLAGS.formats if FLAGS["formats"].present else
      study_grid_lib.default_formats(),
      epsilon=FLAGS.epsilon, n_static=FLAGS.n_static,
      dp_policies=FLAGS.policies, nodp_policies=FLAGS.nodp_policies,
      common=common, nodp_overrides=_nodp_overrides())


def _nodp_overrides():
  out = {"learning_rate": FLAGS.nodp_learning_rate}
  if FLAGS.nodp_optimizer:
    out["optimizer"] = FLAGS.nodp_optimizer
  return out


def _cnn_runs(layer_names, common):
  return run_study_lib.study_runs(
      layer_names=layer_names, phases=_phases(),
      ratios=[float(r) for r in FLAGS.ratios], n_subsets=FLAGS.n_subsets,
      formats=FLAGS.formats, common=common,
      nodp_overrides=_nodp_overrides())


if __name__ == "__main__":
  app.run(main)

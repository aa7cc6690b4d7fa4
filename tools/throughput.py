r"""Theoretical speed-up of a DPQuant run from the paper's cost model.

From a training run's metrics (examples/train.py --metrics_json=...):

  python tools/throughput.py --metrics_json=/tmp/metrics.json

For a model and a plan (layer=format pairs, other layers full precision):

  python tools/throughput.py --model=cnn --plan=conv1=fp4,conv2=fp4,dense1=fp4

Options: --speedups=fp4=4,fp8=2 (s per format against FP16),
--overhead_fraction (T_overhead / T_train), --analysis_fraction.
The cost model lives in dpquant_tf.costmodel; tools/throughput_lib.py holds
the flag parsing and the metrics report.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dpquant_tf  # noqa: E402,F401
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from dpquant_tf import costmodel  # noqa: E402
from tools import throughput_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("metrics_json", None, "A metrics JSON written by examples/train.py.")
flags.DEFINE_string("model", "cnn", "Model (when no --metrics_json): cnn | small_resnet | resnet18.")
flags.DEFINE_list("input_shape", ["28", "28", "1"], "Input shape H,W,C (with --model).")
flags.DEFINE_integer("num_classes", 10, "Classes (with --model).")
flags.DEFINE_list("plan", [], "layer=format pairs quantized in both passes (with --model).")
flags.DEFINE_string("speedups", "", "format=s pairs overriding the defaults "
                    f"{costmodel.DEFAULT_SPEEDUPS}.")
flags.DEFINE_float("overhead_fraction", 0.0, "T_overhead / T_train.")
flags.DEFINE_float("analysis_fraction", 0.0, "T_analysis / T_train (with --model).")


def main(argv):
  del argv
  speedups = throughput_lib.parse_speedups(FLAGS.speedups)
  if FLAGS.metrics_json:
    with open(FLAGS.metrics_json) as f:
      metrics = json.load(f)
    report = throughput_lib.report_from_metrics(
        metrics, speedups=speedups, overhead_fraction=FLAGS.overhead_fraction)
  else:
    from dpquant_tf import models  # pylint: disable=g-import-not-at-top
    model = models.build_model(FLAGS.model, tuple(int(d) for d in FLAGS.input_shape),
                               FLAGS.num_classes)
    layers = costmodel.model_layer_costs(model)
    plan = dict(item.split("=", 1) for item in FLAGS.plan)
    cost = costmodel.epoch_cost(
        layers, plan, speedups=speedups, analysis_fraction=FLAGS.analysis_fraction,
        overhead_fraction=FLAGS.overhead_fraction)
    report = {"per_epoch": [{"epoch": 0, "quantized_fraction": cost.quantized_fraction,
                             "speedup": cost.speedup,
                             "quantized_layers": cost.quantized_layers}],
              "run_speedup": cost.speedup}
  for e in report["per_epoch"]:
    print(f"epoch {e['epoch']}: p={e['quantized_fraction']:.3f} "
          f"speedup={e['speedup']:.3f}x quantized={','.join(e['quantized_layers'])}")
  print(f"run speedup (theoretical): {report['run_speedup']:.3f}x")


if __name__ == "__main__":
  app.run(main)

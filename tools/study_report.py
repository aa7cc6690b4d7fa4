r"""Regenerates the paired small-ResNet study's report from its log, in one go.

  python tools/study_report.py --log=runs/resnet_study.jsonl \
      --out_prefix=docs/resnet_study

writes <prefix>_results.jsonl (compact per-run results), <prefix>_report.md
(cells, the per-claim table with intervals and verdicts, the sweep) and
<prefix>_compute.png (accuracy against measured train seconds and modelled
compute), and prints the Markdown. The logic is in tools/study_report_lib.py;
the statistics in tools/study_stats_lib.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import dpquant_tf  # noqa: E402,F401
from tools import run_study_lib  # noqa: E402
from tools import study_report_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("log", None, "Study log (JSONL) of tools/run_study.py "
                    "--grid=small_resnet (or a compact results file).")
flags.DEFINE_string("out_prefix", None, "Write <prefix>_results.jsonl, "
                    "<prefix>_report.md and <prefix>_compute.png.")
flags.DEFINE_float("fp32_margin", study_report_lib.FP32_MARGIN,
                   "Margin of the 'DPQuant - fp32 DP' claim (points).")
flags.DEFINE_float("nodp_margin", None, "Also judge 'fp32 DP - non-private' "
                   "at this margin (points, e.g. -10), when the log has "
                   "non-private fp32 runs.")
flags.DEFINE_float("alpha", 0.05, "Family-wise error level (Holm).")
flags.DEFINE_string("title", "Paired small-ResNet study", "Plot title.")
flags.mark_flag_as_required("log")


def main(argv):
  del argv
  records = run_study_lib.load_log(FLAGS.log)
  plot = None
  if FLAGS.out_prefix:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out_prefix)), exist_ok=True)
    with open(FLAGS.out_prefix + "_results.jsonl", "w") as f:
      f.write("".join(line + "\n" for line in study_report_lib.compact_lines(records)))
    if any(r["config"].get("dp", True) and not r["run_id"].startswith("sweep-")
           for r in records):
      plot = study_report_lib.plot_compute(records, FLAGS.out_prefix + "_compute.png",
                                           title=FLAGS.title)
  text = study_report_lib.markdown_report(
      records, fp32_margin=FLAGS.fp32_margin, alpha=FLAGS.alpha,
      nodp_margin=FLAGS.nodp_margin,
      plot=os.path.basename(plot) if plot else None)
  if FLAGS.out_prefix:
    with open(FLAGS.out_prefix + "_report.md", "w") as f:
      f.write(text + "\n")
  print(text)


if __name__ == "__main__":
  app.run(main)

r"""Draws test accuracy against theoretical compute from training results.

  python tools/pareto.py --results=runs/study.jsonl --target_epsilon=8 \
      --out=docs/pareto_eps8.png

--results takes JSON files written by examples/train.py --metrics_json and/or
JSONL study logs written by tools/run_study.py. The logic lives in
tools/pareto_lib.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import dpquant_tf  # noqa: E402,F401
from tools import pareto_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("results", None, "JSON / JSONL result files.")
flags.DEFINE_string("out", "pareto.png", "Output PNG path.")
flags.DEFINE_float("target_epsilon", None, "Only DP runs at this epsilon.")
flags.DEFINE_boolean("include_nondp", False, "Also draw the non-DP runs.")
flags.DEFINE_string("title", None, "Plot title.")
flags.mark_flag_as_required("results")


def main(argv):
  del argv
  results = pareto_lib.load_results(FLAGS.results)
  results = pareto_lib.filter_results(results, target_epsilon=FLAGS.target_epsilon)
  title = FLAGS.title or ("Accuracy vs theoretical compute" + (
      f" (epsilon={FLAGS.target_epsilon:g})" if FLAGS.target_epsilon else ""))
  pareto_lib.plot_pareto(results, FLAGS.out, title=title,
                         include_nondp=FLAGS.include_nondp)
  for row in pareto_lib.summarize(results):
    print(f"{row['category']:9s} ratio={row['ratio']} dp={row['dp']} "
          f"eps={row['target_epsilon']} n={row['n']} "
          f"acc={100 * row['accuracy_mean']:.2f}+-{100 * row['accuracy_std']:.2f} "
          f"compute={row['compute_mean']:.3f}")
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)

r"""Privacy of a planned DPQuant run, or the noise for a target epsilon.

  python tools/compute_dpquant_privacy.py --dataset_size=60000 \
      --batch_size=256 --noise_multiplier=1.1 --epochs=60 --delta=1e-5
  python tools/compute_dpquant_privacy.py --dataset_size=60000 \
      --batch_size=256 --target_epsilon=3 --epochs=60 --analysis_period=2 --json
  python tools/compute_dpquant_privacy.py --N=60000 --batch_size=256 \
      --noise_multiplier=1.1 --epochs=60 --delta=1e-5   # TF-Privacy's flags

With --json it prints one JSON object (epsilon, noise_multiplier, steps,
analysis_epsilon_share, statement, ...).
Logic: tools/compute_dpquant_privacy_lib.py.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dpquant_tf  # noqa: E402,F401  (Keras 2 before TensorFlow)
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from dpquant_tf import _cli  # noqa: E402

from tools import compute_dpquant_privacy_lib as lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("dataset_size", None, "N, examples in the training set.")
flags.DEFINE_float("batch_size", None, "Expected batch size B (q = B / N).")
flags.DEFINE_float("epochs", None, "Planned epochs.")
flags.DEFINE_float("delta", 1e-5, "Target delta.")
flags.DEFINE_float("noise_multiplier", None,
                   "Noise multiplier; omit and give --target_epsilon for the "
                   "inverse.")
flags.DEFINE_float("target_epsilon", None, "Find the noise for this epsilon.")
flags.DEFINE_integer("analysis_period", 0,
                     "Loss-sensitivity analysis every this many epochs "
                     "(0 = none).")
flags.DEFINE_float("analysis_sampling_rate", 0.05, "q_a of each analysis.")
flags.DEFINE_float("analysis_noise_multiplier", 4.0, "sigma_a of each "
                   "analysis.")
flags.DEFINE_enum("accountant", "rdp", ["rdp", "pld"], "Accountant.")
flags.DEFINE_enum("sampling", "poisson", ["poisson", "shuffled"],
                  "How batches are formed (changes the statement).")
flags.DEFINE_bool("json", False, "Print one JSON object.")
# TF-Privacy's compute_dp_sgd_privacy flag names (--N, --batch_size,
# --noise_multiplier, --epochs, --delta) work too; only --N differs.
flags.DEFINE_alias("N", "dataset_size")
flags.mark_flags_as_required(["dataset_size", "batch_size", "epochs"])


def main(argv):
  del argv
  try:
    plan, result = _plan_and_run()
  except (ValueError, TypeError) as e:
    _cli.usage_exit(e)
  _print(plan, result)


def _plan_and_run():
  plan = lib.PrivacyPlan(
      dataset_size=FLAGS.dataset_size, batch_size=FLAGS.batch_size,
      epochs=FLAGS.epochs, delta=FLAGS.delta,
      noise_multiplier=FLAGS.noise_multiplier,
      target_epsilon=FLAGS.target_epsilon,
      analysis_period=FLAGS.analysis_period,
      analysis_sampling_rate=FLAGS.analysis_sampling_rate,
      analysis_noise_multiplier=FLAGS.analysis_noise_multiplier,
      accountant=FLAGS.accountant, sampling=FLAGS.sampling)
  return plan, lib.run(plan)


def _print(plan, result):
  if FLAGS.json:
    print(json.dumps(result))
    return
  print(f"noise multiplier {result['noise_multiplier']:.6g}, "
        f"{result['steps']} steps at q = {result['sampling_probability']:.6g}"
        f", {result['analysis_releases']} analysis releases")
  print(f"epsilon = {result['epsilon']:.6g} at delta = {plan.delta:g} "
        f"(training alone {result['training_epsilon']:.6g}; analysis share "
        f"{100 * result['analysis_epsilon_share']:.2f}%)\n")
  print(result["statement"])


if __name__ == "__main__":
  app.run(main, flags_parser=_cli.one_line_flags_parser())

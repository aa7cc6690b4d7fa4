r"""Serves predictions from a SavedModel exported by examples/train.py.

  python examples/train.py --epochs=1 --export_dir=/tmp/dpquant_export
  python examples/serve.py --export_dir=/tmp/dpquant_export

Or, without Python code, with TensorFlow's CLI (x.npy holds float32 images of
shape (N, 28, 28, 1) in [0, 1]):

  saved_model_cli run --dir /tmp/dpquant_export --tag_set serve \
      --signature_def serving_default --inputs images=x.npy

The logic lives in examples/serve_lib.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dpquant_tf  # noqa: E402,F401
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from examples import serve_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("export_dir", None, "Directory of the exported SavedModel.")
flags.DEFINE_string("dataset", "mnist", "Dataset whose test images are served.")
flags.DEFINE_integer("num_examples", 10, "How many predictions to print.")
flags.DEFINE_integer("max_test", None, "Serve at most this many test images.")
flags.mark_flag_as_required("export_dir")


def main(argv):
  del argv
  serve_lib.serve_main(FLAGS.export_dir, FLAGS.dataset,
                       num_examples=FLAGS.num_examples, max_test=FLAGS.max_test)


if __name__ == "__main__":
  app.run(main)

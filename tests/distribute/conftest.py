"""Logical CPU devices for the distribute tests.

TensorFlow fixes its devices when the runtime first initializes, so they are
configured here, when pytest imports this folder, before any test runs an op.
"""

import dpquant_tf  # noqa: F401  (Keras 2 first)
from dpquant_tf import distribute

NUM_CPU_DEVICES = 4

try:
  AVAILABLE_CPU_DEVICES = distribute.configure_cpu_devices(NUM_CPU_DEVICES)
except RuntimeError:  # the runtime was initialized by an earlier test module
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  AVAILABLE_CPU_DEVICES = len(tf.config.list_logical_devices("CPU"))

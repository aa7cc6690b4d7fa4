"""Small TensorFlow helpers shared by several subpackages (no dpquant deps)."""

from typing import Optional

import tensorflow as tf

__all__ = ["local_variable"]


def local_variable(initial_value, *, dtype=None, name: Optional[str] = None
                   ) -> tf.Variable:
  """A plain, non-distributed, non-trainable variable, also inside a scope.

  For host-side state such as the privacy ledger's records: under
  `MultiWorkerMirroredStrategy` every variable created in the scope is
  mirrored and its initial value is broadcast from the chief with collective
  ops, which do not carry `tf.string` (and need every worker to create the
  same variables in the same order). A local variable lives on this worker
  only and checkpoints like any variable.

  Args:
    initial_value: the initial value.
    dtype: optional dtype.
    name: optional name.

  Returns:
    A `tf.Variable` (never a distributed variable).
  """
  # pylint: disable=g-import-not-at-top
  from tensorflow.python.ops import resource_variable_ops
  # Constructing the concrete class directly skips the variable-creator stack
  # (where strategies install themselves); `tf.Variable(...)` would not.
  return resource_variable_ops.ResourceVariable(
      initial_value, dtype=dtype, name=name, trainable=False)

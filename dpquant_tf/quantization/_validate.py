"""Model validation for DP training: report every problem at once, fix BatchNorm.

`validate_model` is the one model check of dpquant_tf
(``dpquant_tf.privacy._model_checks``, also used by ``DPQuantOptimizer`` and
the callbacks): BatchNormalization by class, any layer whose state a training
step assigns from the batch, range-tracking tfmot quantizers, tapped layers
inside ``TimeDistributed``, Keras mixed-precision policies, undeclared
preprocessing state and layers or losses that couple the examples of a batch
(docs/METHOD.md invariants 1, 8 and 11). `fix_model`
replaces BatchNormalization with GroupNormalization, which normalizes within
each example; the other problems have no automatic fix.
"""

from typing import List, Optional

import tensorflow as tf

from dpquant_tf import _layer_kinds
from dpquant_tf import _validation
from dpquant_tf.privacy import _model_checks
from dpquant_tf.quantization import _model

UnsupportedModelError = _model_checks.UnsupportedModelError


def validate_model(model, *, strict: bool = True, input_signature=None,
                   loss=None, public_preprocessing=None) -> List[str]:
  """Lists every DP problem of a Keras model at once.

  Args:
    model: any tf.keras model (subclassed models are inspected too; they must
      have been called once, or pass `input_signature`).
    strict: raise `UnsupportedModelError` when there is a problem (default);
      False returns the list.
    input_signature: optional ``tf.TensorSpec`` (or nest) of one input batch,
      for models whose input shape Keras does not know.
    loss: per-example loss probed for batch independence with the model
      (default: the compiled loss, if any).
    public_preprocessing: names of preprocessing layers declared public
      (default: those of the optimizer's ``PrivacyLedger(public_state=)``).

  Returns:
    The problems, one line each (empty when the model is fine).

  Raises:
    UnsupportedModelError: `strict` and at least one problem.
  """
  _validation.check_type("model", model, tf.keras.layers.Layer, "a tf.keras model")
  if strict:
    _model_checks.check_model_privacy(
        model, input_signature=input_signature, loss=loss,
        public_preprocessing=public_preprocessing)
    return []
  return _model_checks.model_privacy_problems(
      model, input_signature=input_signature, loss=loss,
      public_preprocessing=public_preprocessing)


def _groups_for(channels: int, groups: Optional[int]) -> int:
  if groups is not None:
    if channels % groups:
      _validation.fail("groups", groups, f"a divisor of the {channels} channels")
    return groups
  return max(g for g in range(1, min(32, channels) + 1) if channels % g == 0)


def fix_model(model, *, groups: Optional[int] = None):
  """Clones a model with every BatchNormalization replaced by GroupNormalization.

  The new layer normalizes over the same channel axis with the same epsilon,
  center and scale; gamma and beta are copied (running statistics dropped).
  Other layers keep their weights. Problems that cannot be fixed (range-
  tracking tfmot quantizers) are then reported with `UnsupportedModelError`.

  Args:
    model: a built Sequential or Functional model (not modified).
    groups: number of groups (must divide the channels); default: the largest
      divisor of the channel count not above 32.

  Returns:
    The fixed clone (not compiled).
  """
  _model._check_graph_model(model, "fix_model")  # pylint: disable=protected-access
  if groups is not None:
    groups = _validation.check_int("groups", groups, low=1)

  def replace(layer):
    if not _layer_kinds.is_batch_norm(layer):
      return None
    axis = layer.axis
    if isinstance(axis, (list, tuple)):
      if len(axis) != 1:
        _validation.fail(f"{layer.name}.axis", axis, "a single channel axis")
      axis = axis[0]
    # moving_mean exists also with center=False, scale=False (no gamma/beta).
    channels = int(layer.moving_mean.shape[0])
    return tf.keras.layers.GroupNormalization(
        groups=_groups_for(channels, groups), axis=axis, epsilon=layer.epsilon,
        center=layer.center, scale=layer.scale,
        name=f"{layer.name}_groupnorm")

  def copy_weights(old, new):
    values = []
    if new.scale:
      values.append(old.gamma.numpy())
    if new.center:
      values.append(old.beta.numpy())
    new.set_weights(values)

  fixed = _model.clone_with(model, replace, copy_weights)
  validate_model(fixed, strict=True)
  return fixed

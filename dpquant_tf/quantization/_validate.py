"""Model validation for DP training: report every problem at once, fix BatchNorm.

Two kinds of layers break per-example independence (METHOD.md invariant 1):

* BatchNormalization normalizes each example with statistics of the whole
  batch (and updates running statistics from private batches without noise).
  `fix_model` replaces it with GroupNormalization, which normalizes within
  each example.
* Range-tracking quantizers of tensorflow-model-optimization
  (`MovingAverageQuantizer`, `AllValuesQuantizer`) on activations learn
  min/max ranges from private batches without noise. There is no automatic
  fix: use `quantize_model` (per-example scales) instead.
"""

from typing import List, Optional

import tensorflow as tf

from dpquant_tf import _validation
from dpquant_tf.quantization import _model

_RANGE_TRACKING = ("MovingAverageQuantizer", "AllValuesQuantizer")
_BATCH_NORMS = ("BatchNormalization", "BatchNormalizationBase",
                "SyncBatchNormalization")


class UnsupportedModelError(ValueError):
  """A model that cannot be trained with DP as is; the message lists why."""


def _class_names(obj):
  return {c.__name__ for c in type(obj).__mro__}


def _quantizers_of(module):
  """(role, quantizer) pairs of a tfmot QuantizeWrapper / QuantizeLayer."""
  found = []
  config = getattr(module, "quantize_config", None)
  inner = getattr(module, "layer", None)
  if config is not None and inner is not None:
    for getter, role in (("get_activations_and_quantizers", "activation"),):
      try:
        pairs = getattr(config, getter)(inner)
      except Exception:  # pylint: disable=broad-except
        pairs = []
      found += [(role, q) for _, q in pairs]
    try:
      found += [("output", q) for q in config.get_output_quantizers(inner)]
    except Exception:  # pylint: disable=broad-except
      pass
  quantizer = getattr(module, "quantizer", None)
  if quantizer is not None and "QuantizeLayer" in _class_names(module):
    found.append(("input", quantizer))
  return found


def _all_layers(model):
  """Every layer (nested ones included) in a stable, depth-first order."""
  seen, out = set(), []
  flatten = getattr(model, "_flatten_layers", None)
  modules = (list(flatten(include_self=True, recursive=True)) if flatten
             else [model] + list(model.submodules))
  for module in modules:
    if isinstance(module, tf.keras.layers.Layer) and id(module) not in seen:
      seen.add(id(module))
      out.append(module)
  return out


def validate_model(model, *, strict: bool = True) -> List[str]:
  """Lists every DP problem of a Keras model at once.

  Args:
    model: any tf.keras model (subclassed models are inspected too).
    strict: raise `UnsupportedModelError` when there is a problem (default);
      False returns the list.

  Returns:
    The problems, one line each (empty when the model is fine).

  Raises:
    UnsupportedModelError: `strict` and at least one problem.
  """
  _validation.check_type("model", model, tf.keras.layers.Layer, "a tf.keras model")
  problems = []
  for layer in _all_layers(model):
    names = _class_names(layer)
    if names & set(_BATCH_NORMS):
      problems.append(
          f"layer {layer.name!r} ({type(layer).__name__}): batch statistics "
          "couple the examples of a batch and are learned without noise; "
          "replace it with GroupNormalization (dpquant_tf.quantization."
          "fix_model(model) does this)")
    for role, quantizer in _quantizers_of(layer):
      bad = _class_names(quantizer) & set(_RANGE_TRACKING)
      if bad:
        problems.append(
            f"layer {layer.name!r}: tfmot {sorted(bad)[0]} on its {role} learns "
            "value ranges from private batches without noise; use "
            "dpquant_tf.quantization.quantize_model (per-example scales) instead")
  if problems and strict:
    raise UnsupportedModelError(
        f"The model has {len(problems)} problem(s) for differentially private "
        "training:\n  - " + "\n  - ".join(problems))
  return problems


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
    if not _class_names(layer) & set(_BATCH_NORMS):
      return None
    axis = layer.axis
    if isinstance(axis, (list, tuple)):
      if len(axis) != 1:
        _validation.fail(f"{layer.name}.axis", axis, "a single channel axis")
      axis = axis[0]
    channels = int(layer.gamma.shape[0] if layer.gamma is not None
                   else layer.beta.shape[0])
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

"""The one classifier of Keras layer kinds, and the one MAC counter.

Quantization (which layers ``QuantizedLayer`` wraps), per-example gradients
(which layers have a closed-form rule), the model checks and the cost model
all describe layers through :func:`layer_kind` and :func:`layer_macs`.
Wrappers that tap a layer (``QuantizedLayer``, ``TappedLayer``: objects with a
``tap_output`` attribute and the wrapped layer in ``layer``) are seen through.
"""

import enum
from typing import List, Optional

import numpy as np
import tensorflow as tf

__all__ = ["CONVS", "LayerKind", "QUANTIZABLE", "is_batch_norm", "kernel_of",
           "kernel_output_axes", "layer_kind", "layer_macs", "unwrap"]


class LayerKind(enum.Enum):
  """Kinds of Keras layers dpquant_tf knows how to quantize or differentiate."""
  DENSE = "dense"
  CONV1D = "conv1d"
  CONV2D = "conv2d"
  DEPTHWISE_CONV2D = "depthwise_conv2d"
  EINSUM_DENSE = "einsum_dense"
  EMBEDDING = "embedding"
  LAYER_NORM = "layer_norm"
  GROUP_NORM = "group_norm"


CONVS = frozenset({LayerKind.CONV1D, LayerKind.CONV2D})


# The kinds QuantizedLayer wraps (a kernel and a linear op).
QUANTIZABLE = frozenset({LayerKind.DENSE, LayerKind.CONV1D, LayerKind.CONV2D,
                         LayerKind.DEPTHWISE_CONV2D, LayerKind.EINSUM_DENSE})

_BATCH_NORM_NAMES = frozenset({"BatchNormalization", "BatchNormalizationBase",
                               "SyncBatchNormalization",
                               "BatchNormalizationV1", "BatchNormalizationV2"})


def unwrap(layer):
  """The layer a tapping wrapper (QuantizedLayer, TappedLayer) wraps, else itself."""
  if hasattr(layer, "tap_output") and getattr(layer, "layer", None) is not None:
    return layer.layer
  return layer


def layer_kind(layer) -> Optional[LayerKind]:
  """The kind of a plain Keras layer, or None when dpquant_tf has no rule for it.

  Tapping wrappers are not unwrapped here (see :func:`unwrap`): a wrapper is
  not itself a Dense or Conv layer.
  """
  layers = tf.keras.layers
  # Order matters: DepthwiseConv2D and the transposed/separable convs
  # subclass the base Conv.
  if isinstance(layer, layers.DepthwiseConv2D):
    return LayerKind.DEPTHWISE_CONV2D
  if isinstance(layer, (layers.Conv1DTranspose, layers.Conv2DTranspose,
                        layers.SeparableConv1D, layers.SeparableConv2D)):
    return None
  if isinstance(layer, layers.Conv2D):
    return LayerKind.CONV2D
  if isinstance(layer, layers.Conv1D):
    return LayerKind.CONV1D
  if isinstance(layer, layers.Dense):
    return LayerKind.DENSE
  if isinstance(layer, layers.EinsumDense):
    return LayerKind.EINSUM_DENSE
  if isinstance(layer, layers.Embedding):
    return LayerKind.EMBEDDING
  if isinstance(layer, layers.LayerNormalization):
    return LayerKind.LAYER_NORM
  if isinstance(layer, layers.GroupNormalization):
    return LayerKind.GROUP_NORM
  return None


def is_batch_norm(layer) -> bool:
  """True for BatchNormalization by class: any subclass, any name, any options.

  Covers ``tf.keras.layers.BatchNormalization`` and its subclasses (with or
  without ``center``/``scale``), ``SyncBatchNormalization`` and classes named
  like them in other Keras versions.
  """
  if isinstance(layer, tf.keras.layers.BatchNormalization):
    return True
  return bool({c.__name__ for c in type(layer).__mro__} & _BATCH_NORM_NAMES)


def kernel_of(layer):
  """The kernel variable of a Dense/Conv/DepthwiseConv2D/EinsumDense layer."""
  if layer_kind(layer) == LayerKind.DEPTHWISE_CONV2D:
    return layer.depthwise_kernel
  return layer.kernel


def _einsum_parts(equation):
  inputs, output = equation.split("->")
  _, kernel = inputs.split(",")
  return kernel, output


def kernel_output_axes(layer) -> List[int]:
  """Kernel axes that index output channels (kept in per-channel scales)."""
  kind = layer_kind(layer)
  rank = kernel_of(layer).shape.rank
  if kind == LayerKind.DEPTHWISE_CONV2D:
    return [rank - 2, rank - 1]
  if kind == LayerKind.EINSUM_DENSE:
    kernel, output = _einsum_parts(layer.equation)
    return [i for i, c in enumerate(kernel) if c in output]
  return [rank - 1]


def layer_macs(layer) -> int:
  """Forward multiply-adds per example of a quantizable layer (built, called).

  ``output positions x kernel size / output channels``: Dense ``in*out`` per
  position, Conv ``kh*kw*C_in/groups*C_out`` per output pixel, DepthwiseConv2D
  ``kh*kw*C*mult`` per pixel, EinsumDense by its equation. Unknown dimensions
  count 1. The backward pass (input and kernel gradients) is ``2 *`` this.
  Tapping wrappers are seen through; their output shape is used.

  Args:
    layer: a layer of a kind in :data:`QUANTIZABLE`, or a wrapper of one.

  Returns:
    The MAC count (0 for layers of other kinds).
  """
  inner = unwrap(layer)
  if layer_kind(inner) not in QUANTIZABLE:
    return 0
  shape = layer.get_output_shape_at(0)
  out = int(np.prod([d or 1 for d in tf.TensorShape(shape)[1:]]))
  kshape = kernel_of(inner).shape.as_list()
  out_channels = int(np.prod([kshape[i] for i in kernel_output_axes(inner)]))
  return out * int(np.prod(kshape)) // out_channels

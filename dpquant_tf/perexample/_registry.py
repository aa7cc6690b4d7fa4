"""Registry: which layer can produce the per-example gradient of a variable.

A *tapped* layer exposes, after each call, ``tap_input`` (the tensor fed to its
linear op) and ``tap_output`` (the op's output ``z``, before any activation or
backward-quantization identity), plus ``layer`` (the wrapped Keras layer that
owns the variables). ``QuantizedLayer`` (dpquant_tf.quantization) and
:class:`~dpquant_tf.perexample.TappedLayer` are tapped layers.

Tapped layers are held weakly (a ``weakref.WeakSet``): registering a layer never
keeps a model alive. The map from variable to layer is rebuilt from the live
registered layers at each lookup (at trace time, not per step), so it follows
variables created after registration (layers register when built or wrapped).
"""

import threading
import weakref
from typing import Dict, NamedTuple, Optional

import tensorflow as tf

from dpquant_tf import _layer_kinds

__all__ = ["LayerKind", "VarSlot", "kind_of", "record_tap", "register_tapped_layer",
           "registered_slots", "unregister_tapped_layer"]

_LOCK = threading.Lock()
_TAPPED = weakref.WeakSet()


LayerKind = _layer_kinds.LayerKind


class VarSlot(NamedTuple):
  """Where a variable sits: the tapped layer and the variable's role in it."""
  layer: object   # the tapped layer (has tap_input / tap_output)
  kind: LayerKind
  role: str       # "kernel", "bias", "embeddings", "gamma", "beta"


def kind_of(inner) -> Optional[LayerKind]:
  """The kind of a plain Keras layer, or None when there is no rule for it."""
  return _layer_kinds.layer_kind(inner)


_ROLES = {
    LayerKind.DENSE: ("kernel", "bias"),
    LayerKind.CONV1D: ("kernel", "bias"),
    LayerKind.CONV2D: ("kernel", "bias"),
    LayerKind.DEPTHWISE_CONV2D: ("depthwise_kernel", "bias"),
    LayerKind.EINSUM_DENSE: ("kernel", "bias"),
    LayerKind.EMBEDDING: ("embeddings",),
    LayerKind.LAYER_NORM: ("gamma", "beta"),
    LayerKind.GROUP_NORM: ("gamma", "beta"),
}


def register_tapped_layer(layer) -> None:
  """Registers a tapped layer (idempotent; held weakly).

  Args:
    layer: an object with a ``layer`` attribute (the wrapped Keras layer) that
      sets ``tap_input`` and ``tap_output`` on every call.
  """
  with _LOCK:
    _TAPPED.add(layer)


def record_tap(layer, tap_input, tap_output) -> None:
  """Records one call of a tapped layer: the one place taps are written.

  Sets ``layer.tap_input`` / ``layer.tap_output`` and, while tracing, counts
  the calls per graph in ``layer.tap_calls`` (a second call in one trace
  makes the fast path fall back for that layer).

  Args:
    layer: a registered tapped layer (``QuantizedLayer`` or ``TappedLayer``).
    tap_input: the tensor fed to the layer's linear op.
    tap_output: the op's output ``z``.
  """
  layer.tap_input = tap_input
  layer.tap_output = tap_output
  if not tf.executing_eagerly():
    graph = tf.compat.v1.get_default_graph()
    layer.tap_calls[graph] = layer.tap_calls.get(graph, 0) + 1


def unregister_tapped_layer(layer) -> None:
  """Removes a tapped layer from the registry (no-op if absent)."""
  with _LOCK:
    _TAPPED.discard(layer)


def registered_slots() -> Dict[object, VarSlot]:
  """Maps ``var.ref()`` to its :class:`VarSlot` for all live tapped layers."""
  with _LOCK:
    layers = list(_TAPPED)
  slots = {}
  for tapped in layers:
    inner = getattr(tapped, "layer", None)
    kind = kind_of(inner) if inner is not None else None
    if kind is None:
      continue
    for role in _ROLES[kind]:
      var = getattr(inner, role, None)
      if var is not None and hasattr(var, "ref"):
        slots[var.ref()] = VarSlot(tapped, kind, _role_name(role))
  return slots


def _role_name(role: str) -> str:
  return "kernel" if role == "depthwise_kernel" else role

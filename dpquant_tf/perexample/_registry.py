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

Taps are kept per trace and per replica: under ``tf.distribute`` strategies
that trace the step once per local replica in one graph (``MirroredStrategy``,
``MultiWorkerMirroredStrategy``), every replica calls each layer once, and the
gradient code of a replica reads the taps that replica recorded
(:func:`current_tap`). Graph-mode taps live on the graph they belong to (freed
with it); eager taps in a module-level map keyed weakly by layer.
"""

import threading
import weakref
from typing import Dict, NamedTuple, Optional

import tensorflow as tf

from dpquant_tf import _layer_kinds

__all__ = ["LayerKind", "Tap", "VarSlot", "current_tap", "example_validity",
           "kind_of",
           "record_tap", "register_tapped_layer", "registered_slots",
           "replica_key", "unregister_tapped_layer"]

_LOCK = threading.Lock()
_TAPPED = weakref.WeakSet()
_GRAPH_ATTR = "_dpquant_tf_taps"
_EAGER_TAPS = weakref.WeakKeyDictionary()   # layer -> {replica key: Tap}
_CROSS_REPLICA = "cross-replica"


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


class Tap(NamedTuple):
  """One replica's taps of a layer in one trace (or eagerly)."""
  tap_input: object
  tap_output: object
  calls: int      # calls by this replica in this trace (1 when eager)
  valid: object = None   # [B] bool: the example's inputs were in range
  # True: tap_output is ``[B, P]``, the layer's parameters copied per example
  # and used as such, so the gradient there is each example's parameter
  # gradient (``_rules.expanded_param_grads``); tap_input is the layer's input.
  expanded: bool = False


def replica_key():
  """A key that is static and distinct for each replica trace.

  ``MirroredStrategy`` and ``MultiWorkerMirroredStrategy`` trace the replica
  function once per local replica (each in its own thread, in one graph),
  with a Python ``int`` replica id in the replica context: that id is the
  key. Without a strategy the default replica context has id 0. Strategies
  that trace one program for all replicas (TPU) give a tensor id: one key
  (``None``). Cross-replica context has its own key.

  Returns:
    An ``int``, ``None`` or a string.
  """
  ctx = tf.distribute.get_replica_context()
  if ctx is None:
    return _CROSS_REPLICA
  # The public property wraps the id in a constant op; the attribute holds
  # the Python int (or a tensor) without adding ops to the trace.
  rid = getattr(ctx, "_replica_id_in_sync_group", None)  # pylint: disable=protected-access
  if rid is None:
    rid = tf.get_static_value(ctx.replica_id_in_sync_group)
  return None if rid is None or tf.is_tensor(rid) else int(rid)


def _store(create: bool):
  """The tap map of the current trace (eager: the module's), or None."""
  if tf.executing_eagerly():
    return _EAGER_TAPS
  graph = tf.compat.v1.get_default_graph()
  store = getattr(graph, _GRAPH_ATTR, None)
  if store is None and create:
    store = weakref.WeakKeyDictionary()
    setattr(graph, _GRAPH_ATTR, store)
  return store


def record_tap(layer, tap_input, tap_output, valid=None, *,
               expanded: bool = False) -> None:
  """Records one call of a tapped layer: the one place taps are written.

  Stores the taps under the current trace and replica (:func:`replica_key`),
  counting the calls of each replica in each trace (a second call by one
  replica in one trace makes the fast path fall back for that layer). Also
  sets ``layer.tap_input`` / ``layer.tap_output`` (the last call's tensors,
  whichever replica made it).

  Args:
    layer: a registered tapped layer (``QuantizedLayer`` or ``TappedLayer``).
    tap_input: the tensor fed to the layer's linear op.
    tap_output: the op's output ``z``.
    valid: optional ``[B]`` bool, False for an example whose input the layer
      could not use as given (an Embedding id outside ``[0, input_dim)``,
      replaced by a valid id before the lookup): such an example is given
      clip scale 0 on every path (:func:`example_validity`).
    expanded: ``tap_output`` holds the layer's parameters copied per example
      (``[B, P]``: ``gamma`` then ``beta``, those it has) and the layer used
      those copies: the gradient there is per example (see
      ``Tap.expanded``).
  """
  key = replica_key()
  eager = tf.executing_eagerly()
  with _LOCK:
    store = _store(create=True)
    per_replica = store.setdefault(layer, {})
    previous = per_replica.get(key)
    calls = 1 if eager or previous is None else previous.calls + 1
    if previous is not None and not eager and previous.valid is not None:
      valid = (previous.valid if valid is None
               else tf.logical_and(previous.valid, valid))
    per_replica[key] = Tap(tap_input, tap_output, calls, valid, expanded)
    layer.tap_input = tap_input
    layer.tap_output = tap_output


def current_tap(layer) -> Optional[Tap]:
  """The taps the current replica recorded for ``layer`` in the current trace.

  For a layer that never went through :func:`record_tap` in this trace (a
  tapped layer of another library that sets ``tap_input``/``tap_output``
  itself), the attributes, with ``tap_calls`` of this graph when it has one.

  Args:
    layer: a tapped layer.

  Returns:
    A :class:`Tap`, or None when the current replica did not call the layer
    in this trace (or the layer has no taps at all).
  """
  with _LOCK:
    store = _store(create=False)
    per_replica = store.get(layer) if store is not None else None
    if per_replica is not None:
      return per_replica.get(replica_key())
  x = getattr(layer, "tap_input", None)
  z = getattr(layer, "tap_output", None)
  if x is None or z is None:
    return None
  calls = 1
  counts = getattr(layer, "tap_calls", None)
  if counts is not None and not tf.executing_eagerly():
    calls = counts.get(tf.compat.v1.get_default_graph(), 1)
  return Tap(x, z, calls)


def example_validity(var_list):
  """AND of the validity masks recorded in this trace for ``var_list``'s layers.

  Reads the taps of the tapped layers that own a variable of ``var_list``,
  recorded in the current trace (graph) by the current replica, so a mask of
  another model, step or replica is never used.

  Args:
    var_list: the variables of the step.

  Returns:
    A ``[B]`` bool tensor, or None when no such layer recorded a mask.
  """
  slots = registered_slots()
  layers = {}
  for var in var_list:
    slot = slots.get(var.ref())
    if slot is not None:
      layers[id(slot.layer)] = slot.layer
  graph = None if tf.executing_eagerly() else tf.compat.v1.get_default_graph()
  masks = []
  for layer in layers.values():
    with _LOCK:
      store = _store(create=False)
      per_replica = store.get(layer) if store is not None else None
      tap = per_replica.get(replica_key()) if per_replica else None
    if tap is None or tap.valid is None:
      continue
    if graph is not None and getattr(tap.valid, "graph", graph) is not graph:
      continue
    masks.append(tf.cast(tap.valid, tf.bool))
  if not masks:
    return None
  out = masks[0]
  for mask in masks[1:]:
    out = tf.logical_and(out, mask)
  return out


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

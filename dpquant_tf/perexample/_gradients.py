"""per_example_gradients: one backward pass + per-layer rules, jacobian for the rest.

The optimizer (``DPQuantOptimizer._per_example_gradients``) hands over the
per-example loss vector, the variables and the ``tf.GradientTape`` that
recorded the forward pass. For every variable owned by a registered tapped
layer (see ``_registry``), the per-microbatch gradient is computed from the
layer's tap input and the gradient at its tap output, all of which come from a
single ``tape.gradient(loss, tap_outputs)``. Variables without a usable tap go
through ``fallback`` (the jacobian path, TF-Privacy's), for those variables
only when the tape is persistent. A non-persistent tape (Keras ``fit``) can run
only one backward computation, so if any variable needs the jacobian then,
all variables take the jacobian path. Either way a single log line names
the layers that fell back.
"""

from typing import Callable, List, Optional, Sequence

from absl import logging
import tensorflow as tf

from dpquant_tf import _validation
from dpquant_tf.perexample import _registry
from dpquant_tf.perexample import _rules

__all__ = ["jacobian_gradients", "per_example_gradients"]

_RULES = {
    _registry.LayerKind.DENSE: _rules.dense_grads,
    _registry.LayerKind.CONV: _rules.conv_grads,
    _registry.LayerKind.DEPTHWISE_CONV2D: _rules.depthwise_conv2d_grads,
    _registry.LayerKind.EINSUM_DENSE: _rules.einsum_dense_grads,
    _registry.LayerKind.EMBEDDING: _rules.embedding_grads,
    _registry.LayerKind.LAYER_NORM: _rules.layer_norm_grads,
    _registry.LayerKind.GROUP_NORM: _rules.group_norm_grads,
}

Fallback = Callable[..., List[tf.Tensor]]


def jacobian_gradients(loss, var_list, tape, num_microbatches=None):
  """TF-Privacy's per-microbatch gradients: ``tape.jacobian`` of microbatch means.

  Args:
    loss: per-example loss vector recorded on ``tape``.
    var_list: variables.
    tape: the ``tf.GradientTape`` that recorded ``loss``.
    num_microbatches: ``M`` (``None``: one microbatch per example).

  Returns:
    One ``[M, *var.shape]`` tensor per variable.
  """
  var_list = list(var_list)
  with tape:
    m = tf.shape(loss)[0] if num_microbatches is None else num_microbatches
    mb_losses = tf.reduce_mean(tf.reshape(loss, [m, -1]), axis=1)
  return tape.jacobian(mb_losses, var_list, unconnected_gradients="zero")


def _layer_name(tapped) -> str:
  inner = getattr(tapped, "layer", None)
  return getattr(tapped, "name", None) or getattr(inner, "name", "?")


def _var_layer_name(var) -> str:
  name = var.name.split(":")[0]
  return name.rsplit("/", 1)[0] if "/" in name else name


def _tap_problem(tapped) -> Optional[str]:
  """Why a tapped layer's taps cannot be used now, or None if they can."""
  x = getattr(tapped, "tap_input", None)
  z = getattr(tapped, "tap_output", None)
  if x is None or z is None:
    return "not called in this step"
  if not tf.executing_eagerly():
    graph = tf.compat.v1.get_default_graph()
    if getattr(z, "graph", graph) is not graph or getattr(x, "graph", graph) is not graph:
      return "its taps belong to another trace"
    calls = getattr(tapped, "tap_calls", None)
    if calls is not None and calls.get(graph, 1) > 1:
      return f"called {calls[graph]} times in one step"
  kind = _registry.kind_of(tapped.layer)
  try:
    _signature(_RULES[kind], tapped.layer, x, z, 1)
  except _rules.UnsupportedLayerError as e:
    return f"unsupported: {e}"
  return None


def per_example_gradients(loss, var_list: Sequence[tf.Variable], tape,
                          num_microbatches=None,
                          fallback: Optional[Fallback] = None, *,
                          chunk_size: Optional[int] = None) -> List[tf.Tensor]:
  """Per-microbatch gradients from layer taps, jacobian for untapped variables.

  Args:
    loss: per-example loss vector ``[B]`` recorded on ``tape``.
    var_list: the trainable variables (list or nest).
    tape: the ``tf.GradientTape`` that recorded the forward pass.
    num_microbatches: ``M`` dividing ``B`` (``None``: ``B``). Microbatch ``j``
      is examples ``j*B/M .. (j+1)*B/M - 1`` and its gradient is that of the
      mean loss over them, as in TF-Privacy.
    fallback: ``fallback(loss, var_list, tape, num_microbatches)`` for
      untapped variables; default :func:`jacobian_gradients`.
    chunk_size: bound on the examples processed at once by a layer rule (a
      multiple of ``B/M`` dividing ``B``); ``None`` processes the whole batch.

  Returns:
    One ``[M, *var.shape]`` tensor per variable, in ``var_list`` order.
  """
  fallback = fallback or jacobian_gradients
  var_list = tf.nest.flatten(var_list)
  if chunk_size is not None:
    chunk_size = _validation.check_int("chunk_size", chunk_size, low=1)
  slots = _registry.registered_slots()
  groups = {}     # id(tapped) -> (slot, [(var index, role)])
  problems = {}   # id(tapped) -> (name, reason)
  fallback_idx = []
  for i, var in enumerate(var_list):
    slot = slots.get(var.ref())
    reason = None if slot is None else (
        problems[id(slot.layer)][1] if id(slot.layer) in problems
        else _tap_problem(slot.layer))
    if slot is None or reason is not None:
      if slot is not None:
        problems[id(slot.layer)] = (_layer_name(slot.layer), reason)
      fallback_idx.append(i)
      continue
    groups.setdefault(id(slot.layer), (slot, []))[1].append((i, slot.role))

  if fallback_idx:
    names = sorted({problems[id(slots[var_list[i].ref()].layer)][0] + " ("
                    + problems[id(slots[var_list[i].ref()].layer)][1] + ")"
                    if var_list[i].ref() in slots
                    else _var_layer_name(var_list[i]) for i in fallback_idx})
    everything = bool(groups) and not getattr(tape, "_persistent", False)
    logging.warning(
        "dpquant_tf per-example gradients: jacobian fallback for %s%s.",
        ", ".join(names),
        "; the tape is not persistent, so ALL variables take the jacobian "
        "path (wrap these layers to stay on the fast path)" if everything else
        "")
    if not groups or everything:
      return list(fallback(loss, var_list, tape, num_microbatches))

  grads: List[Optional[tf.Tensor]] = [None] * len(var_list)
  tapped = [slot.layer for slot, _ in groups.values()]
  g_outs = tape.gradient(loss, [t.tap_output for t in tapped],
                         unconnected_gradients=tf.UnconnectedGradients.ZERO)
  for (slot, entries), layer, g in zip(groups.values(), tapped, g_outs):
    x = layer.tap_input
    m = num_microbatches if num_microbatches is not None else _batch(x)
    per_role = _apply_rule(slot.kind, layer.layer, x, g, m, chunk_size)
    for i, role in entries:
      var = var_list[i]
      t = tf.cast(per_role[role], var.dtype)
      t = tf.reshape(t, tf.concat([[m], tf.shape(var)], 0))
      if isinstance(m, int):
        t.set_shape([m] + var.shape.as_list())
      grads[i] = t
  if fallback_idx:
    fb = fallback(loss, [var_list[i] for i in fallback_idx], tape,
                  num_microbatches)
    for i, t in zip(fallback_idx, fb):
      grads[i] = t
  return grads


def _batch(x):
  return x.shape[0] if x.shape[0] is not None else tf.shape(x)[0]


def _apply_rule(kind, inner, x, g, m, chunk_size):
  """Runs a rule on the whole batch, or chunk by chunk with ``tf.map_fn``."""
  rule = _RULES[kind]
  b = x.shape[0]
  if (chunk_size is None or b is None or not isinstance(m, int)
      or b <= chunk_size):
    return rule(inner, x, g, m)
  k = b // m
  if chunk_size % k or b % chunk_size:
    _validation.fail("chunk_size", chunk_size,
                     f"a multiple of B/M={k} that divides the batch {b}")
  n = b // chunk_size
  xs = tf.reshape(x, [n, chunk_size] + x.shape.as_list()[1:])
  gs = tf.reshape(g, [n, chunk_size] + g.shape.as_list()[1:])
  m_chunk = m // n
  out = tf.map_fn(lambda xg: rule(inner, xg[0], xg[1], m_chunk), (xs, gs),
                  fn_output_signature=_signature(rule, inner, xs[0], gs[0],
                                                 m_chunk))
  return {r: tf.reshape(t, [m] + t.shape.as_list()[2:]) for r, t in out.items()}


def _signature(rule, inner, x, g, m):
  """Output signature of ``rule`` on one chunk (traced in a scratch graph)."""
  with tf.Graph().as_default():
    xp = tf.compat.v1.placeholder(x.dtype, x.shape)
    gp = tf.compat.v1.placeholder(g.dtype, g.shape)
    if m == 1 and x.shape[0] is not None:  # support check on one example
      xp, gp = xp[:1], gp[:1]
    spec = {r: tf.TensorSpec(t.shape, t.dtype)
            for r, t in rule(inner, xp, gp, m).items()}
  return spec

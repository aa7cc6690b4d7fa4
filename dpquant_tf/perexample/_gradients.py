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
from dpquant_tf.perexample import _ghost
from dpquant_tf.perexample import _registry
from dpquant_tf.perexample import _rules
from dpquant_tf.privacy import _clip

__all__ = ["PerExampleTaps", "collect", "example_validity",
           "jacobian_gradients", "per_example_gradients"]

_RULES = {
    _registry.LayerKind.DENSE: _rules.dense_grads,
    _registry.LayerKind.CONV1D: _rules.conv_grads,
    _registry.LayerKind.CONV2D: _rules.conv_grads,
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


def example_validity(var_list, num_microbatches=None):
  """``[M]`` bool: False for a microbatch holding an invalid example, or None.

  An example is invalid when a tapped layer owning one of ``var_list``
  recorded it so in the current trace and replica (a ``TappedLayer``
  Embedding fed an id outside ``[0, input_dim)``). Every clip gives such a
  microbatch scale 0 (the jacobian path through the optimizer too).

  Args:
    var_list: the step's variables.
    num_microbatches: ``M`` (None: one per example).
  """
  valid = _registry.example_validity(tf.nest.flatten(var_list))
  if valid is None or num_microbatches is None:
    return valid
  if (isinstance(num_microbatches, int) and valid.shape[0] is not None
      and valid.shape[0] == num_microbatches):
    return valid
  return tf.reduce_all(tf.reshape(valid, [num_microbatches, -1]), axis=1)


def _layer_name(tapped) -> str:
  inner = getattr(tapped, "layer", None)
  return getattr(tapped, "name", None) or getattr(inner, "name", "?")


def _var_layer_name(var) -> str:
  name = var.name.split(":")[0]
  return name.rsplit("/", 1)[0] if "/" in name else name


def _tap_problem(tapped, num_examples):
  """``(tap, None)`` when the layer's taps can be used now, else ``(None, why)``.

  The taps are those the current replica recorded in the current trace
  (``_registry.current_tap``): under ``MirroredStrategy`` every local replica
  calls each layer once and reads its own taps.
  """
  tap = _registry.current_tap(tapped)
  if tap is None:
    return None, "not called in this step"
  x, z = tap.tap_input, tap.tap_output
  rows = x.shape[0] if x.shape.rank else None
  if isinstance(num_examples, int) and rows is not None and rows != num_examples:
    # TimeDistributed or a reshape folded other axes into its batch: its rows
    # are not the examples (docs/METHOD.md invariant 8). The jacobian is exact.
    return None, (f"its input has {rows} rows for {num_examples} examples (a "
                  "TimeDistributed wrapper or a reshape folds other axes into "
                  "them)")
  if not tf.executing_eagerly():
    graph = tf.compat.v1.get_default_graph()
    if getattr(z, "graph", graph) is not graph or getattr(x, "graph", graph) is not graph:
      return None, "its taps belong to another trace"
    if tap.calls > 1:
      return None, f"called {tap.calls} times in one step"
  try:
    _signature(_rule_of(tapped, tap), tapped.layer, x, z, 1)
  except _rules.UnsupportedLayerError as e:
    return None, f"unsupported: {e}"
  return tap, None


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
  return collect(loss, var_list, tape, num_microbatches, fallback,
                 chunk_size=chunk_size).per_example_gradients()


def collect(loss, var_list: Sequence[tf.Variable], tape, num_microbatches=None,
            fallback: Optional[Fallback] = None, *,
            chunk_size: Optional[int] = None) -> "PerExampleTaps":
  """Runs the one backward pass; returns taps to materialize or clip-sum.

  Same arguments as :func:`per_example_gradients`. The returned object's
  methods only use tensors computed here, so they can be called inside
  ``tf.cond`` branches (for example: materialized per-example gradients when
  gradient quantization is on, :meth:`PerExampleTaps.clipped_sum` when off).
  """
  user_fallback = fallback or jacobian_gradients

  def fallback(loss, variables, tape, m):
    m = tf.shape(loss)[0] if m is None else m
    return user_fallback(loss, variables, tape, m)

  var_list = tf.nest.flatten(var_list)
  if chunk_size is not None:
    chunk_size = _validation.check_int("chunk_size", chunk_size, low=1)
  num_examples = _batch(loss)
  slots = _registry.registered_slots()
  groups = {}     # id(tapped) -> (slot, tap, [(var index, role)])
  problems = {}   # id(tapped) -> (name, reason)
  fallback_idx = []
  for i, var in enumerate(var_list):
    slot = slots.get(var.ref())
    tap, reason = None, None
    if slot is not None and id(slot.layer) in problems:
      reason = problems[id(slot.layer)][1]
    elif slot is not None and id(slot.layer) not in groups:
      tap, reason = _tap_problem(slot.layer, num_examples)
    if slot is None or reason is not None:
      if slot is not None:
        problems[id(slot.layer)] = (_layer_name(slot.layer), reason)
      fallback_idx.append(i)
      continue
    groups.setdefault(id(slot.layer), (slot, tap, []))[2].append((i, slot.role))

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
      grads = fallback(loss, var_list, tape, num_microbatches)
      return PerExampleTaps(var_list, [], num_microbatches,
                            dict(enumerate(grads)), chunk_size, num_examples,
                            _registry.example_validity(var_list))

  outputs = [tap.tap_output for _, tap, _ in groups.values()]
  g_outs = tape.gradient(loss, outputs,
                         unconnected_gradients=tf.UnconnectedGradients.ZERO)
  layers = [(slot, entries, _rows_checked(tap.tap_input, num_examples,
                                           _layer_name(slot.layer)), g,
             _rule_of(slot.layer, tap))
            for (slot, tap, entries), g in zip(groups.values(), g_outs)]
  fb = {}
  if fallback_idx:
    fb = dict(zip(fallback_idx, fallback(
        loss, [var_list[i] for i in fallback_idx], tape, num_microbatches)))
  return PerExampleTaps(var_list, layers, num_microbatches, fb, chunk_size,
                        num_examples, _registry.example_validity(var_list))


def _rows_checked(x, num_examples, name):
  """``x`` after a run-time check that its rows are the loss's examples.

  Statically known mismatches never get here (they take the jacobian). The
  check raises in eager and graph mode. Under ``jit_compile`` XLA drops
  asserts; there the rules still group rows by the loss's example count
  (``[N, rows / N, ...]``), which is per example for TimeDistributed's
  contiguous layout, and a row count that is not a multiple of N fails.
  """
  if isinstance(num_examples, int) and x.shape[0] == num_examples:
    return x
  rows = tf.shape(x)[0]
  check = tf.debugging.assert_equal(
      rows, tf.cast(num_examples, rows.dtype), message=(
          f"dpquant_tf per-example gradients: layer {name!r} sees a batch "
          "whose rows are not the loss's examples (TimeDistributed or a "
          "reshape folds other axes into it); unwrap it so that each "
          "example is clipped as one"))
  with tf.control_dependencies([check]):
    return tf.identity(x)


class PerExampleTaps:
  """Layer taps and output gradients of one step (see :func:`collect`)."""

  def __init__(self, var_list, layers, num_microbatches, fallback_grads,
               chunk_size, num_examples, valid=None):
    self._vars = var_list
    self._layers = layers
    self._m = num_microbatches
    if num_microbatches is not None and not isinstance(num_microbatches, int):
      static = tf.get_static_value(num_microbatches)
      self._m = int(static) if static is not None else num_microbatches
    self._fallback = fallback_grads
    self._chunk = chunk_size
    self._n = num_examples   # the loss's batch: one entry per example
    self._valid = valid      # [B] bool from the taps, or None

  def _m_for(self, x):  # pylint: disable=unused-argument
    """Microbatches: given, else one per example of the loss (not per row)."""
    return self._m if self._m is not None else self._n

  def _shaped(self, t, var, m):
    t = tf.cast(t, var.dtype)
    t = tf.reshape(t, tf.concat([[m], tf.shape(var)], 0))
    if isinstance(m, int):
      t.set_shape([m] + var.shape.as_list())
    return t

  def _k(self, x):
    """Examples per microbatch: an int when static, else a scalar tensor."""
    if self._m is None:
      return 1
    m, b = self._m_for(x), self._n
    if isinstance(m, int) and isinstance(b, int):
      return b // m
    return tf.cast(b, tf.int32) // tf.cast(m, tf.int32)

  def per_example_gradients(self) -> List[tf.Tensor]:
    """One ``[M, *var.shape]`` tensor per variable, in ``var_list`` order."""
    grads: List[Optional[tf.Tensor]] = [None] * len(self._vars)
    for slot, entries, x, g, rule in self._layers:
      m, k = self._m_for(x), self._k(x)
      per_role = _apply_rule(rule, slot.layer.layer, x, g, m, self._chunk)
      for i, role in entries:
        t = per_role[role]
        if isinstance(k, int):
          t = t if k == 1 else t / tf.cast(k, t.dtype)
        else:   # the mean over each microbatch; skipped at run time if k = 1
          t = tf.cond(k > 1, lambda t=t: t / tf.cast(k, t.dtype),
                      lambda t=t: tf.identity(t))
        grads[i] = self._shaped(t, self._vars[i], m)
    for i, t in self._fallback.items():
      grads[i] = t
    return grads

  def validity(self):
    """``[M]`` bool (False: a microbatch with an invalid example), or None.

    An example is invalid when a tapped layer recorded it so in this trace
    (an Embedding id outside ``[0, input_dim)``, see ``TappedLayer``); every
    clip of this step gives such a microbatch scale 0.
    """
    valid = self._valid
    if valid is None:
      return None
    m = self._m if self._m is not None else self._n
    if isinstance(m, int) and isinstance(self._n, int) and m == self._n:
      return valid
    return tf.reduce_all(tf.reshape(valid, [m, -1]), axis=1)

  def clipped_sum(self, l2_norm_clip):
    """Sum over microbatches of the gradients clipped to L2 norm C.

    The one clip (``privacy._clip.clip_scales``): microbatch i is scaled by
    ``min(1, C / u_i)``, where ``u_i`` is a proven upper bound, in the
    arithmetic executed, of the norm of the tensor added for it (scale 0 for
    a non-finite bound or an invalid example). With one example per
    microbatch, Dense and Conv layers whose per-example gradient is larger
    than ``T^2`` (T positions) never materialize it (ghost clipping, see
    ``_ghost``): the bound comes from float64 Gram matrices plus rounding
    terms, and the clipped sum is one matmul ``a^T (s * g)``. Other layers
    materialize their per-example gradients once (a norm bound) and
    sum them with a ``tensordot``.

    Formal guarantee: the tensor added for each microbatch has L2 norm at
    most C; the sum over microbatches rounds as any float32 sum of such
    tensors (docs/PRIVACY.md, "The clip bound, path by path").

    Args:
      l2_norm_clip: scalar C > 0 (float or tensor).

    Returns:
      ``(sums, bounds)``: one ``var.shape`` tensor per variable, and the
      ``[M]`` float64 norm bounds ``u_i`` before clipping.
    """
    parts = []   # (sq [M], lin [M], finisher(scale) -> {i: sum})
    for slot, entries, x, g, rule in self._layers:
      parts.append(self._layer_part(slot, entries, x, g, rule))
    for i, t in self._fallback.items():
      parts.append(_materialized_part({i: t}, 1))
    sq = tf.add_n([p[0] for p in parts])
    lin = tf.add_n([p[1] for p in parts])
    rel = 1.0 + _clip.gamma(2 * len(parts) + 4, _clip.unit_roundoff(tf.float64))
    bound = (tf.sqrt(sq) + lin) * rel
    scale = _clip.clip_scales(bound, l2_norm_clip, dtype=tf.float32,
                              valid=self.validity())
    sums: List[Optional[tf.Tensor]] = [None] * len(self._vars)
    for _, _, finish in parts:
      for i, t in finish(scale).items():
        sums[i] = tf.reshape(tf.cast(t, self._vars[i].dtype),
                             tf.shape(self._vars[i]))
    return sums, bound

  def _layer_part(self, slot, entries, x, g, rule):
    m, k = self._m_for(x), self._k(x)
    inner = slot.layer.layer
    if isinstance(k, int) and _bf16_contraction(slot, x, g):
      return self._bf16_part(slot, entries, x, g, m, k)

    def materialized():
      per_role = _apply_rule(rule, inner, x, g, m, self._chunk)
      return _materialized_part({i: per_role[role] for i, role in entries}, k)

    operands = (None if rule is not _RULES.get(slot.kind)
                else _ghost.ghost_operands(slot.kind, inner, x, g))
    if operands is None:
      return materialized()
    if not (isinstance(self._n, int) and x.shape[0] == self._n):
      # Rows grouped by example ([N, rows / N * T, ...]), as the rules do.
      operands = operands._replace(
          a=tf.reshape(operands.a, [self._n, -1, operands.a.shape[-1]]),
          g=tf.reshape(operands.g, [self._n, -1, operands.g.shape[-1]]))
    if isinstance(k, int):
      return _ghost.ghost_part(operands, entries) if k == 1 else materialized()
    # Microbatch size known only at run time: pick the branch then.
    order = [i for i, _ in entries]
    one = tf.equal(k, 1)
    sq, lin = tf.cond(one, lambda: _ghost.ghost_part(operands, entries)[:2],
                      lambda: materialized()[:2])

    def finish(scale):
      out = tf.cond(
          one,
          lambda: [_ghost.ghost_part(operands, entries)[2](scale)[i]
                   for i in order],
          lambda: [materialized()[2](scale)[i] for i in order])
      return dict(zip(order, out))
    return sq, lin, finish


  def _bf16_part(self, slot, entries, x, g, m, k):
    """Materialized per-example gradients, contracted in bfloat16 when on.

    Used for Dense layers on sequences and for ungrouped convolutions with
    more than one output position (``_bf16_contraction``; their ghost bound,
    where it would pay, needs float64 Gram matrices and a float64
    contraction). For a layer built for bf16 execution (``bf16_taps``) that is enabled,
    the kernel's per-example contraction runs on bfloat16 operands (the tap
    input is bf16-exact; the output gradient is rounded to bf16 once, as the
    layer's own bf16 backward pass rounds it) with a bfloat16 result, the
    per-example gradient in bf16. A disabled layer contracts in float32.
    Either way the result is one ``[M, ...]`` tensor per variable, and the
    bound and the clipped sum are the materialized ones (``norm_bound`` of
    exactly these tensors), so the clip argument is unchanged.
    """
    inner = slot.layer.layer

    def rule(dtype):
      def run():
        per_role = _apply_rule(_RULES[slot.kind], inner, x, g, m, self._chunk,
                               dtype=dtype)
        return {r: tf.cast(t, tf.float32) for r, t in per_role.items()
                if r != "bias"}
      return run

    if x.dtype == tf.bfloat16:
      # A pinned layer (``QuantizedLayer(switchable=False)``): it ran in
      # bf16, its taps are the bf16 tensors; no switch to follow.
      per_role = rule(tf.bfloat16)()
    else:
      per_role = tf.cond(tf.convert_to_tensor(slot.layer.enabled),
                         rule(tf.bfloat16), rule(tf.float32))
    if any(role == "bias" for _, role in entries):
      # The bias sums positions: keep it float32 (cheap) in both cases (a
      # pinned layer with a bias taps a float32 output, or a bf16 one when
      # its epilogue runs in bf16).
      per_role["bias"] = _rules._bias_grad(tf.cast(g, tf.float32), m, x)  # pylint: disable=protected-access
    return _materialized_part({i: per_role[role] for i, role in entries}, k)


def _bf16_contraction(slot, x, g) -> bool:
  """Whether a layer's per-example gradients take ``_bf16_part``.

  Layers built for bf16 execution (``bf16_taps``): Dense layers with more
  than one position per example (a single position has no contraction to
  speed up), and every ungrouped convolution with more than one position.
  Narrow convolutions were left in float32 until the second session of
  2026-12-05: their batched matmuls gain little from bf16 alone (1.1x), but
  in bf16 the shifted windows and patches are half the bytes and the
  forward pass's bf16 copy of the input is what they read; measured with
  ``tools/benchmark_switch.py --switch=bf16_conv_contraction``
  (docs/PERFORMANCE.md).
  """
  if not getattr(slot.layer, "bf16_taps", False):
    return False
  if slot.kind == _registry.LayerKind.DENSE:
    return x.shape[1:-1].num_elements() not in (None, 1)
  return _ghost.conv_positions(slot.kind, slot.layer.layer, g) not in (None, 1)


def _materialized_part(sums, k):
  """Norm bound and clipped sum of materialized per-microbatch gradient *sums*.

  The microbatch gradient is ``sum / k``: its norm is ``|sum| / k`` and its
  clipped contribution ``(scale / k) * sum``, so the division by ``k`` costs
  nothing on the large tensors. The tensors are used as float32 (narrower
  ones are cast, exactly); ``sq`` is their sum of squares enlarged by its
  rounding (``_clip.norm_bound``), and ``lin = 2 u32 sqrt(sq)`` covers
  rounding ``scale / k`` to float32.
  """
  sums = {i: (tf.cast(t, tf.float32) if t.dtype != tf.float64 else t)
          for i, t in sums.items()}
  norm = _clip.norm_bound(list(sums.values()))
  if not (isinstance(k, int) and k == 1):
    norm = norm / tf.cast(k, tf.float64)
  sq = tf.square(norm)
  lin = 2.0 * _clip.unit_roundoff(tf.float32) * norm
  k_f = tf.cast(k, tf.float32)

  def finish(scale):
    # A non-finite row has scale 0 and 0 * NaN is NaN: the optimizer's
    # safety net recomputes such a step with rows selected away; an invalid
    # (finite) row adds exact zeros.
    w = scale if isinstance(k, int) and k == 1 else scale / k_f
    return {i: tf.tensordot(tf.cast(w, t.dtype), t, axes=1)
            for i, t in sums.items()}
  return sq, lin, finish


def _batch(x):
  return x.shape[0] if x.shape[0] is not None else tf.shape(x)[0]


def _rule_of(tapped, tap):
  """The per-example rule of a tapped layer's recorded tap."""
  if tap.expanded:
    return _rules.expanded_param_grads
  return _RULES[_registry.kind_of(tapped.layer)]


def _apply_rule(rule, inner, x, g, m, chunk_size, dtype=None):
  """Runs a rule on the whole batch, or chunk by chunk with ``tf.map_fn``.

  ``x`` and ``g`` are cast to ``dtype`` (default: float32 when either is
  bfloat16, as a pinned layer taps them: exact); rules see one dtype.
  """
  x, g = _operands(x, g, dtype)
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


def _operands(x, g, dtype=None):
  """``(x, g)`` in ``dtype``; by default float32 if either is bfloat16.

  Only ``_bf16_part`` asks for bfloat16 (contractions that accumulate in
  float32); every other rule (depthwise, grouped and einsum layers, bias
  sums over positions) sees the bf16 taps of a pinned layer cast to float32
  (exact), so it neither accumulates nor rounds its result in bf16.
  """
  if dtype is None:
    if tf.bfloat16 not in (x.dtype, g.dtype):
      return x, g
    dtype = tf.float32
  return tf.cast(x, dtype), tf.cast(g, dtype)


def _signature(rule, inner, x, g, m):
  """Output signature of ``rule`` on one chunk (traced in a scratch graph)."""
  dtypes = (x.dtype, g.dtype)
  if tf.bfloat16 in dtypes and dtypes[0] != dtypes[1]:
    dtypes = (tf.float32, tf.float32)   # one dtype, as rules see
  with tf.Graph().as_default():
    xp = tf.compat.v1.placeholder(dtypes[0], x.shape)
    gp = tf.compat.v1.placeholder(dtypes[1], g.shape)
    if m == 1 and x.shape[0] is not None:  # support check on one example
      xp, gp = xp[:1], gp[:1]
    spec = {r: tf.TensorSpec(t.shape, t.dtype)
            for r, t in rule(inner, xp, gp, m).items()}
  return spec

"""Model checks for DP training: every problem of a model at once (Opacus-style).

A model can break the per-example guarantee before any gradient is clipped
(docs/METHOD.md section 4, invariants 1, 8 and 11). :func:`model_privacy_problems`
lists, one line each:

* BatchNormalization, by class (any subclass, any name, also with
  ``center=False, scale=False`` and no trainable variable): it normalizes each
  example with statistics of the whole batch and updates running statistics
  from private batches without noise. ``dpquant_tf.fix_model`` replaces it
  with GroupNormalization.
* Any layer whose non-trainable state is assigned during a training forward
  pass. Found from the graph, not from a list of classes: ``model(x,
  training=True)`` is traced symbolically (no data) and every op that writes a
  resource variable (``AssignVariableOp``, ``AssignAdd/SubVariableOp``,
  ``ResourceApply*``, ``ResourceScatter*``, ...; also inside ``tf.cond``,
  loops and nested functions) is matched against the model's variables
  (non-trainable ones such as running statistics, and trainable ones written
  outside the optimizer). Such state (a running batch mean, say) is
  a noise-free function of the private batch and is released with the model.
* Range-tracking quantizers of tensorflow-model-optimization
  (``MovingAverageQuantizer``, ``AllValuesQuantizer``): they learn value
  ranges from private batches without noise.
* Tapped or quantized layers inside ``TimeDistributed``: the wrapper folds
  the time axis into the batch, so the per-example fast path would see one
  row per time step instead of one per example.
* Keras mixed precision: any layer whose dtype policy computes or stores in
  float16/bfloat16 (norms and the clipped sum would be formed from
  low-precision values that do not bound one example's contribution).
* Keras preprocessing layers with adaptable state (Normalization,
  TextVectorization, StringLookup, IntegerLookup, Discretization, ...) that
  are not declared public by name (``public_preprocessing=``, or
  ``PrivacyLedger(public_state=...)`` through the optimizer).
* When all of the above pass: examples that are not independent
  (``_independence``): a layer or the loss whose entry for example i depends
  on another example of the batch, found by a probe on a synthesized batch.

:func:`check_model_privacy` raises :class:`UnsupportedModelError` (a
``ValueError``) listing them all. ``dpquant_tf.quantization.validate_model``,
``DPQuantOptimizer.check_model`` and the callbacks use this one check.
"""

import weakref
from typing import Dict, List, Set, Tuple

import tensorflow as tf

from dpquant_tf import _layer_kinds
from dpquant_tf import _validation
from dpquant_tf.privacy import _independence

__all__ = ["UnsupportedModelError", "check_model_privacy",
           "model_privacy_problems"]

_LOW_PRECISION = ("float16", "bfloat16")

_RANGE_TRACKING = ("MovingAverageQuantizer", "AllValuesQuantizer")
_ASSIGN_OPS = frozenset({
    "AssignVariableOp", "AssignAddVariableOp", "AssignSubVariableOp",
    "ResourceStridedSliceAssign", "AssignVariableXlaConcatND",
})
_ASSIGN_PREFIXES = ("ResourceApply", "ResourceSparseApply", "ResourceScatter")
_CALL_OPS = frozenset({"PartitionedCall", "StatefulPartitionedCall"})
_IF_OPS = frozenset({"If", "StatelessIf"})
_WHILE_OPS = frozenset({"While", "StatelessWhile"})
_CASE_OPS = frozenset({"Case", "StatelessCase"})
_PASS_THROUGH = frozenset({"Identity", "IdentityN"})

# model -> {key: problems}: a model is traced once per set of variables.
_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class UnsupportedModelError(ValueError):
  """A model that cannot be trained with DP as is; the message lists why."""


def _class_names(obj) -> Set[str]:
  return {c.__name__ for c in type(obj).__mro__}


def _all_layers(model) -> List[tf.keras.layers.Layer]:
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


# -- (c) tfmot range-tracking quantizers -------------------------------------

def _quantizers_of(module):
  """(role, quantizer) pairs of a tfmot QuantizeWrapper / QuantizeLayer."""
  found = []
  config = getattr(module, "quantize_config", None)
  inner = getattr(module, "layer", None)
  if config is not None and inner is not None:
    try:
      found += [("activation", q)
                for _, q in config.get_activations_and_quantizers(inner)]
    except Exception:  # pylint: disable=broad-except
      pass
    try:
      found += [("output", q) for q in config.get_output_quantizers(inner)]
    except Exception:  # pylint: disable=broad-except
      pass
  quantizer = getattr(module, "quantizer", None)
  if quantizer is not None and "QuantizeLayer" in _class_names(module):
    found.append(("input", quantizer))
  return found


# -- (b) state assigned during a training step --------------------------------

_input_signature = _independence.input_signature


class _GraphWrites:
  """Which inputs of a GraphDef body an op writes through (resource dataflow)."""

  def __init__(self, library):
    self._library = {f.signature.name: f for f in library.function}
    self._memo: Dict[str, Set[int]] = {}

  def function_args(self, name: str) -> Set[int]:
    """Indices of the arguments of library function `name` that it assigns."""
    if name in self._memo:
      return self._memo[name]
    self._memo[name] = set()   # recursion guard
    fdef = self._library.get(name)
    if fdef is None:
      return set()
    args = {a.name: i for i, a in enumerate(fdef.signature.input_arg)}
    nodes = {n.name: n for n in fdef.node_def}
    out = set()
    for source in self._writes(fdef.node_def, nodes, args, in_function=True):
      if source[0] == "arg":
        out.add(source[1])
    self._memo[name] = out
    return out

  def graph_sources(self, graph_def) -> Set[str]:
    """Names of the top-level nodes (placeholders) whose resource is written."""
    nodes = {n.name: n for n in graph_def.node}
    return {s[1] for s in self._writes(graph_def.node, nodes, {},
                                       in_function=False) if s[0] == "node"}

  def _resolve(self, ref: str, nodes, args, in_function):
    """Follows a tensor reference back through identities to its source."""
    for _ in range(10000):
      ref = ref.lstrip("^")
      parts = ref.split(":")
      if in_function and len(parts) == 1 and ref in args:
        return ("arg", args[ref])
      node = nodes.get(parts[0])
      if node is None:
        return ("unknown", ref)
      index = int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else 0
      if node.op in _PASS_THROUGH and node.input:
        ref = node.input[index if node.op == "IdentityN" else 0]
        continue
      if node.op in _WHILE_OPS and index < len(node.input):
        ref = node.input[index]
        continue
      return ("node", node.name)
    return ("unknown", ref)

  def _writes(self, node_defs, nodes, args, *, in_function):
    out = set()

    def mark(ref):
      out.add(self._resolve(ref, nodes, args, in_function))

    for node in node_defs:
      op = node.op
      data = [i for i in node.input if not i.startswith("^")]
      if op in _ASSIGN_OPS or op.startswith(_ASSIGN_PREFIXES):
        if data:
          mark(data[0])
        continue
      callees: List[Tuple[str, int]] = []   # (function name, input offset)
      if op in _IF_OPS:
        callees = [(node.attr[b].func.name, 1)
                   for b in ("then_branch", "else_branch")]
      elif op in _CASE_OPS:
        callees = [(f.name, 1) for f in node.attr["branches"].list.func]
      elif op in _WHILE_OPS:
        callees = [(node.attr[b].func.name, 0) for b in ("cond", "body")]
      elif op in _CALL_OPS:
        callees = [(node.attr["f"].func.name, 0)]
      elif op in self._library:
        callees = [(op, 0)]
      for name, offset in callees:
        for j in self.function_args(name):
          if offset + j < len(data):
            mark(data[offset + j])
    return out


def _attribute_variables(layer) -> List[tf.Variable]:
  """tf.Variables a layer holds outside its weights (e.g. stateful RNN states)."""
  found, stack = [], [(v, 0) for v in vars(layer).values()]
  while stack:
    value, depth = stack.pop()
    if isinstance(value, tf.Variable):
      found.append(value)
    elif depth < 2 and isinstance(value, (list, tuple)):
      stack.extend((v, depth + 1) for v in value)
    elif depth < 2 and isinstance(value, dict):
      stack.extend((v, depth + 1) for v in value.values())
  return found


def _layer_variables(layer) -> List[tf.Variable]:
  return list(layer.variables) + _attribute_variables(layer)


def _handles(var) -> List[tf.Tensor]:
  """Resource handles of a variable: each component's for a distributed
  (mirrored) variable, whose own ``.handle`` exists only in replica context."""
  components = getattr(var, "values", None)
  if isinstance(components, (list, tuple)) and components:
    return [h for c in components for h in _handles(c)]
  try:
    return [var.handle]
  except (AttributeError, ValueError):
    return []


def _assigned_variables(model, signature, step_graph=None) -> List[tf.Variable]:
  """Variables of `model` that `model(x, training=True)` assigns (any of them).

  Weights (trainable or not) and variables its layers hold in attributes
  (stateful RNN states) count. `step_graph`: the graph of a training step
  being traced, whose ops so far hold the forward pass (and the loss); it is
  read as it is instead of tracing the forward pass again (the writes found
  are then those of the step's own forward pass and loss).
  """
  variables = {id(h): v for layer in _all_layers(model)
               for v in _layer_variables(layer) for h in _handles(v)}
  if not variables:
    return []
  if step_graph is not None:
    return _graph_writes_to(step_graph, variables)
  # Tapping layers record their last call's tensors; the check may run in
  # the middle of a training step's trace (between the forward pass and the
  # per-example gradients), so the scratch trace must not replace them.
  tapped = [l for l in _all_layers(model) if hasattr(l, "tap_output")]
  saved = [(l.tap_input, l.tap_output) for l in tapped]
  try:
    with tf.init_scope():
      fn = tf.function(lambda x: model(x, training=True), autograph=True)
      concrete = fn.get_concrete_function(signature)
  finally:
    for layer, (tap_input, tap_output) in zip(tapped, saved):
      layer.tap_input, layer.tap_output = tap_input, tap_output
  return _graph_writes_to(concrete.graph, variables)


def _graph_writes_to(graph, variables) -> List[tf.Variable]:
  """The `variables` (id(handle) -> variable) that `graph`'s ops assign."""
  by_placeholder = {}
  for external, internal in graph.captures:
    var = variables.get(id(external))
    if var is not None:
      by_placeholder[internal.op.name] = var
  graph_def = graph.as_graph_def()
  written = _GraphWrites(graph_def.library).graph_sources(graph_def)
  return [by_placeholder[n] for n in sorted(written) if n in by_placeholder]


def _owners(model) -> Dict[int, tf.keras.layers.Layer]:
  """id(variable) -> the innermost layer that holds it."""
  owners = {}
  for layer in _all_layers(model):
    for var in _layer_variables(layer):
      owners[id(var)] = layer
  return owners


def _state_problems(model, skip: Set[int], signature,
                    step_graph=None) -> List[str]:
  """One line per layer whose non-trainable state a training step assigns."""
  if signature is None and step_graph is None:
    return [f"model {model.name!r}: cannot check which state a training step "
            "updates because its input shape is unknown; build it (give it "
            "an Input or call it once on a batch) or pass input_signature="]
  try:
    assigned = _assigned_variables(model, signature, step_graph)
  except Exception as e:  # pylint: disable=broad-except
    return [f"model {model.name!r}: could not trace model(x, training=True) "
            f"to check which state a training step updates ({type(e).__name__}"
            f": {e})"]
  owners = _owners(model)
  per_layer: Dict[int, Tuple[tf.keras.layers.Layer, List[str]]] = {}
  for var in assigned:
    layer = owners.get(id(var), model)
    if id(layer) not in skip:
      per_layer.setdefault(id(layer), (layer, []))[1].append(var.name)
  return [
      f"layer {layer.name!r} ({type(layer).__name__}): its state "
      f"{sorted(set(names))} is assigned during a training forward pass, a "
      "noise-free function of the private batch that would be released with "
      "the model (like BatchNorm's running statistics); only the DP optimizer "
      "may change weights: compute such state outside training, from public "
      "data"
      for layer, names in per_layer.values()]


# -- (d) mixed precision, (e) preprocessing state ---------------------------------

def low_precision_layers(model) -> List[tf.keras.layers.Layer]:
  """Layers whose Keras dtype policy computes or stores in float16/bfloat16."""
  out = []
  for layer in _all_layers(model):
    policy = getattr(layer, "dtype_policy", None)
    dtypes = {getattr(policy, "compute_dtype", None),
              getattr(policy, "variable_dtype", None)}
    if dtypes & set(_LOW_PRECISION):
      out.append(layer)
  return out


def mixed_precision_message(layer) -> str:
  policy = getattr(layer, "dtype_policy", None)
  name = getattr(policy, "name", str(policy))
  return (
      f"layer {layer.name!r} ({type(layer).__name__}) runs under the Keras "
      f"dtype policy {name!r}: its activations and gradients are float16/"
      "bfloat16, so per-example norms and the clipped sum would be computed "
      "from low-precision values that do not bound one example's contribution "
      "by the clip norm; build the model under the 'float32' policy "
      "(tf.keras.mixed_precision.set_global_policy('float32') before creating "
      "the layers, or dtype='float32' on the layer); for low-precision "
      "arithmetic use dpquant_tf.quantization.quantize_model, whose layers keep "
      "float32 taps")


def _is_stateful_preprocessing(layer) -> bool:
  """Keras preprocessing layers that carry adaptable state (Normalization,
  TextVectorization, StringLookup, IntegerLookup, Discretization, ...).

  Decided by class (they all have ``adapt``/``is_adapted``), not by
  ``is_adapted``: a clone or a loaded model forgets that flag but keeps the
  state. Stateless ones (Hashing, Rescaling, Resizing) have no ``adapt``.
  """
  return (isinstance(layer, tf.keras.layers.Layer) and
          callable(getattr(type(layer), "adapt", None)) and
          hasattr(type(layer), "is_adapted"))


def _preprocessing_problems(model, public: Tuple[str, ...]) -> List[str]:
  problems, inside = [], set()
  for layer in _all_layers(model):
    if id(layer) in inside or not _is_stateful_preprocessing(layer):
      continue
    for sub in _all_layers(layer):   # e.g. TextVectorization's StringLookup
      inside.add(id(sub))
    if layer.name in public:
      continue
    problems.append(
        f"layer {layer.name!r} ({type(layer).__name__}) holds preprocessing "
        "state (a mean, variance, vocabulary or bin edges) that is released "
        "with the model without noise; if it was adapted on the private "
        "training data it leaks individual records. Adapt it on public data "
        "and declare it public by name: PrivacyLedger(public_state="
        f"({layer.name!r},)) with DPQuantOptimizer(ledger=...), or "
        f"check_model_privacy(model, public_preprocessing=({layer.name!r},)); "
        "the privacy statement then lists it. Otherwise preprocess outside "
        "the model with statistics computed under DP")
  return problems


def check_public_names(name: str, value) -> Tuple[str, ...]:
  """Validates a collection of layer names declared public (a tuple)."""
  if value is None:
    return ()
  if isinstance(value, str):
    value = (value,)
  try:
    names = tuple(value)
  except TypeError:
    names = None
  if names is None or not all(isinstance(n, str) and n for n in names):
    _validation.fail(name, value, "a tuple of layer names (non-empty "
                     "strings)", TypeError)
  return names


def _declared_public(model) -> Tuple[str, ...]:
  """Names declared public through the model's DP optimizer (from the
  ``PrivacyLedger(public_state=...)`` it was constructed with)."""
  optimizer = getattr(model, "optimizer", None)
  return tuple(getattr(optimizer, "_dp_public_state", ()) or ())


def _compiled_loss(model):
  return getattr(model, "compiled_loss", None)


# -- the check -----------------------------------------------------------------

# -- the check -----------------------------------------------------------------

def _class_problems(model) -> Tuple[List[str], Set[int]]:
  problems, batch_norms = [], set()
  for layer in _all_layers(model):
    if _layer_kinds.is_batch_norm(layer):
      batch_norms.add(id(layer))
      problems.append(
          f"layer {layer.name!r} ({type(layer).__name__}): batch statistics "
          "couple the examples of a batch and are learned without noise; "
          "replace it with GroupNormalization (dpquant_tf.fix_model(model) "
          "does this)")
    if isinstance(layer, tf.keras.layers.TimeDistributed):
      tapped = [l.name for l in _all_layers(layer.layer)
                if hasattr(l, "tap_output")]
      if tapped:
        problems.append(
            f"layer {layer.name!r} (TimeDistributed) wraps the tapped or "
            f"quantized layer(s) {tapped}: it folds the time axis into the "
            "batch, so per-example gradients would be clipped per time step, "
            "not per example; apply the layer without TimeDistributed (Dense "
            "and EinsumDense act on the last axis) or leave it unwrapped")
    for role, quantizer in _quantizers_of(layer):
      bad = _class_names(quantizer) & set(_RANGE_TRACKING)
      if bad:
        problems.append(
            f"layer {layer.name!r}: tfmot {sorted(bad)[0]} on its {role} learns "
            "value ranges from private batches without noise; use "
            "dpquant_tf.quantization.quantize_model (per-example scales) instead")
  return problems, batch_norms


# -- untapped Embedding (issue 19 item 3; helper "clip") ----------------------

def _untapped_embedding_problems(model) -> List[str]:
  """Embeddings no tapped wrapper holds: an out-of-range id is not contained.

  A tapped Embedding (``perexample.TappedLayer``) replaces an id outside
  ``[0, input_dim)`` by a valid one and marks the example invalid, so it
  contributes zero. A bare Embedding crashes the step on such an id without
  XLA and, under ``jit_compile``, lets that example add more than C.
  """
  wrapped = {id(getattr(l, "layer", None)) for l in _all_layers(model)
             if hasattr(l, "tap_output")}
  return [f"layer {l.name!r} (Embedding) is not tapped: an id outside "
          "[0, input_dim) crashes the step without XLA and lets its example "
          "add more than the clip norm under jit_compile; wrap it "
          "(dpquant_tf.perexample.tap_model(model), or TappedLayer) so that "
          "such examples contribute exactly zero"
          for l in _all_layers(model)
          if isinstance(l, tf.keras.layers.Embedding)
          and id(l) not in wrapped]


def model_privacy_problems(model, *, input_signature=None, loss=None, x=None,
                           y=None, public_preprocessing=None,
                           probe_batch: bool = True,
                           step_graph=None) -> List[str]:
  """Lists every DP problem of a Keras model at once (empty when fine).

  Args:
    model: any tf.keras model (subclassed models are inspected too; they must
      have been called once, or pass `input_signature`).
    input_signature: optional ``tf.TensorSpec`` (or nest of them) of one
      batch of inputs, for models whose input shape Keras does not know.
    loss: the per-example loss to probe for batch independence together with
      the model (default: the model's compiled loss, if compiled).
    x: optional probe inputs for the batch-independence check (default:
      synthesized from the input specs; no private data is needed).
    y: optional probe labels (default: synthesized to match the loss).
    public_preprocessing: names of preprocessing layers (Normalization,
      TextVectorization, lookups, ...) whose state the caller declares public
      (adapted on public data). Default: the names declared by the model's
      optimizer's ledger (``PrivacyLedger(public_state=...)``).
    probe_batch: run the batch-independence probe (default True).
    step_graph: the graph (being traced) of a training step whose ops so
      far are the step's forward pass and loss; the state writes are read
      from it instead of from a scratch trace of ``model(x, training=True)``
      (the library's owned train step passes its own graph).

  Returns:
    The problems, one line each, in layer order (state updates, then batch
    coupling last).
  """
  _validation.check_type("model", model, tf.keras.layers.Layer,
                         "a tf.keras model")
  public = (check_public_names("public_preprocessing", public_preprocessing)
            if public_preprocessing is not None else _declared_public(model))
  problems, skip = _class_problems(model)
  problems += [mixed_precision_message(l) for l in low_precision_layers(model)]
  problems += _preprocessing_problems(model, public)
  problems += _untapped_embedding_problems(model)
  signature = input_signature if input_signature is not None else (
      _input_signature(model))
  key = (tuple(id(v) for v in model.variables), repr(signature))
  per_model = _CACHE.setdefault(model, {})
  if key not in per_model:
    per_model[key] = _state_problems(model, skip, signature, step_graph)
  problems += list(per_model[key])
  if probe_batch and not problems:
    loss = loss if loss is not None else _compiled_loss(model)
    probe_key = ("batch", key, id(loss), id(x), id(y))
    if x is not None or y is not None or probe_key not in per_model:
      found = _independence.batch_coupling_problems(
          model, loss, x=x, y=y, signature=signature)
      if x is not None or y is not None:
        return problems + found
      per_model[probe_key] = (loss, found)   # keeps id(loss) alive
    problems += list(per_model[probe_key][1])
  return problems


def check_model_privacy(model, *, input_signature=None, loss=None, x=None,
                        y=None, public_preprocessing=None,
                        step_graph=None) -> None:
  """Raises if `model` (with `loss`) breaks per-example DP.

  Runs every rule of :func:`model_privacy_problems`, then (when those pass)
  the batch-independence probe through the model and the loss.

  Args:
    model: any tf.keras model.
    input_signature: see :func:`model_privacy_problems`.
    loss: per-example loss to probe (default: the compiled loss, if any).
    x: optional probe inputs (default synthesized).
    y: optional probe labels (default synthesized).
    public_preprocessing: preprocessing layer names declared public (default:
      those of the optimizer's ``PrivacyLedger(public_state=...)``).
    step_graph: see :func:`model_privacy_problems`.

  Raises:
    UnsupportedModelError: a ``ValueError`` listing every problem.
  """
  problems = model_privacy_problems(
      model, input_signature=input_signature, loss=loss, x=x, y=y,
      public_preprocessing=public_preprocessing, step_graph=step_graph)
  if problems:
    raise UnsupportedModelError(
        f"The model has {len(problems)} problem(s) for differentially private "
        "training:\n  - " + "\n  - ".join(problems))

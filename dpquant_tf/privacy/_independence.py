"""Batch-independence probe: example i's loss entry must not depend on example j.

Per-example clipping bounds what one example adds to the clipped sum only if
example i's loss (and so its gradient) is a function of example i alone. A
layer that centres activations over the batch, logits centred over the batch
in the loss or an in-batch contrastive loss break that silently: replacing one
example then moves every other example's gradient, and the sensitivity is no
longer the clip norm.

The probe needs no private data. It synthesizes a small batch from the
model's input specs (floats from a normal distribution, integer ids 0 or 1,
short strings) or uses the caller's ``x``/``y``, then checks:

* the model, float inputs: the gradient of output row i with respect to input
  row j (i != j) is exactly zero, with ``training=True`` and ``training=False``
  (one forward pass each, so dropout masks do not disturb the probe);
* the model, integer or string inputs: replacing input row j leaves every other
  output row unchanged (``training=False``; the model must be deterministic);
* the loss: replacing row j of the predictions or of the labels leaves every
  other loss entry unchanged (labels are synthesized to match the loss: one-hot
  or same-shape floats first, then class ids).

On coupling it names the first layer (in the model's layer order) whose output
is coupled, or "the loss".
"""

import threading
from typing import Callable, List, Optional, Sequence

import numpy as np
import tensorflow as tf

from dpquant_tf import _validation

__all__ = ["batch_coupling_problems", "check_batch_independence",
           "input_signature"]

PROBE_BATCH = 4
_FREE_DIM = 5          # size given to unknown non-batch dimensions
_RTOL = 1e-5           # relative change that counts as a dependence
_SEED = 2019


def input_signature(model):
  """TensorSpecs (batch dim None) of the model's inputs, or None if unknown."""
  inputs = getattr(model, "inputs", None)
  if inputs:
    structure = getattr(model, "input", inputs)
    return tf.nest.map_structure(
        lambda t: tf.TensorSpec([None] + list(t.shape[1:]), t.dtype), structure)
  save_spec = getattr(model, "save_spec", None)
  if save_spec is not None:
    try:
      spec = save_spec(dynamic_batch=True)
    except Exception:  # pylint: disable=broad-except
      spec = None
    if spec is not None and spec[0]:
      args = spec[0]
      return args[0] if len(args) == 1 else tuple(args)
  shape = getattr(model, "_build_input_shape", None)
  if shape is not None and isinstance(shape, (tuple, list, tf.TensorShape)):
    dims = tf.TensorShape(shape).as_list()
    if dims:
      return tf.TensorSpec([None] + dims[1:], tf.float32)
  return None


# -- probe data ------------------------------------------------------------------

def _synth(spec, batch: int, rng: np.random.RandomState):
  """One batch for a TensorSpec: normal floats, ids in {0, 1}, short words."""
  shape = [batch] + [(_FREE_DIM if d is None else d) for d in spec.shape[1:]]
  dtype = tf.as_dtype(spec.dtype)
  if dtype.is_floating:
    return tf.constant(rng.standard_normal(size=shape), dtype=dtype)
  if dtype.is_integer:
    return tf.constant(rng.randint(0, 2, size=shape), dtype=dtype)
  if dtype == tf.bool:
    return tf.constant(rng.randint(0, 2, size=shape).astype(bool))
  if dtype == tf.string:
    words = np.array(["a", "b", "c d", "e f g"])
    return tf.constant(words[rng.randint(0, len(words), size=shape)])
  raise TypeError(f"cannot synthesize probe inputs of dtype {dtype.name}")


def _replace_row(batch, j: int, other):
  """`batch` with row j taken from `other` (same structure)."""
  def one(a, b):
    a, b = tf.convert_to_tensor(a), tf.convert_to_tensor(b)
    rows = np.arange(int(a.shape[0])) == j
    mask = tf.constant(rows.reshape([-1] + [1] * (a.shape.rank - 1)))
    return tf.where(mask, b, a)
  return tf.nest.map_structure(one, batch, other)


def _rows(t) -> np.ndarray:
  t = tf.convert_to_tensor(t)
  a = t.numpy().astype(np.float64) if t.dtype.is_floating or t.dtype.is_integer \
      else np.zeros([t.shape[0], 1])
  return a.reshape(a.shape[0], -1)


def _changed_rows(base, new, j: Optional[int]) -> bool:
  """Whether a row other than j (any row: None) differs between two
  row-aligned tensors."""
  a, b = _rows(base), _rows(new)
  if a.shape != b.shape:
    return True
  scale = max(1.0, float(np.nanmax(np.abs(a))) if a.size else 1.0)
  diff = np.abs(a - b)
  if j is not None:
    diff[j] = 0.0
  return bool(np.nanmax(diff) > _RTOL * scale) if diff.size else False


# -- the model ----------------------------------------------------------------

def _float_paths(x) -> bool:
  return all(tf.as_dtype(t.dtype).is_floating for t in tf.nest.flatten(x))


def _grad_coupled(fn, x, batch: int, rng) -> bool:
  """Whether d fn(x)[i] / d x[j] != 0 for some i != j (one forward pass)."""
  flat_x = [tf.convert_to_tensor(t) for t in tf.nest.flatten(x)]
  with tf.GradientTape(persistent=True) as tape:
    for t in flat_x:
      tape.watch(t)
    outs = [tf.cast(tf.reshape(o, [batch, -1]), tf.float32)
            for o in tf.nest.flatten(fn(tf.nest.pack_sequence_as(x, flat_x)))
            if o.dtype.is_floating]
    weights = [tf.constant(rng.standard_normal(size=o.shape), tf.float32) for o in outs]
    rows = [tf.add_n([tf.reduce_sum(o[i] * w[i]) for o, w in zip(outs, weights)])
            for i in range(batch)] if outs else []
    sentinel = flat_x[0] * 1.0
  if tape.gradient(sentinel, flat_x[0]) is None:
    raise RuntimeError("no gradient tape records in this context")
  if not rows:
    return False
  for i, row in enumerate(rows):
    grads = tape.gradient(row, flat_x,
                          unconnected_gradients=tf.UnconnectedGradients.ZERO)
    for g in grads:
      g = _rows(g)
      own = float(np.max(np.abs(g[i]))) if g.shape[1] else 0.0
      others = np.delete(np.abs(g), i, axis=0)
      if not np.all(np.isfinite(g)):
        return True
      if others.size and float(np.max(others)) > _RTOL * max(own, 1e-30):
        return True
  del tape
  return False


def _perturb_coupled(fn, x, other, batch: int) -> bool:
  base = tf.nest.flatten(fn(x))
  again = tf.nest.flatten(fn(x))
  if any(_changed_rows(a, b, None) for a, b in zip(base, again)):
    raise ValueError("the model's outputs differ between two identical "
                     "inference calls, so replacing one input row cannot be "
                     "checked")
  for j in range(batch):
    new = tf.nest.flatten(fn(_replace_row(x, j, other)))
    if any(_changed_rows(a, b, j) for a, b in zip(base, new)):
      return True
  return False


def _model_coupled(fn_for, x, other, batch, rng) -> bool:
  """Coupling of fn_for(training) on probe batch x (see the module doc)."""
  if _float_paths(x):
    return any(_grad_coupled(fn_for(training), x, batch, rng)
               for training in (True, False))
  return _perturb_coupled(fn_for(False), x, other, batch)


def _layer_outputs(model) -> List:
  """(layer, symbolic output) of a graph model's layers, in layer order."""
  if not getattr(model, "_is_graph_network", False):
    return []
  out = []
  for layer in model.layers:
    if isinstance(layer, tf.keras.layers.InputLayer):
      continue
    try:
      out.append((layer, layer.output))
    except (AttributeError, ValueError):   # shared layer: several outputs
      continue
  return out


def _coupling_layer(model, x, other, batch, rng) -> str:
  """Name of the first layer whose output couples rows (else the model)."""
  for layer, symbolic in _layer_outputs(model):
    try:
      probe = tf.keras.Model(model.inputs, symbolic)
      if _model_coupled(lambda t, p=probe: (lambda v: p(v, training=t)),
                        x, other, batch, rng):
        return f"layer {layer.name!r} ({type(layer).__name__})"
    except Exception:  # pylint: disable=broad-except
      continue
  return f"model {model.name!r}"


# -- the loss -------------------------------------------------------------------

def _per_example_loss(loss) -> Optional[Callable]:
  """fn(y_true, y_pred) -> unreduced per-example losses, or None."""
  user = getattr(loss, "_user_losses", None)        # Keras LossesContainer
  if user is not None or hasattr(loss, "_losses"):
    flat = [l for l in tf.nest.flatten(user if user is not None
                                       else loss._losses) if l is not None]  # pylint: disable=protected-access
    if len(flat) != 1:
      return None
    loss = flat[0]
  if isinstance(loss, str):
    loss = tf.keras.losses.get(loss)
  if isinstance(loss, tf.keras.losses.Loss):
    return loss.call
  return loss if callable(loss) else None


def _label_candidates(pred, rng):
  """Label batches to try: same-shape (one-hot) floats, then class ids."""
  shape = pred.shape.as_list()
  classes = shape[-1] if len(shape) > 1 and shape[-1] else 1
  ids = rng.randint(0, max(classes, 2), size=shape[0])
  if classes > 1:
    yield tf.one_hot(ids, classes, dtype=pred.dtype)
  else:
    yield tf.constant(rng.randint(0, 2, size=shape), pred.dtype)
  yield tf.constant(ids % max(classes, 1), tf.int32)
  yield tf.constant((ids % max(classes, 1)).reshape(-1, 1), tf.int32)
  yield tf.constant(rng.standard_normal(size=shape), pred.dtype)


class _NotPerExample(ValueError):
  """The loss does not return one entry per example."""


def _loss_vector(fn, y, pred, batch):
  value = tf.convert_to_tensor(fn(y, pred))
  if value.shape.rank == 0:
    raise _NotPerExample("it returns one number for the whole batch: a DP "
                         "loss returns one entry per input example (Keras "
                         "reduction NONE)")
  if value.shape[0] != batch:
    raise _NotPerExample(f"it returns {value.shape[0]} entries for a batch of "
                         f"{batch}: a DP loss returns one entry per input "
                         "example")
  return value


def _loss_problem(loss, pred, y, batch, rng) -> Optional[str]:
  fn = _per_example_loss(loss)
  if fn is None:
    return ("the loss: cannot probe it for batch independence (several "
            "outputs or not callable); pass a per-example loss function")
  if y is None:
    errors = []
    for candidate in _label_candidates(pred, rng):
      try:
        value = _loss_vector(fn, candidate, pred, batch)
        if np.all(np.isfinite(value.numpy())):
          y = candidate
          break
      except _NotPerExample as e:
        return f"the loss: {e}"
      except Exception as e:  # pylint: disable=broad-except
        errors.append(f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
    if y is None:
      return ("the loss: could not synthesize labels it accepts to probe "
              "batch independence; pass y= (and x=) to check_model_privacy "
              f"({'; '.join(errors[-1:])})")
  try:
    base = _loss_vector(fn, y, pred, batch)
  except ValueError as e:
    return f"the loss: {e}"
  other_pred = pred + tf.constant(rng.standard_normal(size=pred.shape.as_list()),
                                  pred.dtype)
  y = tf.convert_to_tensor(y)
  if y.dtype.is_floating:
    other_y = tf.roll(y, 1, axis=0) + tf.cast(0.5, y.dtype)
  else:
    other_y = y + tf.ones_like(y) if y.dtype.is_integer else tf.roll(y, 1, 0)
    if y.dtype.is_integer and pred.shape.rank > 1 and pred.shape[-1]:
      other_y = other_y % tf.cast(max(int(pred.shape[-1]), 2), y.dtype)
  for j in range(batch):
    for yy, pp in ((y, _replace_row(pred, j, other_pred)),
                   (_replace_row(y, j, other_y), pred)):
      try:
        new = _loss_vector(fn, yy, pp, batch)
      except Exception:  # pylint: disable=broad-except
        continue
      if _changed_rows(base, new, j):
        return ("the loss: example i's loss entry depends on other examples "
                "of the batch (e.g. logits centred over the batch, an "
                "in-batch contrastive or softmax-over-the-batch loss), so one "
                "example moves every other example's gradient and clipping "
                "no longer bounds its contribution; compute each example's "
                "loss from that example alone")
  return None


# -- entry points ----------------------------------------------------------------

def _probe_batch(model, x, signature):
  """(x, other, batch size) of the probe."""
  rng = np.random.RandomState(_SEED)
  if x is not None:
    x = tf.nest.map_structure(tf.convert_to_tensor, x)
    batch = int(tf.nest.flatten(x)[0].shape[0])
    other = tf.nest.map_structure(
        lambda t: tf.roll(t, 1, axis=0) if t.dtype in (tf.string, tf.bool) or
        t.dtype.is_integer else tf.roll(t, 1, axis=0) * 0.5 + 1.0, x)
    return x, other, batch
  if signature is None:
    raise ValueError("its input shape is unknown; build it (give it an Input "
                     "or call it once) or pass x=")
  batch = PROBE_BATCH
  fixed = {t.shape[0] for t in tf.nest.flatten(getattr(model, "inputs", None)
                                                 or []) if t.shape.rank}
  fixed.discard(None)
  if len(fixed) == 1:
    batch = fixed.pop()
  x = tf.nest.map_structure(lambda s: _synth(s, batch, rng), signature)
  other = tf.nest.map_structure(lambda s: _synth(s, batch, rng), signature)
  return x, other, batch


def batch_coupling_problems(model, loss=None, *, x=None, y=None,
                            signature=None) -> List[str]:
  """Lines naming the layer or loss that couples examples (empty: none).

  Args:
    model: a built tf.keras model.
    loss: optional loss (Keras ``Loss``, name, function ``(y_true, y_pred)``
      or the compiled loss container) to probe too.
    x: optional probe inputs (any batch size >= 2); default synthesized.
    y: optional probe labels for the loss; default synthesized.
    signature: the model's input signature when `x` is None (default: from
      the model).
  """
  if signature is None and x is None:
    signature = input_signature(model)
  tapped = [l for l in _all(model) if hasattr(l, "tap_output")]
  saved = [(l.tap_input, l.tap_output) for l in tapped]
  rng = np.random.RandomState(_SEED + 1)
  problems = []
  # In a thread of its own: eager and with gradient tapes recording even when
  # called while a training step is traced or under tf.init_scope (which
  # stops every tape of its thread: the gradient probe would see zeros).
  result = []

  def run():
    try:
      result.append(("ok", _probe(model, loss, x, y, signature, rng, problems,
                                  tapped, saved)))
    except BaseException as e:  # pylint: disable=broad-except
      result.append(("error", e))

  worker = threading.Thread(target=run, name="dpquant_batch_probe")
  worker.start()
  worker.join()
  kind, value = result[0]
  if kind == "error":
    raise value
  return value


def _probe(model, loss, x, y, signature, rng, problems, tapped, saved):
  try:
    try:
      x, other, batch = _probe_batch(model, x, signature)
      if batch < 2:
        raise ValueError(f"the probe batch has {batch} example(s); at least 2 "
                         "are needed")
      call = lambda t: (lambda v: model(v, training=t))
      if _model_coupled(call, x, other, batch, rng):
        where = _coupling_layer(model, x, other, batch, rng)
        problems.append(
            f"{where}: its output for example i depends on other examples of "
            "the batch (e.g. a batch mean or any op across the batch axis), "
            "so one example moves every other example's gradient and clipping"
            " no longer bounds its contribution; compute each example's "
            "output from that example alone")
    except Exception as e:  # pylint: disable=broad-except
      return [f"model {model.name!r}: could not probe whether examples of a "
              f"batch stay independent ({type(e).__name__}: "
              f"{str(e).splitlines()[0] if str(e) else ''}); pass x= (and "
              "y=) to check_model_privacy"]
    if loss is not None:
      pred = tf.nest.flatten(model(x, training=False))
      if len(pred) != 1:
        problems.append("the loss: cannot probe it for batch independence on "
                        "a model with several outputs")
      else:
        problem = _loss_problem(loss, tf.convert_to_tensor(pred[0]), y, batch,
                                rng)
        if problem:
          problems.append(problem)
  finally:
    for layer, (tap_input, tap_output) in zip(tapped, saved):
      layer.tap_input, layer.tap_output = tap_input, tap_output
  return problems


def _all(model) -> Sequence:
  flatten = getattr(model, "_flatten_layers", None)
  return list(flatten(include_self=True, recursive=True)) if flatten else [model]


def check_batch_independence(model, loss=None, *, x=None, y=None) -> None:
  """Raises if example i's loss entry depends on another example j.

  Probes the model (and the loss, if given) on a small batch synthesized from
  the model's input specs (no private data), or on `x`/`y`.

  Args:
    model: a built tf.keras model.
    loss: optional per-example loss: a Keras ``Loss`` (its unreduced
      ``call`` is probed), a loss name, or a function ``(y_true, y_pred)``
      returning one entry per example.
    x: optional probe inputs (batch of at least 2); default synthesized.
    y: optional probe labels; default synthesized to match the loss.

  Raises:
    ValueError: naming the layer (or "the loss") that couples examples, or
      saying why the probe could not run.
  """
  _validation.check_type("model", model, tf.keras.layers.Layer,
                         "a tf.keras model")
  if loss is not None and not (callable(loss) or isinstance(loss, str)):
    _validation.fail("loss", loss, "None, a Keras loss, a loss name or a "
                     "function (y_true, y_pred)", TypeError)
  problems = batch_coupling_problems(model, loss, x=x, y=y)
  if problems:
    raise ValueError("Examples of a batch are not independent:\n  - " +
                     "\n  - ".join(problems))

"""The owned training step: the one path every DP step takes.

``owned_train_step(model, data)`` is Keras' ``train_step`` with four
differences:

* the per-example loss is computed here and handed, with the model and the
  input batch, to ``optimizer._owned_step`` (no stack frames are read);
* a batch of the library's sampler is cut to its real rows plus at most 15
  padding rows before the forward pass (``_trim_padding``; not under XLA,
  with microbatches or while gradient quantization is on);
* rows whose sample weight is 0 (the padding of Poisson batches) are excluded
  from the displayed loss and from every compiled metric (the weight is
  passed to the metrics as a mask), and their loss is exactly 0 even where the
  model gives them NaN (``Embedding(mask_zero=True)`` on an all-zero row);
* the step records the q of the library's own sampler when the batch's seal
  proves it is the next draw of an unseeded sampler of this process, never
  consumed before by the model (``sealed_sampling_probability``), else 1 (no
  amplification by sampling). A seeded sampler's draws are recorded at q = 1
  and noted on the optimizer (``sampler_seeded_var``), so the ledger's
  statement names the seeded sampler.
"""

import functools
import logging
import tensorflow as tf

from dpquant_tf import _validation as V
from dpquant_tf.privacy import _sampling

__all__ = ["has_owned_step", "install_dp_train_step", "owned_train_step",
           "per_example_loss", "prepare_first_step",
           "sealed_sampling_probability"]

_log = logging.getLogger(__name__)

# Attribute holding the seal state of a model with the owned step installed.
_STATE = "_dpquant_seal_state"


def _unpack(data):
  """(x, y, sample_weight, seal): the seal of the library's sampler or None."""
  if isinstance(data, (tuple, list)) and len(data) == 4:
    x, y, weight, seal = data
    return x, y, weight, seal
  x, y, weight = tf.keras.utils.unpack_x_y_sample_weight(data)
  return x, y, weight, None


# Realized batch sizes: a sealed run whose total sampled examples leaves
# T*q*N +- Z * sqrt(T*q*N*(1-q)) + 1 is stopped. For the Binomial(N, q)
# batches of a true sampler a false stop has probability below 1e-11 per step
# (normal tail at 7; the Chernoff bound is of the same order).
_Z_REALIZED = 7.0
_SEEN_IDS = 8


class _SealState:
  """Per-model state of the seal check (variables of the model's strategy).

  ``state`` = (sampler id, next draw index, real rows so far, steps so far)
  of the sampler being consumed; ``seen`` = the last sampler ids (a sampler
  whose first batch comes twice, e.g. through ``.cache()``, is not fresh).
  ``seen`` is saved with the optimizer's checkpoints (``install_dp_train_step``
  tracks it as ``dp_seal_seen``), so a run restored from a checkpoint, in a
  new process too, refuses the draws it consumed before; ``seen_here`` is the
  same list kept outside every checkpoint (a restore of an older checkpoint
  cannot shorten it).
  """

  def __init__(self, model):
    strategy = getattr(model, "distribute_strategy", None)
    if not isinstance(strategy, tf.distribute.Strategy):
      strategy = tf.distribute.get_strategy()
    with strategy.scope():
      kwargs = dict(trainable=False, dtype=tf.float64,
                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
      self.state = tf.Variable([-1.0, 0.0, 0.0, 0.0], name="dp_seal_state",
                               **kwargs)
      self.seen = tf.Variable([0.0] * _SEEN_IDS, name="dp_seal_seen",
                              **kwargs)
      self.seen_here = tf.Variable([0.0] * _SEEN_IDS,
                                   name="dp_seal_seen_here", **kwargs)


def _global_rows(real, q, n):
  """(real rows, expected rows) of one step over every replica, in one
  all-reduce.

  The expected rows are q * N summed over the samplers feeding the replicas.
  A sampler's draw is split across the replicas of one worker (one input
  pipeline per worker: `dpquant_tf.distribute`), so each replica adds its
  pipeline's ``q * N`` divided by the worker's local replicas: one
  sampler under MirroredStrategy gives ``q * N``; W workers with one
  sampler each over shards of N_i rows give ``sum_i q * N_i`` (their
  all-reduced rows are the sum of W Binomials).
  """
  count = tf.reduce_sum(tf.cast(real, tf.float64))
  ctx = tf.distribute.get_replica_context()
  if ctx is None:
    return count, q * n
  local = (len(ctx.strategy.extended.worker_devices)
           if tf.distribute.has_strategy() else 1)
  both = ctx.all_reduce(tf.distribute.ReduceOp.SUM,
                        tf.stack([count, q * n / float(max(1, local))]))
  return both[0], both[1]


def sealed_sampling_probability(state: _SealState, seal, real):
  """(q, seeded) of this step: q is the sampler's q if its seal proves the
  batch is the next draw of one unseeded library sampler of this process,
  consumed as drawn; else 1.0. `seeded` (bool tensor): the batch is a
  seeded sampler's draw (recorded at q = 1).

  Also checks the realized batch sizes of a sealed run against q * N and
  stops the run (InvalidArgumentError) when they are too far off.
  """
  one = tf.constant(1.0, tf.float64)
  if seal is None:
    return one, tf.constant(False)
  seal = tf.cast(tf.convert_to_tensor(seal), tf.float64)
  if seal.shape.rank != 2 or seal.shape[-1] != _sampling.SEAL_WIDTH:
    return one, tf.constant(False)
  first = seal[0]
  sid, index, q, n = first[0], first[1], first[2], first[3]
  old = state.state.read_value()
  same_draw = tf.reduce_all(tf.equal(seal, first[None, :]))
  ours = _sampling.sampler_id_is_ours(sid)
  was_seen = tf.logical_or(
      tf.reduce_any(tf.equal(state.seen.read_value(), sid)),
      tf.reduce_any(tf.equal(state.seen_here.read_value(), sid)))
  fresh = tf.logical_and(tf.equal(index, 0.0), tf.logical_not(was_seen))
  continuing = tf.logical_and(tf.equal(sid, old[0]), tf.equal(index, old[1]))
  valid_q = tf.logical_and(q > 0.0, q <= 1.0)
  ok = tf.reduce_all([same_draw, ours, tf.logical_or(fresh, continuing),
                      valid_q, n >= 1.0])
  seeded = tf.logical_and(ours, sid < 0.0)
  zero = tf.constant(0.0, tf.float64)
  rows, expected = _global_rows(real, q, n)
  total = tf.where(fresh, zero, old[2]) + rows
  steps = tf.where(fresh, zero, old[3]) + 1.0
  mean = steps * expected
  spread = _Z_REALIZED * tf.sqrt(tf.maximum(mean * (1.0 - q), 0.0)) + 1.0
  size_ok = tf.logical_or(tf.logical_not(ok),
                          tf.abs(total - mean) <= spread)
  check = tf.debugging.Assert(size_ok, [
      "Realized Poisson batch sizes are far from q * N (real rows so far, "
      "expected): the batches are not the sampler's draws at the accounted "
      "rate; training stopped.", total, mean])
  with tf.control_dependencies([check]):
    new_state = tf.where(ok, tf.stack([sid, index + 1.0, total, steps]),
                         tf.constant([-1.0, 0.0, 0.0, 0.0], tf.float64))
    remember = tf.logical_and(fresh, ours)
    seen = tf.where(remember, tf.concat([sid[None], state.seen[:-1]], 0),
                    state.seen.read_value())
    seen_here = tf.where(
        remember, tf.concat([sid[None], state.seen_here[:-1]], 0),
        state.seen_here.read_value())
    updates = [state.state.assign(new_state), state.seen.assign(seen),
               state.seen_here.assign(seen_here)]
  with tf.control_dependencies(updates):
    amplified = tf.logical_and(ok, tf.logical_not(seeded))
    return tf.where(amplified, q, one), tf.identity(seeded)


def _loss_function(model, loss):
  """The per-example loss callable: `loss`, else the compiled one."""
  loss = loss if loss is not None else getattr(model, "loss", None)
  if isinstance(loss, (dict, list, tuple)):
    V.fail("loss", loss, "one loss for a single-output model (the owned DP "
           "step supports one per-example loss)")
  if loss is None:
    V.fail("loss", None, "a per-example loss: compile the model with "
           "loss=... (reduction=tf.keras.losses.Reduction.NONE) or pass loss=")
  return tf.keras.losses.get(loss)


def per_example_loss(model, y, y_pred, sample_weight=None, *, loss=None):
  """(per-example loss [rows], real-row mask [rows]) of one batch.

  Rows with sample weight 0 (padding) get exactly 0, whatever the model
  returns for them; regularization losses are added to real rows only, so a
  padding row contributes a zero gradient.
  """
  fn = _loss_function(model, loss)
  values = tf.convert_to_tensor(fn(y, y_pred))
  if values.shape.rank != 1:
    V.fail("loss", values.shape, "a per-example loss vector of shape [batch] "
           "(one entry per input example): build the Keras loss with "
           "reduction=tf.keras.losses.Reduction.NONE and reduce any other "
           "axes per example")
  rows = tf.nest.flatten(y_pred)[0]
  static = (values.shape[0], rows.shape[0])
  if None not in static and static[0] != static[1]:
    V.fail("loss", values.shape, f"one entry per input example ({static[1]} "
           "rows): a loss that keeps a batch mean or folds examples makes one "
           "example move many entries")
  checks = [tf.debugging.assert_equal(
      tf.shape(values)[0], tf.shape(rows)[0],
      message="Expected the per-example loss to have one entry per input "
      "example; build the loss with Reduction.NONE")]
  with tf.control_dependencies(checks):
    values = tf.cast(values, tf.float32)
  if sample_weight is None:
    weight = tf.ones_like(values)
  else:
    weight = tf.reshape(tf.cast(sample_weight, values.dtype), [-1])
  real = weight > 0
  regularization = (tf.cast(tf.add_n(model.losses), values.dtype)
                    if model.losses else tf.zeros([], values.dtype))
  safe = tf.where(real, values, tf.zeros_like(values))
  return tf.where(real, safe * weight + regularization,
                  tf.zeros_like(values)), real


def _masked(y_pred, real):
  """`y_pred` whose Keras mask excludes padding rows (metrics honour it)."""
  out = tf.identity(y_pred)
  mask = real
  old = getattr(y_pred, "_keras_mask", None)
  if old is not None:
    mask = tf.logical_and(
        tf.cast(old, tf.bool),
        tf.reshape(real, [-1] + [1] * (old.shape.rank - 1)))
  out._keras_mask = mask  # pylint: disable=protected-access
  return out


# A sealed batch is cut to its real rows rounded up to a multiple of this
# many (at least this many) before the forward pass.
_TRIM_BUCKET = 16


def _in_xla_context() -> bool:
  try:
    from tensorflow.python.ops import control_flow_util  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover
    return False
  return bool(control_flow_util.GraphOrParentsInXlaContext(
      tf.compat.v1.get_default_graph()))


def _trim_padding(model, x, y, sample_weight, seal):
  """Drops the padding rows of a batch of the library's sampler, but for a
  bucket of at most 15 (and at least 16 rows in all).

  The sampler pads every batch to a fixed ``max_batch_size`` (118 rows for
  an expected 64 at N = 4,000: overflow probability 1e-9), and a padding row
  (sample weight 0) costs a whole example's forward, backward and
  per-example work while contributing exactly zero. Real rows are kept in
  their order, then padding rows up to the bucket: the sum, the clip of
  every real row and the realized-batch count are unchanged, and the shapes
  a run sees are a few buckets. Not done under XLA (its shapes must be
  static: the fixed padded shape is what makes one compile), nor with
  ``num_microbatches`` set (microbatches are groups of the padded rows), nor
  while gradient quantization is on (``_draws_do_not_follow_rows``), nor
  for batches without a seal.
  """
  if (seal is None or sample_weight is None or not tf.is_tensor(seal)
      or seal.shape.rank != 2 or seal.shape[-1] != _sampling.SEAL_WIDTH
      or getattr(model.optimizer, "_num_microbatches", None) is not None
      or getattr(model, "jit_compile", False) or _in_xla_context()):
    return x, y, sample_weight, seal
  weight = tf.convert_to_tensor(sample_weight)
  leaves = tf.nest.flatten((x, y))
  if weight.shape.rank != 1 or not all(
      isinstance(t, tf.Tensor) and t.shape.rank for t in leaves):
    return x, y, sample_weight, seal   # e.g. sparse or ragged inputs
  trim = _draws_do_not_follow_rows(model.optimizer)
  if trim is None:
    return x, y, sample_weight, seal
  keep = weight > 0
  rows = tf.shape(keep)[0]
  count = tf.reduce_sum(tf.cast(keep, tf.int32))
  size = tf.minimum(rows, tf.maximum(
      _TRIM_BUCKET, (count + _TRIM_BUCKET - 1) // _TRIM_BUCKET * _TRIM_BUCKET))
  size = tf.where(trim, size, rows)
  order = tf.where(trim, tf.argsort(tf.cast(tf.logical_not(keep), tf.int32),
                                    stable=True), tf.range(rows))[:size]

  def take(t):
    return tf.gather(t, order) if t is not None else None
  return (tf.nest.map_structure(take, x), tf.nest.map_structure(take, y),
          take(weight), take(seal))


def _draws_do_not_follow_rows(optimizer):
  """Whether this step's random draws are as many whatever the row count:
  a bool tensor, or None when that cannot be known at trace time.

  The gradient quantization draws one uniform per element of the
  per-example gradients (``[rows, ...]``): while any gradient bit width is
  on, trimming would make the number of draws follow the realized batch
  size, and docs/PRIVACY.md's coupling argument takes it to depend on the
  plan only. Every other draw (DP noise, update quantization, the layers'
  rounding keys) is one key per tensor or one value per model parameter.
  """
  if not getattr(optimizer, "_gradient_quantization", False):
    return tf.constant(True)
  bits = getattr(optimizer, "_bits_var", None)
  if bits is None:
    return None
  return tf.logical_not(tf.reduce_any(bits > 0))


def owned_train_step(model, data, *, loss=None):
  """One owned DP training step of `model` on `data`.

  `data` is ``(x, y[, sample_weight])`` or a sealed batch of the library's
  sampler ``(x, y, mask, seal)``.
  """
  x, y, sample_weight, seal = _unpack(data)
  x, y, sample_weight, seal = _trim_padding(model, x, y, sample_weight, seal)
  optimizer = model.optimizer
  if not hasattr(optimizer, "_owned_step"):
    V.fail("model.optimizer", type(optimizer).__name__,
           "a DPQuant optimizer (DPQuantOptimizer or DPQuantAdamOptimizer)",
           TypeError)
  state = getattr(model, _STATE, None)
  if state is None:
    V.fail("model", model.name, "a model prepared with install_dp_train_step")
  if tf.executing_eagerly():
    # Eagerly the forward pass below runs at once: check the model first, on
    # a trace of this step's forward pass and loss, made only while the
    # model is unchecked (in a trace, a refused step never runs: the check
    # reads the step's own graph).
    optimizer._check_calling_model(  # pylint: disable=protected-access
        model, lambda: tf.function(lambda: per_example_loss(
            model, y, model(x, training=True), sample_weight, loss=loss)
        ).get_concrete_function().graph)
  with tf.GradientTape() as tape:
    y_pred = model(x, training=True)
    losses, real = per_example_loss(model, y, y_pred, sample_weight,
                                    loss=loss)
  q, seeded = sealed_sampling_probability(state, seal, real)
  noted = []
  flag = getattr(optimizer, "sampler_seeded_var", None)
  if flag is not None:   # the statement names a seeded sampler
    noted.append(flag.assign(tf.maximum(flag.read_value(),
                                        tf.cast(seeded, flag.dtype))))
  with tf.control_dependencies(noted):
    q = tf.identity(q)
  # The forward pass ran in this graph: the optimizer's model check reads
  # its state writes from it (no second trace of the model).
  optimizer._owned_step(model, x, losses, tape, q,  # pylint: disable=protected-access
                        forward_graph=tf.compat.v1.get_default_graph())
  # Displayed loss: mean over real rows (padding excluded).
  count = tf.reduce_sum(tf.cast(real, tf.float32))
  tracker = None
  if model.compiled_loss is not None:
    if not model.compiled_loss.built:
      model.compiled_loss.build(y_pred)
    if model.compiled_loss.metrics:
      tracker = model.compiled_loss.metrics[0]
  if tracker is not None:
    tracker.update_state(tf.reduce_sum(losses) / tf.maximum(count, 1.0),
                         sample_weight=count)
  if model.compiled_metrics is not None:
    model.compiled_metrics.update_state(y, _masked(y_pred, real), None)
  return model.get_metrics_result()


def install_dp_train_step(model, *, loss=None):
  """Makes `model.fit` take every step through the owned DP step.

  ``PrivacyCallback`` calls this (``set_model``, before Keras builds the
  train function) and so does ``make_private``; call it yourself to fit
  without either. Steps on batches of the library's sampler
  (``poisson_dataset``) consumed as drawn are recorded at its q; any other
  batch (arrays, generators, a transformed sampler, ``validation_split``) at
  q = 1: no amplification by sampling, each record counted in every step,
  at most once per step.

  Args:
    model: a compiled ``tf.keras.Model`` with a DPQuant optimizer.
    loss: per-example loss (default: the compiled loss).

  Returns:
    `model`.
  """
  if not isinstance(model, tf.keras.Model):
    V.fail("model", type(model).__name__, "a tf.keras.Model", TypeError)
  if getattr(model, _STATE, None) is None or loss is not None:
    if getattr(model, _STATE, None) is None:
      object.__setattr__(model, _STATE, _SealState(model))
    step = functools.partial(owned_train_step, model, loss=loss)
    # Plain attributes (no Keras tracking): the step is not saved state.
    object.__setattr__(model, "train_step", step)
    # A train function traced before used the old step: rebuild it.
    object.__setattr__(model, "train_function", None)
  opt = getattr(model, "optimizer", None)
  track = getattr(opt, "_track_trackable", None)
  if track is not None:
    # The consumed samplers travel with the optimizer's checkpoints (a
    # deferred restore fills them when tracked after the restore).
    track(getattr(model, _STATE).seen, name="dp_seal_seen", overwrite=True)
  var = getattr(opt, "sampling_probability_var", None)
  if var is not None and float(var.numpy()) < 0:
    # Until the first step shows a seal, project budgets at q = 1.
    opt.set_sampling_probability(1.0)
  return model


def _spec_zeros(spec):
  """A one-row zero tensor of a (batch-first) TensorSpec."""
  shape = [1] + [d if d is not None else 1 for d in spec.shape.as_list()[1:]]
  return tf.zeros(shape, spec.dtype)


def prepare_first_step(model, data):
  """Creates the variables the first train step would create, before `fit`.

  ``tf.function`` traces a function a second time when its first trace
  created variables; Keras' first train step creates the optimizer's weights
  (iterations, hyperparameters, slots, the per-variable gradient bit widths)
  and the compiled metrics, so without this the DP step, most of a first
  epoch's cost, is traced twice. This creates them eagerly from the model's
  variables, its output shapes and the shapes of `data`'s elements: nothing
  is read from `data` (no element is consumed, no generator advances) and
  nothing is computed on it. ``make_private`` and ``examples/train.py`` call
  it; call it yourself before your own ``fit``.

  Args:
    model: a compiled, built ``tf.keras.Model`` with known outputs (a
      Functional or Sequential model, or one that has been called).
    data: the ``tf.data.Dataset`` (or distributed dataset) ``fit`` will read:
      ``(x, y)``, ``(x, y, sample_weight)`` or a sealed batch of the
      library's sampler ``(x, y, mask, seal)``.

  Returns:
    `model`.
  """
  if not isinstance(model, tf.keras.Model) or model.optimizer is None:
    V.fail("model", getattr(model, "name", type(model).__name__),
           "a compiled tf.keras.Model (call model.compile first)")
  spec = getattr(data, "element_spec", None)
  if spec is None:
    V.fail("data", type(data).__name__, "a tf.data.Dataset (or a "
           "distributed dataset) whose element_spec gives the batch shapes")
  parts = spec if isinstance(spec, (tuple, list)) else (spec,)
  y_spec = parts[1] if len(parts) > 1 else None
  outputs = getattr(model, "outputs", None)
  if not model.built or not outputs:
    V.fail("model", model.name, "a built model with known outputs (a "
           "Functional or Sequential model with an input shape, or one that "
           "has been called)")
  strategy = model.distribute_strategy
  with strategy.scope():
    optimizer = model.optimizer
    variables = model.trainable_variables
    if hasattr(optimizer, "_owned_step"):   # the gradient bit widths
      optimizer.build(variables, check_names=False)
    create = getattr(optimizer, "_create_all_weights", None)
    if callable(create):   # legacy optimizers (the DP ones among them)
      create(variables)
    elif not getattr(optimizer, "_built", True):   # tf.keras' new optimizers
      optimizer.build(variables)
    y_pred = [tf.zeros([1] + list(o.shape[1:]), o.dtype) for o in outputs]
    y_pred = y_pred[0] if len(y_pred) == 1 else y_pred
    if model.compiled_loss is not None and not model.compiled_loss.built:
      model.compiled_loss.build(y_pred)
    metrics = model.compiled_metrics
    if (metrics is not None and not metrics.built and
        isinstance(y_spec, tf.TensorSpec)):
      metrics.build(y_pred, _spec_zeros(y_spec))
  return model


def has_owned_step(model) -> bool:
  """Whether `install_dp_train_step` prepared `model`."""
  return getattr(model, _STATE, None) is not None

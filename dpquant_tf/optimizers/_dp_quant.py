"""DPQuantOptimizer / DPQuantAdamOptimizer: TF-Privacy optimizers with
per-layer quantized per-example gradients and in-graph privacy events.

The optimizer is a thin adapter: it owns the variables (clip, noise
multiplier, bit widths, generator, event table) and calls the pure mechanisms
of ``dpquant_tf.privacy`` in order. See docs/PRIVACY.md.
"""

import contextlib
import enum
import logging
import weakref
from typing import Dict, List, Mapping, Optional

import tensorflow as tf
from tensorflow_privacy.privacy.dp_query import gaussian_query
from tensorflow_privacy.privacy.optimizers import dp_optimizer_keras

from dpquant_tf import _validation as V
from dpquant_tf.distribute import _replica as _dist
from dpquant_tf.optimizers import _guards
from dpquant_tf.optimizers import _state
from dpquant_tf.privacy import _events
from dpquant_tf.privacy import _mechanisms as M

__all__ = ["DPQuantAdamOptimizer", "DPQuantOptimizer", "PerExampleMethod"]

_log = logging.getLogger(__name__)
_NOTED = object()   # default of _clip_quantize_sum's valid=


class PerExampleMethod(enum.Enum):
  """How per-example gradients are computed.

  AUTO: ``dpquant_tf.perexample`` (fast layer taps where possible, jacobian
    for the rest) when that module is available, else the jacobian.
  JACOBIAN: always ``tape.jacobian`` (TF-Privacy's method).
  """
  AUTO = "auto"
  JACOBIAN = "jacobian"


class _DPQuantMixin(_state.DPStateMixin):
  """Shared implementation of the DPQuant optimizers (see DPQuantOptimizer)."""

  # Audit hook (white-box auditing only): None, or a function var_list ->
  # tensors added to the clipped per-example sum before noise. Set and
  # removed only by ``dpquant_tf.audit.gradient_canaries`` (docs/AUDIT.md).
  _audit_hook = None
  # The model and batch of the owned step being traced (guards.StepBinding),
  # set only by dp_step for the duration of its minimize call.
  _step_binding = None
  # q recorded for the bound step: the library's sampler's rate when the
  # batch's seal proves it (training._step), else 1.0 (no amplification).
  _bound_sampling_probability = 1.0

  def __init__(self,
               l2_norm_clip: float,
               noise_multiplier: float,
               num_microbatches: Optional[int] = None,
               gradient_accumulation_steps: int = 1,
               *,
               ledger=None,
               gradient_bits: _state.BitsSpec = None,
               gradient_quantization: bool = True,
               sensitivity_mode=M.SensitivityMode.RECLIP,
               update_bits: Optional[int] = None,
               expected_batch_size: Optional[float] = None,
               sampling_probability: Optional[float] = None,
               dataset_size: Optional[int] = None,
               seed: Optional[int] = None,
               noise_seed: Optional[int] = None,
               per_example_method=PerExampleMethod.AUTO,
               event_table_size: int = _events.DEFAULT_TABLE_SIZE,
               **kwargs):
    l2_norm_clip = V.check_positive("l2_norm_clip", l2_norm_clip)
    noise_multiplier = V.check_non_negative("noise_multiplier",
                                            noise_multiplier)
    if num_microbatches is not None:
      num_microbatches = V.check_int("num_microbatches", num_microbatches,
                                     low=1)
    gradient_accumulation_steps = V.check_int(
        "gradient_accumulation_steps", gradient_accumulation_steps, low=1)
    gradient_bits = _state.check_bits_spec("gradient_bits", gradient_bits)
    gradient_quantization = V.check_type(
        "gradient_quantization", gradient_quantization, bool)
    if not gradient_quantization and _state.any_bits(gradient_bits):
      V.fail("gradient_bits", gradient_bits, "None or 0 with "
             "gradient_quantization=False (no quantization branch is built)")
    sensitivity_mode = V.check_enum("sensitivity_mode", sensitivity_mode,
                                    M.SensitivityMode)
    if update_bits is not None:
      update_bits = _state.check_bits("update_bits", update_bits,
                                      allow_zero=False)
    if expected_batch_size is not None:
      expected_batch_size = V.check_positive("expected_batch_size",
                                             expected_batch_size)
    if sampling_probability is not None:
      sampling_probability = V.check_probability("sampling_probability",
                                                 sampling_probability)
    if dataset_size is not None:
      dataset_size = V.check_int("dataset_size", dataset_size, low=1)
    if seed is not None and noise_seed is not None:
      V.fail("noise_seed", noise_seed, "None when seed= is given (they are "
             "the same setting)")
    if noise_seed is not None:
      seed = V.check_int("noise_seed", noise_seed)
    elif seed is not None:
      seed = V.check_int("seed", seed)
    per_example_method = V.check_enum("per_example_method",
                                      per_example_method, PerExampleMethod)
    event_table_size = V.check_int("event_table_size", event_table_size,
                                   low=1)
    query = gaussian_query.GaussianSumQuery(l2_norm_clip,
                                            l2_norm_clip * noise_multiplier)
    super().__init__(query, num_microbatches, gradient_accumulation_steps,
                     **kwargs)
    self._initial_gradient_bits = gradient_bits
    self._gradient_quantization = gradient_quantization
    self._sensitivity_mode = sensitivity_mode
    self._expected_batch_size = expected_batch_size
    self._dataset_size = dataset_size
    self._initial_sampling_probability = sampling_probability
    self._seed = seed  # never serialized, never logged
    self._issued = _guards.IssuedGradients()
    self._checked_models = weakref.WeakSet()
    self._per_example_method = per_example_method
    self._event_table_size = event_table_size
    self._pending_bits: Dict[str, int] = {}
    if isinstance(gradient_bits, Mapping):
      self._pending_bits.update(gradient_bits)
    self._bits_var = None
    self._var_names: Optional[List[str]] = None
    self._var_sizes: Optional[List[int]] = None
    self._create_dp_state(l2_norm_clip, noise_multiplier, update_bits,
                          sampling_probability)
    if seed is not None:
      _log.warning(
          "%s draws seeded DP noise: the guarantee holds only while the seed "
          "stays secret, and a run restarted with the same seed replays the "
          "same noise. Use a seed for tests and paired studies only.",
          self._name)
    # Preprocessing layers the ledger declares public (the model check).
    self._dp_public_state = tuple(getattr(ledger, "public_state", ()))
    if ledger is not None:
      ledger.attach(self)
      if sampling_probability is None and dataset_size is None:
        _log.warning(
            "%s attached to a ledger without sampling_probability= or "
            "dataset_size=: steps taken before set_sampling_probability() "
            "cannot be accounted and ledger queries will raise "
            "UnknownSamplingProbabilityError.", self._name)

  # ------------------------------------------------------------- checks
  @staticmethod
  def _check_var_list(var_list) -> None:
    bad = [v.name for v in var_list
           if "batch_normalization" in v.name.lower()]
    if bad:
      V.fail("var_list", bad, "free of BatchNormalization variables: batch "
             "statistics couple the examples of a batch and break per-example"
             " DP; use GroupNormalization (dpquant_tf.quantization.fix_model)")

  @staticmethod
  def check_model(model: tf.keras.Model) -> None:
    """Raises ValueError if `model` has layers that break per-example DP.

    Uses ``dpquant_tf.quantization.validate_model`` (every problem at once:
    BatchNormalization, range-tracking quantizers) when available.
    """
    try:
      # pylint: disable-next=g-import-not-at-top
      from dpquant_tf.quantization import validate_model
    except ImportError:
      validate_model = None
    problems = []
    if validate_model is not None:
      problems = list(validate_model(model, strict=False))
    else:
      problems = [f"layer {l.name!r} (BatchNormalization)"
                  for l in model.submodules
                  if isinstance(l, tf.keras.layers.BatchNormalization)]
    if problems:
      V.fail("model", model.name, "free of layers that break per-example DP "
             "(BatchNormalization couples the examples of a batch); "
             "problems: " + "; ".join(problems))

  def _check_loss(self, loss, x=None) -> List[tf.Operation]:
    """Trace-time loss checks; returns runtime checks for the update."""
    if loss.shape.rank == 0:
      V.fail("loss", loss, "a per-example loss vector (shape [batch]); build "
             "the Keras loss with reduction=tf.keras.losses.Reduction.NONE")
    checks = _guards.check_loss_rows(loss, x)
    batch = loss.shape[0]
    nmb = self._num_microbatches
    if batch is not None and nmb is not None and batch % nmb:
      V.fail("num_microbatches", nmb, f"a divisor of the batch size {batch}")
    if (self._expected_batch_size is not None and nmb is not None and
        batch is not None and batch != nmb):
      V.fail("num_microbatches", nmb, "None or the batch size when "
             "expected_batch_size is set (one example per microbatch)")
    return checks

  def _check_calling_model(self, model, forward_graph=None) -> None:
    """Model checks once per model (``privacy.check_model_privacy``).

    `forward_graph`: a function graph that holds the step's own forward
    pass and loss, or a callable that traces one (called only when `model`
    is not checked yet): its state writes are read from it (no second trace
    of the model). Anything else (None, an eager graph): the check traces
    the model itself.
    """
    if model is None or model in self._checked_models:
      return
    if callable(forward_graph):
      forward_graph = forward_graph()
    try:
      # pylint: disable-next=g-import-not-at-top
      from dpquant_tf.privacy import _model_checks
    except ImportError:
      _model_checks = None
    if _model_checks is not None:
      try:
        if not getattr(forward_graph, "building_function", False):
          forward_graph = None   # no traced forward pass: trace the model
        with tf.init_scope():
          _model_checks.check_model_privacy(model, step_graph=forward_graph)
      except ValueError as e:
        # A plain ValueError: autograph re-raises only exact builtin types
        # from a trace (a subclass would surface as StagingError).
        raise ValueError(str(e)) from e
    else:
      self.check_model(model)
    self._checked_models.add(model)

  # ----------------------------------------------------- the owned step
  def install_train_step(self, model, *, loss=None):
    """Makes ``model.fit`` take every step through this optimizer's owned DP
    step (``dpquant_tf.training.install_dp_train_step``); returns `model`."""
    from dpquant_tf.training import _step  # pylint: disable=g-import-not-at-top
    return _step.install_dp_train_step(model, loss=loss)

  def dp_step(self, model, x, loss, tape):
    """One DP step of `model` on the batch `x`: the only way to train.

    The owned ``train_step`` (``dpquant_tf.make_private``, or the one
    ``PrivacyCallback`` installs) and custom loops call this instead of
    ``minimize``/``apply_gradients``. The model is checked by layer class
    (``privacy.check_model_privacy``), the loss must have one entry per row
    of `x`, and the step is recorded WITHOUT amplification by sampling
    (q = 1: every record may be in every step, at most once) unless the
    library's own sampler feeds it.

    Args:
      model: the ``tf.keras.Model`` whose forward pass computed `loss`.
      x: the step's input batch (the rows the loss must match).
      loss: per-example loss, shape [rows of x], computed under `tape`.
      tape: the ``tf.GradientTape`` that recorded the forward pass.

    Returns:
      The optimizer's update op (``apply_gradients``' result).

    Raises:
      ValueError: a model that breaks per-example DP, a loss that is not one
        entry per input row.
    """
    # Traced: the loss's graph holds the forward pass and the loss (the tape
    # differentiates through them), so the model check reads their writes.
    return self._owned_step(model, x, loss, tape, 1.0,
                            forward_graph=getattr(loss, "graph", None))

  def _owned_step(self, model, x, loss, tape, sampling_probability,
                  forward_graph=None):
    """`dp_step` recording `sampling_probability` (a float64 tensor that the
    owned train step derives from the library sampler's seal, else 1).
    `forward_graph`: the graph in which the owned train step itself ran the
    forward pass (see ``StepBinding``)."""
    with self._bind(model, x, sampling_probability, forward_graph):
      return self.minimize(loss, model.trainable_variables, tape=tape)

  @contextlib.contextmanager
  def _bind(self, model, x, sampling_probability=1.0, forward_graph=None):
    """Hands `model` and its batch `x` to ``_compute_gradients`` (trace
    time, this thread's Python call only); restored on exit."""
    binding = _guards.StepBinding(model, x, forward_graph)
    previous = (self._step_binding, self._bound_sampling_probability)
    self._step_binding = binding
    self._bound_sampling_probability = sampling_probability
    try:
      yield binding
    finally:
      self._step_binding, self._bound_sampling_probability = previous

  # --------------------------------------------------- per-example grads
  def _jacobian_per_example_gradients(self, loss, var_list, tape,
                                      num_microbatches):
    """TF-Privacy's path: jacobian of the microbatch mean losses."""
    with tape:
      microbatch_losses = tf.reduce_mean(
          tf.reshape(loss, [num_microbatches, -1]), axis=1)
    return tape.jacobian(microbatch_losses, var_list,
                         unconnected_gradients=tf.UnconnectedGradients.ZERO)

  def _per_example_gradients(self, loss, var_list, tape,
                             num_microbatches=None):
    """One ``[num_microbatches, *var.shape]`` tensor per variable.

    Also notes, for this trace and replica, the examples the model's tapped
    layers marked invalid (an out-of-range Embedding id): the following
    ``_clip_quantize_sum`` gives their microbatches scale 0.
    """
    if num_microbatches is None:
      num_microbatches = self._microbatch_count(loss)
    self._note_validity(var_list, num_microbatches)
    if self._per_example_method is PerExampleMethod.AUTO:
      try:
        from dpquant_tf import perexample  # pylint: disable=g-import-not-at-top
        fast = perexample.per_example_gradients
      except (ImportError, AttributeError):
        fast = None
      if fast is not None:
        return list(fast(loss, var_list, tape, num_microbatches,
                         fallback=self._jacobian_per_example_gradients))
    return list(self._jacobian_per_example_gradients(loss, var_list, tape,
                                                     num_microbatches))

  def _note_validity(self, var_list, num_microbatches):
    """Stores the ``[M]`` validity mask of this trace and replica (or None)."""
    try:
      from dpquant_tf import perexample  # pylint: disable=g-import-not-at-top
      valid = perexample.example_validity(var_list, num_microbatches)
    except (ImportError, AttributeError):
      valid = None
    if not hasattr(self, "_validity"):
      self._validity = weakref.WeakKeyDictionary()
    key = _validity_key()
    self._validity.setdefault(key[0], {})[key[1]] = valid

  def _noted_validity(self):
    """The mask ``_note_validity`` stored for this trace and replica."""
    key = _validity_key()
    store = getattr(self, "_validity", None)
    per_graph = store.get(key[0]) if store is not None else None
    return per_graph.get(key[1]) if per_graph else None

  def _microbatch_count(self, loss):
    if self._num_microbatches is None:
      return tf.shape(loss)[0]
    return self._num_microbatches

  # ------------------------------------------------------------- noise
  def _per_replica_noise_stddev(self, stddev):
    """Hook for tf.distribute: the noise each replica adds.

    With one replica this is `stddev`. With R > 1 replicas in sync, whose
    noised sums Keras adds (SUM all-reduce), each replica adds
    stddev / sqrt(R) from its own stream of the (mirrored) generator, so the
    total is exactly N(0, stddev^2); see dpquant_tf/distribute/_replica.py.
    """
    _dist.check_generator_strategy(self._generator)
    return _dist.replica_noise_stddev(stddev)

  # ------------------------------------------------------ the DP step
  def _compute_gradients(self, loss, var_list, grad_loss=None, tape=None):
    """DP step: per-example grads, quantize, clip, sum, noise, normalize."""
    del grad_loss  # Not supported by DP optimizers (as in TF-Privacy).
    self._was_dp_gradients_called = True
    if not callable(loss) and tape is None:
      raise ValueError("`tape` is required when a `Tensor` loss is passed.")
    tape = tape if tape is not None else tf.GradientTape()
    with tape:
      if callable(loss):
        if not callable(var_list):
          tape.watch(var_list)
        loss = loss()
      if callable(var_list):
        var_list = var_list()
    var_list = tf.nest.flatten(var_list)
    loss = tf.convert_to_tensor(loss)
    binding = self._step_binding
    if binding is None:
      V.fail("optimizer step", f"{self._name} called without a model and "
             "batch (Keras' default train_step, minimize or "
             "_compute_gradients in a custom loop)", _guards.UNATTRIBUTED_FIX,
             _guards.UnattributedStepError)
    self._check_calling_model(binding.model, binding.forward_graph)
    runtime_checks = self._check_loss(loss, binding.x)
    self.build(var_list, check_names=False)
    with tf.keras.backend.name_scope(self._name + "/gradients"):
      nmb = self._microbatch_count(loss)
      taps = self._per_example_taps(loss, var_list, tape, nmb)
      if taps is None:
        grads = self._per_example_gradients(loss, var_list, tape, nmb)
        summed, sens_ratio = self._clip_quantize_sum(grads)
      else:
        summed, sens_ratio = self._clip_quantize_sum_taps(taps)
      if self._audit_hook is not None:  # dpquant_tf.audit only
        summed = [t + tf.cast(e, t.dtype)
                  for t, e in zip(summed, self._audit_hook(var_list))]
      final = self._noise_and_normalize(summed, loss, nmb, sens_ratio,
                                        runtime_checks,
                                        q=self._bound_sampling_probability)
    self._issued.issue(final)
    return list(zip(final, var_list))

  def apply_gradients(self, grads_and_vars, *args, **kwargs):
    """Applies the DP gradients of this optimizer's own step, nothing else.

    Raises:
      UnrecordedUpdateError: `grads_and_vars` holds gradients that this
        optimizer's ``_compute_gradients`` did not return in this step (raw
        gradients, modified ones, or ones already applied), also on a fresh
        optimizer and under ``python -O`` (docs/METHOD.md section 4, inv. 10).
    """
    pairs = self._issued.redeem(grads_and_vars)
    return super().apply_gradients(pairs, *args, **kwargs)

  def _per_example_taps(self, loss, var_list, tape, num_microbatches):
    """The fast path's taps (``perexample.collect``), or None (jacobian)."""
    if self._per_example_method is not PerExampleMethod.AUTO:
      return None
    try:
      from dpquant_tf import perexample  # pylint: disable=g-import-not-at-top
      collect = perexample.collect
    except (ImportError, AttributeError):
      return None
    # None: one example per microbatch, known statically (ghost clipping).
    per_example = None if self._num_microbatches is None else num_microbatches
    return collect(loss, var_list, tape, per_example,
                   fallback=self._jacobian_per_example_gradients)

  def _clip_quantize_sum_taps(self, taps):
    """Like `_clip_quantize_sum`; with gradient quantization off, the clipped
    sum comes from `taps.clipped_sum` (ghost norms, no materialized
    per-example Dense gradients). Same clip, same sensitivity (C)."""
    valid = taps.validity()

    def quantized():
      return self._clip_quantize_sum(taps.per_example_gradients(),
                                     valid=valid)

    def plain():
      clip = self.l2_norm_clip_var
      summed, _ = taps.clipped_sum(clip)
      # Safety net for invariant 9: a sum that is not finite means some
      # layer's clipped sum let a non-finite example through (0 * NaN).
      # Recompute that step from materialized per-example gradients, where
      # clip_per_example selects such examples away (rare: runs only then).
      finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(t))
                              for t in summed])

      def materialized():
        grads = M.clip_per_example(taps.per_example_gradients(), clip, valid)
        return [tf.reduce_sum(g, axis=0) for g in grads]

      summed = tf.cond(finite, lambda: list(summed), materialized)
      return summed, tf.constant(1.0, tf.float64)

    if not self._gradient_quantization:   # no quantized branch is built
      return plain()
    return tf.cond(tf.reduce_any(self._bits_var > 0), quantized, plain)

  def _clip_quantize_sum(self, grads, valid=_NOTED):
    """Clips (and quantizes) per-example gradients; returns sums and the
    sensitivity in units of C (float64).

    ``valid`` (``[M]`` bool or None; default: the mask
    ``_per_example_gradients`` noted for this trace) zeroes invalid
    microbatches in both clips.
    """
    clip = self.l2_norm_clip_var
    bits = self._bits_var
    if valid is _NOTED:
      valid = self._noted_validity()
    clipped = M.clip_per_example(grads, clip, valid)
    reclip = self._sensitivity_mode is M.SensitivityMode.RECLIP

    def quantized():
      q = M.quantize_per_example(clipped, bits, clip, self._generator)
      return M.clip_per_example(q, clip, valid) if reclip else q

    processed = (tf.cond(tf.reduce_any(bits > 0), quantized,
                         lambda: list(clipped))
                 if self._gradient_quantization else list(clipped))
    # The sum over examples is accumulated in float64 and cast once: a
    # float32 sum's rounding, which no single example owns, could move the
    # result by more than C when one example is removed (docs/PRIVACY.md).
    summed = [tf.cast(tf.reduce_sum(tf.cast(g, tf.float64), axis=0), g.dtype)
              for g in tf.nest.flatten(processed)]
    return summed, M.sensitivity_ratio(self._sensitivity_mode,
                                       self._var_sizes, bits, clip)

  def _noise_and_normalize(self, summed, loss, nmb, sens_ratio,
                           runtime_checks=(), q=1.0):
    sigma = self.noise_multiplier_var
    stddev = tf.cast(sigma, tf.float32) * self.l2_norm_clip_var
    stddev = self._per_replica_noise_stddev(stddev)
    noised = M.add_gaussian_noise(summed, stddev, self._generator)
    rows = None
    if self._num_microbatches is not None:
      rows = tf.shape(loss)[0] // self._num_microbatches
    z = M.effective_noise_multiplier(sigma, sens_ratio, rows)
    with tf.control_dependencies(list(runtime_checks)):
      # q comes from the owned step (the library's own sampler), else 1:
      # never from the loss length or a declared rate.
      q = tf.cast(q, tf.float64)
      record = tf.group(
          self._record_privacy_event(q, z, tf.shape(loss)[0]),
          # Budget projections (PrivacyCallback) follow the recorded q.
          self.sampling_probability_var.assign(q))
    # Global expected batch size, or the global number of microbatches.
    normalizer = _dist.global_normalizer(nmb, self._expected_batch_size)
    with tf.control_dependencies([record] + list(runtime_checks) +
                                 _dist.update_quantization_guard(
                                     self.update_bits_var)):
      final = [g / tf.cast(normalizer, g.dtype) for g in noised]
    ubits = self.update_bits_var
    return tf.cond(ubits > 0,
                   lambda: M.quantize_update(final, ubits, self._generator),
                   lambda: list(final))

  def _current_sampling_probability(self) -> Optional[float]:
    q = float(self.sampling_probability_var.numpy())
    return None if q < 0 else q

  def get_gradients(self, loss, params):
    raise NotImplementedError(
        "DPQuant optimizers support TF2 eager/tf.function training "
        "(Keras fit, minimize, _compute_gradients) only.")

  # ------------------------------------------------------------ config
  def get_config(self):
    base_cls = [c for c in type(self).__mro__
                if c.__module__.startswith("tf_keras")][0]
    config = base_cls.get_config(self)
    bits = self.gradient_bits()
    if set(bits) == {"*"}:
      bits = bits["*"] or None
    elif not bits:
      bits = None
    config.update({
        "l2_norm_clip": float(self.l2_norm_clip_var.numpy()),
        "noise_multiplier": float(self.noise_multiplier_var.numpy()),
        "num_microbatches": self._num_microbatches,
        "gradient_accumulation_steps": self.gradient_accumulation_steps,
        "gradient_bits": bits,
        "gradient_quantization": self._gradient_quantization,
        "sensitivity_mode": self._sensitivity_mode.value,
        "update_bits": int(self.update_bits_var.numpy()) or None,
        "expected_batch_size": self._expected_batch_size,
        # The current q (set_sampling_probability), None while unknown.
        "sampling_probability": self._current_sampling_probability(),
        "dataset_size": self._dataset_size,
        # Never serialize a seed (seed= or noise_seed=): a restored
        # optimizer must draw fresh noise.
        "seed": None,
        "per_example_method": self._per_example_method.value,
        "event_table_size": self._event_table_size,
    })
    return config

  @classmethod
  def from_config(cls, config, custom_objects=None):
    config = dict(config)
    if "lr" in config:
      config["learning_rate"] = config.pop("lr")
    if isinstance(config.get("learning_rate"), dict):
      config["learning_rate"] = (
          tf.keras.optimizers.schedules.deserialize(
              config["learning_rate"], custom_objects=custom_objects))
    return cls(**config)


def _validity_key():
  """(graph or a module-level eager key, replica key) of the current trace."""
  if tf.executing_eagerly():
    graph = _EAGER
  else:
    graph = tf.compat.v1.get_default_graph()
  ctx = tf.distribute.get_replica_context()
  rid = getattr(ctx, "_replica_id_in_sync_group", None) if ctx else "cross"
  return graph, (rid if isinstance(rid, (int, str)) or rid is None else None)


class _EagerKey:
  pass


_EAGER = _EagerKey()


@tf.keras.utils.register_keras_serializable(package="dpquant_tf")
class DPQuantOptimizer(_DPQuantMixin,
                       dp_optimizer_keras.GenericDPSGDOptimizer):
  """DP-SGD with per-layer quantized per-example gradients (Keras 2).

  A subclass of TF-Privacy's ``GenericDPSGDOptimizer`` with TF-Privacy's
  argument names, so ``DPKerasSGDOptimizer(l2_norm_clip=..., noise_multiplier
  =..., num_microbatches=..., learning_rate=...)`` becomes
  ``DPQuantOptimizer(...)``. Each step:

  1. per-example (microbatch) gradients (fast layer taps or jacobian);
  2. clip each to L2 norm C (as TF-Privacy);
  3. optional per-variable stochastic quantization Q(g; b, C) (docs/METHOD.md
     sec. 3), then re-clip to C (RECLIP, sensitivity C) or not (BOUND,
     sensitivity C + sqrt(sum_l d_l (C/L_l)^2));
  4. sum, add N(0, (z C)^2) from the optimizer's ``tf.random.Generator``;
  5. divide by ``expected_batch_size`` (Poisson batches) or the number of
     microbatches (TF-Privacy);
  6. optional stochastic quantization of the update (post-processing);
  7. record the step's privacy event (q, z_eff) in an in-graph table.

  Formal guarantee: each step is the sampled Gaussian mechanism with noise
  multiplier z_eff = z * C / sensitivity (halved for microbatches of more
  than one example) w.r.t. add/remove-one adjacency, provided the batches
  are Poisson samples with probability q; the ledger composes these events.

  Args:
    l2_norm_clip: C > 0, clip norm (a tf.Variable ``l2_norm_clip_var``).
    noise_multiplier: z >= 0, noise std / C (``noise_multiplier_var``).
    num_microbatches: as TF-Privacy (None = one example per microbatch).
    gradient_accumulation_steps: as TF-Privacy; each call is one DP step.
    ledger: optional ``PrivacyLedger`` to attach to.
    gradient_bits: None (off), an int in [2, 24] for all variables, or a
      mapping from variable/layer name to bits (0 = exact).
    gradient_quantization: True (default): the step holds the gradient
      quantization branch, so ``set_gradient_bits`` can switch it on at any
      time without a retrace. False: no such branch is built (a smaller,
      faster-to-trace step for runs that never quantize gradients);
      ``set_gradient_bits`` then refuses any bit width but 0.
    sensitivity_mode: ``SensitivityMode.RECLIP`` (default) or ``BOUND``.
    update_bits: bits of the post-noise update quantization (None = off).
    expected_batch_size: normalizer for Poisson batches (q * N).
    sampling_probability: q of each step, for the privacy events.
    dataset_size: N; if given and q is not, q = batch / N (expected batch
      size when set, else the batch's rows).
    seed: seeds the generator (tests only); None = non-deterministic.
    per_example_method: ``PerExampleMethod.AUTO`` or ``JACOBIAN``.
    event_table_size: distinct (q, z) pairs the event table can hold.
    **kwargs: passed to ``tf.keras.optimizers.legacy.SGD``.
  """

  def __init__(self, l2_norm_clip, noise_multiplier, num_microbatches=None,
               gradient_accumulation_steps=1, *, name="DPQuantOptimizer",
               **kwargs):
    super().__init__(l2_norm_clip, noise_multiplier, num_microbatches,
                     gradient_accumulation_steps, name=name, **kwargs)


@tf.keras.utils.register_keras_serializable(package="dpquant_tf")
class DPQuantAdamOptimizer(_DPQuantMixin,
                           dp_optimizer_keras.GenericDPAdamOptimizer):
  """DP-Adam with per-layer quantized per-example gradients.

  Same arguments and guarantees as ``DPQuantOptimizer``; ``**kwargs`` go to
  ``tf.keras.optimizers.legacy.Adam`` (learning_rate, beta_1, ...). Adam's
  moments are post-processing of the noised gradient.
  """

  def __init__(self, l2_norm_clip, noise_multiplier, num_microbatches=None,
               gradient_accumulation_steps=1, *, name="DPQuantAdamOptimizer",
               **kwargs):
    super().__init__(l2_norm_clip, noise_multiplier, num_microbatches,
                     gradient_accumulation_steps, name=name, **kwargs)

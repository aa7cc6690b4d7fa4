"""Variables of the DPQuant optimizers: bit widths, noise, clip, event table.

A mixin for ``_DPQuantMixin``: it owns the ``tf.Variable``s (created with the
legacy optimizer's ``add_weight`` so checkpoints, including deferred restores,
cover them) and the Python API that assigns them without retracing.
"""

import secrets
from typing import Any, Dict, List, Mapping, Optional, Union

import tensorflow as tf

from dpquant_tf import _validation as V
from dpquant_tf.distribute import _replica as _dist
from dpquant_tf.privacy import _events
from dpquant_tf.privacy import _mechanisms as M
from dpquant_tf.privacy import _random

BitsSpec = Union[None, int, Mapping[str, int]]


def check_bits(name: str, value: Any, *, allow_zero: bool) -> int:
  if allow_zero and not isinstance(value, bool) and value == 0:
    return 0
  return V.check_int(name, value, low=M.MIN_BITS, high=M.MAX_BITS)


def check_bits_spec(name: str, spec: BitsSpec) -> BitsSpec:
  if spec is None:
    return None
  if isinstance(spec, Mapping):
    return {V.check_type(f"{name} key", k, str, "a variable or layer name"):
            check_bits(f"{name}[{k!r}]", v, allow_zero=True)
            for k, v in spec.items()}
  return check_bits(name, spec, allow_zero=False)


def any_bits(spec: BitsSpec) -> bool:
  """Whether a (checked) bits spec quantizes anything (a width above 0)."""
  if spec is None:
    return False
  if isinstance(spec, Mapping):
    return any(int(v) > 0 for v in spec.values())
  return int(spec) > 0


def name_matches(key: str, var_name: str) -> bool:
  """True if `key` is "*", the variable's name, or one of its layer names."""
  if key in ("*", var_name, var_name.split(":")[0]):
    return True
  return key in var_name.split(":")[0].split("/")[:-1]


class _Unsaved:
  """Plain holder so that Trackable/Checkpoint/SavedModel never see the
  generator (the ledger's ``_Attached`` does the same for optimizers)."""

  def __init__(self, generator: tf.random.Generator):
    self.generator = generator


class _Trace:
  """A function traced for one optimizer object (``_sync_spent_history_now``).

  A deep copy starts empty: the trace holds the original's variables, so
  the copy must trace its own.
  """

  def __init__(self):
    self.fn = None
    self.made_for = None

  def __deepcopy__(self, memo):
    return _Trace()


class _SpentHistory:
  """The steps this optimizer object took that a restore cannot undo.

  Never tracked (no checkpoint holds it, no restore rolls it back): a shadow
  copy of the event table as this object last wrote or saw it, and a bank of
  steps that a restore removed from the (checkpointed) event table. See
  ``DPStateMixin._sync_spent_history``.
  """

  def __init__(self, k: int, history_id: int):
    def var(shape, dtype, value, name):
      return tf.Variable(tf.fill(shape, tf.constant(value, dtype)) if shape
                         else tf.constant(value, dtype), trainable=False,
                         name=name, aggregation=tf.VariableAggregation.NONE)

    self.shadow_q = var([k], tf.float64, 0.0, "dp_shadow_q")
    self.shadow_z = var([k], tf.float64, 0.0, "dp_shadow_z")
    self.shadow_count = var([k], tf.int64, 0, "dp_shadow_count")
    self.shadow_used = var([], tf.int32, 0, "dp_shadow_used")
    self.shadow_id = var([], tf.int64, history_id, "dp_shadow_history_id")
    self.bank_q = var([k], tf.float64, 0.0, "dp_spent_q")
    self.bank_z = var([k], tf.float64, 0.0, "dp_spent_z")
    self.bank_count = var([k], tf.int64, 0, "dp_spent_count")
    self.bank_used = var([], tf.int32, 0, "dp_spent_used")
    self.bank_overflow = var([], tf.int32, 0, "dp_spent_overflow")
    # The table as restored when this object took another history (a
    # checkpoint of another run, e.g. a resumed run in a new process): the
    # steps that history held before this process (the ledger's journal
    # compares them with the journal's high-water mark).
    self.base_q = var([k], tf.float64, 0.0, "dp_base_q")
    self.base_z = var([k], tf.float64, 0.0, "dp_base_z")
    self.base_count = var([k], tf.int64, 0, "dp_base_count")
    self.base_used = var([], tf.int32, 0, "dp_base_used")
    self.base_id = var([], tf.int64, history_id, "dp_base_history_id")
    self.sync = _Trace()


class DPStateMixin:
  """DP state variables and their setters (see DPQuantOptimizer)."""

  _bits_var = None
  _var_names: Optional[List[str]] = None
  _var_sizes: Optional[List[int]] = None

  # ------------------------------------------------------------------ state
  def _dp_weight(self, name, shape, dtype, value):
    return self.add_weight(
        name, shape=shape, dtype=dtype, trainable=False,
        initializer=tf.keras.initializers.Constant(value))

  def _create_dp_state(self, clip, noise, update_bits, q):
    k = self._event_table_size
    self.l2_norm_clip_var = self._dp_weight("dp_l2_norm_clip", [],
                                            tf.float32, clip)
    self.noise_multiplier_var = self._dp_weight("dp_noise_multiplier", [],
                                                tf.float64, noise)
    self.update_bits_var = self._dp_weight("dp_update_bits", [], tf.int32,
                                           update_bits or 0)
    self.sampling_probability_var = self._dp_weight(
        "dp_sampling_probability", [], tf.float64, -1.0 if q is None else q)
    self._event_q = self._dp_weight("dp_event_q", [k], tf.float64, 0.0)
    self._event_z = self._dp_weight("dp_event_z", [k], tf.float64, 0.0)
    self._event_count = self._dp_weight("dp_event_count", [k], tf.int64, 0)
    self._event_used = self._dp_weight("dp_event_used", [], tf.int32, 0)
    self._event_overflow = self._dp_weight("dp_event_overflow", [], tf.int32,
                                           0)
    self._last_q = self._dp_weight("dp_last_q", [], tf.float64, -1.0)
    self._last_rows = self._dp_weight("dp_last_rows", [], tf.int32, 0)
    # The identity of this training history (public, not a secret: it only
    # tells a rollback to an earlier checkpoint of the same run from a
    # restore of another run's checkpoint). Saved with the event table.
    history_id = secrets.randbits(62)
    self._history_id = self._dp_weight("dp_history_id", [], tf.int64,
                                       history_id)
    # 1 once the owned step consumed a seeded sampler's batch (recorded at
    # q = 1); the ledger names the seeded sampler in its statement.
    self.sampler_seeded_var = self._dp_weight("dp_sampler_seeded", [],
                                              tf.int32, 0)
    self._spent_holder = _SpentHistory(k, history_id)
    # Created here, so under the tf.distribute strategy's scope when the
    # optimizer is (see distribute/_replica.check_generator_strategy), and
    # held outside the trackable graph: no checkpoint, SavedModel,
    # get_config or variables()/get_weights() ever holds the noise state
    # (docs/METHOD.md section 4, invariant 7). A restored optimizer is a new
    # object and draws from fresh OS entropy.
    self._noise_holder = _Unsaved(_random.make_generator(seed=self._seed))

  @property
  def _generator(self) -> tf.random.Generator:
    return self._noise_holder.generator

  @property
  def generator(self) -> tf.random.Generator:
    """The generator of DP noise and stochastic rounding (never saved)."""
    return self._noise_holder.generator

  @property
  def noise_is_seeded(self) -> bool:
    """True when the noise generator was seeded (``seed=``/``noise_seed=``).

    Seeded noise is a DP guarantee only while the seed stays secret, and a
    run restarted with the same seed replays the noise stream; the privacy
    statement should say so.
    """
    return self._seed is not None

  @property
  def sampler_is_seeded(self) -> bool:
    """True once a step consumed a seeded ``poisson_dataset``'s batch."""
    var = getattr(self, "sampler_seeded_var", None)
    return var is not None and int(var.numpy()) > 0

  @property
  def sensitivity_mode(self) -> M.SensitivityMode:
    return self._sensitivity_mode

  @property
  def expected_batch_size(self) -> Optional[float]:
    return self._expected_batch_size

  def build(self, var_list, check_names: bool = True):
    """Creates the per-variable bit-width variable for `var_list`.

    `check_names`: also run the name-based variable check (custom loops,
    where the model is unknown; under Keras fit the optimizer checks the
    model itself, by class and by the state a training pass writes).
    """
    var_list = tf.nest.flatten(var_list)
    names = [v.name for v in var_list]
    if self._bits_var is not None:
      if names != self._var_names:
        raise ValueError(
            f"Expected var_list={names} to be the variables this optimizer "
            f"was built for ({self._var_names}).")
      return
    if check_names:
      self._check_var_list(var_list)
    self._var_names = names
    self._var_sizes = [int(v.shape.num_elements()) for v in var_list]
    init = [self._initial_bits_for(n) for n in names]
    with tf.init_scope():
      self._bits_var = self._dp_weight("dp_gradient_bits", [len(names)],
                                       tf.int32, init)
    self._pending_bits = {}

  def _initial_bits_for(self, var_name: str) -> int:
    bits = 0
    if isinstance(self._initial_gradient_bits, int):
      bits = self._initial_gradient_bits
    for key, value in self._pending_bits.items():
      if name_matches(key, var_name):
        bits = value
    return bits

  def set_gradient_bits(self, bits: Union[int, Mapping[str, int]]) -> None:
    """Sets per-variable gradient bit widths (0 = exact); no retrace.

    Args:
      bits: an int for every variable, or a mapping from a variable name
        (``"dense/kernel:0"`` or ``"dense/kernel"``), a layer name
        (``"dense"``) or ``"*"`` (all variables) to bits in [2, 24] or 0;
        later keys override earlier ones.
    """
    if not isinstance(bits, Mapping):
      bits = {"*": check_bits("bits", bits, allow_zero=True)}
    else:
      bits = check_bits_spec("bits", bits)
    if not getattr(self, "_gradient_quantization", True) and any_bits(bits):
      V.fail("bits", bits, "0 for every variable: this optimizer was built "
             "with gradient_quantization=False (its step has no gradient "
             "quantization branch)")
    if self._bits_var is None:
      if "*" in bits:
        self._pending_bits = {}
      self._pending_bits.update(bits)
      return
    current = [int(b) for b in self._bits_var.numpy()]
    for key, value in bits.items():
      hits = [i for i, n in enumerate(self._var_names)
              if name_matches(key, n)]
      if not hits:
        V.fail("bits key", key, f"a variable or layer name among "
               f"{self._var_names}")
      for i in hits:
        current[i] = value
    self._bits_var.assign(current)

  def gradient_bits(self) -> Dict[str, int]:
    """Current bits per variable name (0 = exact); {} before the first step
    unless bits were set (then the pending settings keyed as given)."""
    if self._bits_var is None:
      out = {}
      if isinstance(self._initial_gradient_bits, int):
        out["*"] = self._initial_gradient_bits
      out.update(self._pending_bits)
      return out
    return dict(zip(self._var_names, (int(b) for b in self._bits_var.numpy())))

  def set_noise_multiplier(self, value: float) -> None:
    self.noise_multiplier_var.assign(
        V.check_non_negative("noise_multiplier", value))

  def set_l2_norm_clip(self, value: float) -> None:
    self.l2_norm_clip_var.assign(V.check_positive("l2_norm_clip", value))

  def set_sampling_probability(self, value: float) -> None:
    self.sampling_probability_var.assign(
        V.check_probability("sampling_probability", value))

  # ------------------------------------------------------------ events
  def _step_sampling_probability(self, loss):
    q = self.sampling_probability_var
    if self._dataset_size is None:
      return tf.identity(q)
    if self._expected_batch_size is not None:
      batch = tf.constant(self._expected_batch_size, tf.float64)
    else:  # the global batch: summed over replicas in sync
      batch = tf.cast(_dist.global_example_count(tf.shape(loss)[0]),
                      tf.float64)
    derived = tf.minimum(batch / float(self._dataset_size), 1.0)
    return tf.where(q >= 0, q, derived)

  def _sync_spent_history(self):
    """Banks the steps a restore removed from the event table. Pure TF ops
    (runs in the train step, before its event is recorded, and eagerly on
    every ``dp_events`` query).

    The shadow is the table as this object last wrote it. If the table now
    differs, something restored it: for the same history (a rollback to an
    earlier checkpoint of this run) the steps in the shadow but no longer in
    the table were taken and released, so they go to the bank; for another
    history (another run's checkpoint) every shadow step goes to the bank.
    A fresh optimizer restored from a checkpoint has an empty shadow, so a
    resumed run accounts exactly the checkpoint's steps plus its own.
    """
    h = self._spent_holder
    same = tf.equal(h.shadow_id, self._history_id)
    lost = tf.where(
        same,
        _events.table_difference(h.shadow_q, h.shadow_z, h.shadow_count,
                                 h.shadow_used, self._event_q, self._event_z,
                                 self._event_count, self._event_used),
        tf.where(tf.range(tf.shape(h.shadow_count)[0]) < h.shadow_used,
                 h.shadow_count, tf.zeros_like(h.shadow_count)))
    bank = _events.merge_event_tables(h.bank_q, h.bank_z, h.bank_count,
                                      h.bank_used, h.shadow_q, h.shadow_z,
                                      lost)

    def keep_or_table(base, table):
      return tf.where(same, base, table)

    return tf.group(
        h.base_q.assign(keep_or_table(h.base_q, self._event_q)),
        h.base_z.assign(keep_or_table(h.base_z, self._event_z)),
        h.base_count.assign(keep_or_table(h.base_count, self._event_count)),
        h.base_used.assign(keep_or_table(h.base_used, self._event_used)),
        h.base_id.assign(keep_or_table(h.base_id, self._history_id)),
        h.bank_q.assign(bank[0]), h.bank_z.assign(bank[1]),
        h.bank_count.assign(bank[2]), h.bank_used.assign(bank[3]),
        h.bank_overflow.assign(tf.maximum(h.bank_overflow,
                                          tf.cast(bank[4], tf.int32))),
        self._set_shadow(self._event_q, self._event_z, self._event_count,
                         self._event_used))

  def _sync_spent_history_now(self):
    """``_sync_spent_history`` from Python (the ``dp_events`` queries), as
    one traced call: run eagerly it is some 300 small ops, about 25 ms a
    query on a 2-core CPU, and a Keras epoch end with the privacy callback
    and the scheduler makes six. Traced again for another optimizer object
    (a shallow copy shares the holder) or if a variable it reads was
    replaced (the trace holds the ones it was made with); a deep copy starts
    without a trace (``_Trace``).
    """
    trace = self._spent_holder.sync
    reads = (self, self._event_q, self._event_z, self._event_count,
             self._event_used, self._history_id)
    if trace.fn is None or any(a is not b
                               for a, b in zip(trace.made_for, reads)):
      sync = self._sync_spent_history

      def run():
        sync()   # a tf.group: the function returns nothing

      trace.fn = tf.function(run, autograph=False)
      trace.made_for = reads
    trace.fn()

  def _set_shadow(self, q, z, counts, used):
    h = self._spent_holder
    return tf.group(h.shadow_q.assign(q), h.shadow_z.assign(z),
                    h.shadow_count.assign(counts), h.shadow_used.assign(used),
                    h.shadow_id.assign(self._history_id))

  def _record_privacy_event(self, q, z, rows):
    sync = self._sync_spent_history()
    with tf.control_dependencies([sync]):
      new = _events.update_event_table(
          tf.identity(self._event_q), tf.identity(self._event_z),
          tf.identity(self._event_count), tf.identity(self._event_used),
          q, z)
      return tf.group(
          self._last_q.assign(q), self._last_rows.assign(rows),
          self._event_q.assign(new[0]), self._event_z.assign(new[1]),
          self._event_count.assign(new[2]), self._event_used.assign(new[3]),
          self._event_overflow.assign(
              tf.maximum(self._event_overflow, tf.cast(new[4], tf.int32))),
          self._set_shadow(new[0], new[1], new[2], new[3]))

  @property
  def history_id(self) -> int:
    """Identity of this training history (saved with the event table)."""
    return int(self._history_id.numpy())

  def dp_events(self):
    """``[(sampled_gaussian_event(q, z), count), ...]`` (privacy._events):
    every step this training history took, including steps that a restore
    of an earlier checkpoint removed from the event table (they were taken
    and their results may have been released; a restore never lowers the
    spent budget).

    Raises:
      EventTableOverflowError, UnknownSamplingProbabilityError.
    """
    self._sync_spent_history_now()
    h = self._spent_holder
    if int(h.bank_overflow.numpy()):
      raise _events.EventTableOverflowError(
          "More distinct (sampling probability, noise multiplier) pairs were "
          "rolled back by checkpoint restores than the optimizer's event "
          "table holds; the privacy cost cannot be stated exactly. Construct "
          "the optimizer with a larger event_table_size.")
    merged = {}
    for table in (
        _events.events_from_table(
            self._event_q.numpy(), self._event_z.numpy(),
            self._event_count.numpy(), self._event_used.numpy(),
            self._event_overflow.numpy()),
        _events.events_from_table(
            h.bank_q.numpy(), h.bank_z.numpy(), h.bank_count.numpy(),
            h.bank_used.numpy(), 0)):
      for event, count in table:
        key = repr(event)
        prev = merged.get(key, (event, 0))
        merged[key] = (event, prev[1] + count)
    return list(merged.values())

  def dp_restored_events(self):
    """The events this history held when this object took it over from a
    restored checkpoint of another run ([] if it never did): the steps
    taken before this process, as far as that checkpoint shows."""
    self._sync_spent_history_now()
    h = self._spent_holder
    if int(h.base_id.numpy()) != int(self._history_id.numpy()):
      return []
    return _events.events_from_table(h.base_q.numpy(), h.base_z.numpy(),
                                     h.base_count.numpy(),
                                     h.base_used.numpy(), 0)

  def dp_event_steps(self) -> int:
    """Number of DP steps in the (checkpointed) event table: the steps of
    the current weights' history (``dp_events`` also counts rolled-back
    steps)."""
    return int(self._event_count.numpy().sum())

  def dp_spent_steps(self) -> int:
    """Every step counted by ``dp_events`` (also rolled-back ones)."""
    return sum(c for _, c in self.dp_events())

  def current_event_parameters(self, var_list=None, batch_size=None):
    """(q, z) the next step would record, computed eagerly in Python.

    Uses the current variables; the batch size (for q = B / N and for
    microbatch halving) defaults to that of the last recorded step. q is -1
    when unknown.
    """
    if batch_size is None and int(self._last_rows.numpy()) > 0:
      batch_size = int(self._last_rows.numpy())
    q = float(self.sampling_probability_var.numpy())
    if q < 0 and self._dataset_size is not None:
      b = self._expected_batch_size or batch_size
      q = -1.0 if b is None else min(float(b) / self._dataset_size, 1.0)
    ratio = 1.0
    if self._sensitivity_mode is M.SensitivityMode.BOUND:
      if self._bits_var is None and var_list is not None:
        bits = [self._initial_bits_for(v.name) for v in var_list]
        sizes = [int(v.shape.num_elements()) for v in var_list]
      elif self._bits_var is not None:
        bits, sizes = self._bits_var.value(), self._var_sizes
      else:
        bits, sizes = [], []
      if sizes:
        ratio = M.sensitivity_ratio(self._sensitivity_mode, sizes,
                                    tf.convert_to_tensor(bits, tf.int32),
                                    self.l2_norm_clip_var)
    rows = None
    if self._num_microbatches is not None and batch_size is not None:
      rows = int(batch_size) // self._num_microbatches
    z = M.effective_noise_multiplier(self.noise_multiplier_var, ratio, rows)
    return q, float(z.numpy())

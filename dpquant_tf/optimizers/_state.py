"""Variables of the DPQuant optimizers: bit widths, noise, clip, event table.

A mixin for ``_DPQuantMixin``: it owns the ``tf.Variable``s (created with the
legacy optimizer's ``add_weight`` so checkpoints, including deferred restores,
cover them) and the Python API that assigns them without retracing.
"""

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

  def _record_privacy_event(self, q, z, rows):
    new = _events.update_event_table(self._event_q, self._event_z,
                                     self._event_count, self._event_used,
                                     q, z)
    return tf.group(
        self._last_q.assign(q), self._last_rows.assign(rows),
        self._event_q.assign(new[0]), self._event_z.assign(new[1]),
        self._event_count.assign(new[2]), self._event_used.assign(new[3]),
        self._event_overflow.assign(
            tf.maximum(self._event_overflow, tf.cast(new[4], tf.int32))))

  def dp_events(self):
    """``[(sampled_gaussian_event(q, z), count), ...]`` (privacy._events).

    Raises:
      EventTableOverflowError, UnknownSamplingProbabilityError.
    """
    return _events.events_from_table(
        self._event_q.numpy(), self._event_z.numpy(),
        self._event_count.numpy(), self._event_used.numpy(),
        self._event_overflow.numpy())

  def dp_event_steps(self) -> int:
    """Number of DP steps recorded in the event table."""
    return int(self._event_count.numpy().sum())

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

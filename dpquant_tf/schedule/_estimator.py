"""The differentially private loss-sensitivity estimator of DPQuant (LLP).

For one analysis: Poisson-sample a batch with rate q_a; for each sampled
example j and each quantizable layer i, r_ji = loss(x_j, only layer i
quantized) - loss(x_j, no layer quantized), with round-to-nearest in every
quantized layer during the analysis; clip each example's vector r_j to L2
norm C_a (a non-finite r_j counts as zero); sum; add N(0, (sigma_a * C_a)^2 I)
(``dpquant_tf.privacy.add_gaussian_noise``); divide by the expected batch
size q_a * N.

Why round-to-nearest: with stochastic rounding, one weight-rounding draw is
shared by the examples of one forward call, and the sample is processed in
chunks of ``max_batch_size``, so adding one example would change which
examples share a draw (and every later draw). With nearest rounding r_j is a
deterministic function of (x_j, y_j) and the current weights: it does not
depend on chunking or on the other sampled examples. Training itself keeps
each layer's own rounding; only the estimator's trace uses nearest.

Formal guarantee: with Poisson sampling at rate q_a and add/remove-one
adjacency, adding or removing example j changes the clipped sum by exactly
clip(r_j), of L2 norm at most C_a (r_j depends only on x_j, y_j, the current
weights, never on another example: nearest rounding and per-example
activation scales, docs/METHOD.md invariant 1).
The release is therefore the sampled Gaussian mechanism with sampling rate q_a
and noise multiplier sigma_a; dividing by the public constant q_a * N is
post-processing. Each release is recorded as
``sampled_gaussian_event(q_a, sigma_a)`` (privacy._events).

Reference: Gao et al., arXiv:2509.03472, section 4 and Proposition 2. The paper
does not publish the estimator's details; the choices here (per-example
differences against the unquantized model, R-draw averaging, L2 clipping of the
per-example vector, normalisation by the expected batch size) are ours and are
documented in docs/SCHEDULE.md.
"""

import contextlib
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence

import tensorflow as tf

from dpquant_tf import _validation as v
from dpquant_tf import quantization
from dpquant_tf.privacy import _events
from dpquant_tf.privacy import _mechanisms
from dpquant_tf.privacy import _random
from dpquant_tf.schedule import _plan

DEFAULT_SAMPLING_RATE = 0.05
DEFAULT_NOISE_MULTIPLIER = 4.0
DEFAULT_CLIP = 0.1
DEFAULT_REPEATS = 2
DEFAULT_MAX_BATCH_SIZE = 512

# model -> {(loss, input specs): traced per-example loss}, so that estimators
# over the same model and loss share one trace. The key holds the loss object
# itself (hashed by identity), never its id.
_TRACED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def clip_per_example(r: tf.Tensor, clip: float) -> tf.Tensor:
  """Scales each row r_j of `r` ([B, n]) to L2 norm at most `clip` (float64).

  The library's one clip (``privacy._mechanisms.clip_per_example``): the row
  norm is bounded from above in float64 with its rounding, and the scale is
  rounded down so that the float64 product has norm at most `clip`.

  Formal guarantee: every returned row has L2 norm <= clip in the arithmetic
  executed. A row with any NaN or inf (a non-finite loss of that example)
  becomes exactly zero (docs/METHOD.md invariant 9): it cannot turn the release
  into NaN.
  """
  r = tf.cast(tf.convert_to_tensor(r), tf.float64)
  return _mechanisms.clip_per_example([r], clip)[0]


@contextlib.contextmanager
def _nearest_rounding(model):
  """Every QuantizedLayer of `model` rounds to nearest inside the block.

  ``rounding`` is a Python attribute read at trace time: the estimator's
  trace, made inside this block, rounds to nearest; traces of the training
  step keep the layers' own rounding.
  """
  layers = quantization.quantized_layers(model) if isinstance(
      model, tf.keras.Model) and getattr(model, "_is_graph_network",
                                         False) else [
          l for l in model.submodules
          if isinstance(l, quantization.QuantizedLayer)]
  saved = [l.rounding for l in layers]
  try:
    for layer in layers:
      layer.rounding = quantization.Rounding.NEAREST
      layer.quantize_in_inference = True  # training=False trace quantizes
    yield
  finally:
    for layer, rounding in zip(layers, saved):
      layer.rounding = rounding
      layer.quantize_in_inference = False


def _per_example_loss_fn(model, loss) -> Callable:
  """Returns a per-example loss callable (y_true, y_pred) -> [B]."""
  loss = loss if loss is not None else getattr(model, "loss", None)
  if loss is None:
    v.fail("loss", loss, "a Keras loss or callable (or a compiled model)")
  if isinstance(loss, str):
    loss = tf.keras.losses.get(loss)
  if isinstance(loss, tf.keras.losses.Loss):
    config = dict(loss.get_config())
    config["reduction"] = tf.keras.losses.Reduction.NONE
    loss = type(loss).from_config(config)
  if not callable(loss):
    v.fail("loss", loss, "a Keras loss or callable", TypeError)

  def per_example(y_true, y_pred):
    out = tf.convert_to_tensor(loss(y_true, y_pred))
    if out.shape.rank and out.shape.rank > 1:  # e.g. per-timestep losses
      out = tf.reduce_mean(tf.reshape(out, [tf.shape(out)[0], -1]), axis=1)
    return out

  return per_example


class LossSensitivityEstimator:
  """DP estimate of each layer's loss increase when quantized alone.

  See the module docstring for the mechanism and its guarantee. Model weights
  are never changed; the model's quantization plan is restored after every
  call, also on error.

  Args:
    x: the private training inputs (array or tensor, first axis = examples).
    y: the private training labels.
    sampling_rate: Poisson sampling rate q_a in (0, 1].
    noise_multiplier: sigma_a > 0; the noise std is sigma_a * clip.
    clip: C_a > 0, the L2 clip of each example's vector of loss differences.
    repeats: R >= 1; kept for configuration compatibility. The analysis
      rounds to nearest, so every draw is the same and one pass is run.
    loss: the loss (Keras loss, its name, or a callable returning per-example
      values); None uses the compiled model's loss.
    max_batch_size: examples per forward pass (memory bound; results do not
      depend on it).
    seed: None (default) draws sampling and noise from a non-deterministic
      generator; an int seeds them (tests only: seeded noise is not private).
  """

  def __init__(self, x, y, *, sampling_rate: float = DEFAULT_SAMPLING_RATE,
               noise_multiplier: float = DEFAULT_NOISE_MULTIPLIER,
               clip: float = DEFAULT_CLIP, repeats: int = DEFAULT_REPEATS,
               loss=None, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
               seed: Optional[int] = None):
    self._x = tf.convert_to_tensor(x)
    self._y = tf.convert_to_tensor(y)
    n = int(self._x.shape[0])
    if n < 1 or int(self._y.shape[0]) != n:
      v.fail("y", tuple(self._y.shape), f"labels for the {n} examples of x")
    self.num_examples = n
    self.sampling_rate = v.check_probability("sampling_rate", sampling_rate)
    self.noise_multiplier = v.check_positive("noise_multiplier", noise_multiplier)
    self.clip = v.check_positive("clip", clip)
    self.repeats = v.check_int("repeats", repeats, low=1)
    self.max_batch_size = v.check_int("max_batch_size", max_batch_size, low=1)
    self.loss = loss
    self.seed = None if seed is None else v.check_int("seed", seed)
    self._generator = _random.make_generator(seed=self.seed)
    self.events: List[Any] = []

  @property
  def expected_batch_size(self) -> float:
    return self.sampling_rate * self.num_examples

  def dp_event(self):
    """The DpEvent of one release: PoissonSampled(q_a, Gaussian(sigma_a))."""
    return _events.sampled_gaussian_event(self.sampling_rate,
                                          self.noise_multiplier)

  def planned_analyses(self, *, epochs: int, period: int):
    """The (DpEvent, count) of the analyses a run will release, for planning.

    Pass it as ``analyses=`` to ``dpquant_tf.privacy.calibrate_noise_multiplier``
    or ``planned_epsilon``: analyses run at epochs 0, period, 2 * period, ...,
    i.e. ceil(epochs / period) times.
    """
    epochs = v.check_int("epochs", epochs, low=1)
    period = v.check_int("period", period, low=1)
    return [(self.dp_event(), -(-epochs // period))]

  def get_config(self) -> Dict[str, Any]:
    return {"sampling_rate": self.sampling_rate,
            "noise_multiplier": self.noise_multiplier, "clip": self.clip,
            "repeats": self.repeats, "max_batch_size": self.max_batch_size}

  # -- pieces (public for tests and for users who build their own loop) -----

  def _loss_fn(self, model):
    """One traced per-example loss per (model, loss); shared by estimators."""
    per_model = _TRACED.setdefault(model, {})
    key = (self.loss, tuple(self._x.shape[1:]), self._x.dtype.name,
           tuple(self._y.shape[1:]), self._y.dtype.name)
    if key not in per_model:
      per_example = _per_example_loss_fn(model, self.loss)
      signature = [tf.TensorSpec([None, *self._x.shape[1:]], self._x.dtype),
                   tf.TensorSpec([None, *self._y.shape[1:]], self._y.dtype)]

      @tf.function(input_signature=signature)
      def fn(xb, yb):
        return per_example(yb, model(xb, training=False))

      per_model[key] = fn
    return per_model[key]

  def _losses(self, model, x, y) -> tf.Tensor:
    fn = self._loss_fn(model)
    n = int(x.shape[0])
    with _nearest_rounding(model):   # the trace (first call) rounds to nearest
      chunks = [fn(x[s:s + self.max_batch_size], y[s:s + self.max_batch_size])
                for s in range(0, n, self.max_batch_size)]
    return tf.cast(tf.concat(chunks, axis=0), tf.float64)

  def per_example_sensitivities(self, model, x, y, *,
                                layers: Optional[Sequence[str]] = None,
                                base_config=None) -> tf.Tensor:
    """Returns r ([B, n] float64): per-example loss increase per layer.

    r[j, i] = mean over R draws of loss(x_j, only layer i quantized) minus
    loss(x_j, no layer quantized). One batched forward pass per layer and
    draw; the model's plan is restored afterwards.
    """
    x = tf.convert_to_tensor(x)
    y = tf.convert_to_tensor(y)
    names = list(layers) if layers is not None else _plan.layer_names(model)
    saved = _plan.get_plan(model)
    try:
      if int(x.shape[0]) == 0:
        return tf.zeros([0, len(names)], tf.float64)
      _plan.set_only(model, names, None, base_config)
      reference = self._losses(model, x, y)
      columns = []
      for name in names:
        _plan.set_only(model, names, name, base_config)
        columns.append(self._losses(model, x, y) - reference)
      return tf.stack(columns, axis=1)
    finally:
      _plan.set_plan(model, saved)

  def sample(self):
    """Poisson-samples the analysis batch: each example with probability q_a."""
    keep = (self._generator.uniform([self.num_examples], dtype=tf.float64)
            < self.sampling_rate)
    idx = tf.where(keep)[:, 0]
    return tf.gather(self._x, idx), tf.gather(self._y, idx)

  def clipped_sum(self, model, x, y, *, layers: Optional[Sequence[str]] = None,
                  base_config=None) -> tf.Tensor:
    """The pre-noise sum over the examples of clip(r_j, C_a) ([n] float64).

    Formal guarantee: adding or removing one example changes it by at most
    C_a in L2 norm (replacing one, by at most 2 C_a).
    """
    r = self.per_example_sensitivities(model, x, y, layers=layers,
                                       base_config=base_config)
    return tf.reduce_sum(clip_per_example(r, self.clip), axis=0)

  def noised_mean(self, clipped_sum: tf.Tensor) -> tf.Tensor:
    """Adds N(0, (sigma_a C_a)^2 I) to the clipped sum and divides by q_a N."""
    clipped_sum = tf.cast(clipped_sum, tf.float64)
    noised, = _mechanisms.add_gaussian_noise(
        [clipped_sum], self.noise_multiplier * self.clip, self._generator)
    return noised / self.expected_batch_size

  # -- the mechanism ---------------------------------------------------------

  def estimate(self, model, *, ledger=None, layers: Optional[Sequence[str]] = None,
               base_config=None) -> Dict[str, float]:
    """Runs one analysis and returns the released layer name -> estimate.

    Records the release's DpEvent in `ledger` (kind "analysis") and in
    ``self.events``. The event is recorded before anything is released.
    """
    names = list(layers) if layers is not None else _plan.layer_names(model)
    xb, yb = self.sample()
    clipped_sum = self.clipped_sum(model, xb, yb, layers=names,
                                   base_config=base_config)
    event = self.dp_event()
    self.events.append(event)
    if ledger is not None:
      if self.seed is not None:  # Stated: the seed voids amplification.
        ledger.note_seeded("estimator")
      ledger.record(event, kind="analysis")
    released = self.noised_mean(clipped_sum).numpy()
    return {name: float(val) for name, val in zip(names, released)}

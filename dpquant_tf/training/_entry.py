"""make_private: the owned entry (Opacus' ``make_private_with_epsilon``).

One call takes the model, the private records and a target (epsilon, delta,
epochs, batch size) and returns a :class:`DPTraining` whose ``fit()`` trains
with everything agreeing by construction: the library's own Poisson sampler
(rate q = batch_size / N, generator from OS entropy, consumed by ``fit`` as
it is made), a DP optimizer whose noise is calibrated for the training steps
AND the loss-sensitivity estimator's releases (their number counted from the
policy), the ledger, the scheduler and a ``PrivacyCallback`` whose budget is
the target. The steps run through the owned train step, which records the
sampler's q only for batches whose seal proves they are the sampler's draws,
consumed as drawn; nothing else is accounted with amplification by sampling.
"""

import numpy as np
import tensorflow as tf

from dpquant_tf import _validation as V
from dpquant_tf.optimizers._dp_quant import DPQuantAdamOptimizer
from dpquant_tf.optimizers._dp_quant import DPQuantOptimizer
from dpquant_tf.privacy._accounting import Accountant
from dpquant_tf.privacy._calibration import calibrate_noise_multiplier
from dpquant_tf.privacy._sampling import poisson_dataset
from dpquant_tf.privacy._callback import PrivacyCallback
from dpquant_tf.privacy._ledger import PrivacyLedger
from dpquant_tf.privacy._ledger import SamplingMethod
from dpquant_tf.training import _step

__all__ = ["DPTraining", "make_private", "planned_analysis_count"]

_OPTIMIZERS = {"sgd": DPQuantOptimizer, "adam": DPQuantAdamOptimizer}


def planned_analysis_count(policy, epochs: int) -> int:
  """Analyses a ``DPQuantScheduler`` with `policy` releases in `epochs`.

  The scheduler releases one at the beginning of every epoch where
  ``policy.needs_sensitivities and policy.analysis_due(epoch)``.
  """
  epochs = V.check_int("epochs", epochs, low=1)
  if policy is None or not getattr(policy, "needs_sensitivities", False):
    return 0
  return sum(1 for e in range(epochs) if policy.analysis_due(e))


class DPTraining:
  """What ``make_private`` returns: call ``fit()``.

  ``fit()`` is ``model.fit(dataset, epochs=epochs, callbacks=callbacks)``;
  the pieces are public for users who call ``model.fit`` themselves (pass
  ``dataset`` untransformed: any transformation is accounted at q = 1).

  Attributes:
    model: the user's model, compiled with the DP optimizer and the owned
      train step (trained in place; evaluate/predict with it).
    dataset: the library's Poisson sampler over the records (sealed batches).
    optimizer: the DP optimizer (noise multiplier calibrated).
    ledger: the ``PrivacyLedger`` (POISSON: the library's sampler).
    callbacks: the callbacks ``fit`` passes (scheduler, PrivacyCallback).
    noise_multiplier, sampling_probability, batch_size, epochs, delta,
    target_epsilon, analyses: the calibrated plan.
  """

  def __init__(self, *, model, dataset, optimizer, ledger,
               callbacks, noise_multiplier, sampling_probability, batch_size,
               epochs, delta, target_epsilon, analyses):
    self.model = model
    self.dataset = dataset
    self.optimizer = optimizer
    self.ledger = ledger
    self.callbacks = list(callbacks)
    self.noise_multiplier = noise_multiplier
    self.sampling_probability = sampling_probability
    self.batch_size = batch_size
    self.epochs = epochs
    self.delta = delta
    self.target_epsilon = target_epsilon
    self.analyses = analyses

  def fit(self, *, verbose="auto", callbacks=()):
    """Trains for the planned epochs on the library's sampler.

    Args:
      verbose: Keras' verbosity.
      callbacks: extra Keras callbacks (run after the library's).

    Returns:
      The Keras ``History`` (``epsilon`` per epoch, loss and metrics over
      real rows only).
    """
    _step.prepare_first_step(self.model, self.dataset)  # one trace, not two
    return self.model.fit(self.dataset, epochs=self.epochs,
                                 verbose=verbose,
                                 callbacks=self.callbacks + list(callbacks))

  def epsilon(self) -> float:
    """The proven epsilon spent so far (the ledger's, at ``delta``)."""
    return self.ledger.proven_epsilon(self.delta)

  def statement(self) -> str:
    return self.ledger.statement(self.delta)


def _rows(name, a) -> int:
  shape = getattr(a, "shape", None)
  if shape is None or not len(shape):
    V.fail(name, type(a).__name__, "an array or tensor of records (first "
           "axis = examples); datasets and generators are not accepted: the "
           "library samples the records itself")
  return int(shape[0])


def make_private(model, x, y, *, target_epsilon: float, delta: float,
                 epochs: int, batch_size: int, loss,
                 optimizer: str = "sgd", learning_rate: float = 0.1,
                 l2_norm_clip: float = 1.0, policy=None, estimator=None,
                 metrics=None, accountant=Accountant.RDP,
                 journal_path=None, **optimizer_kwargs) -> DPTraining:
  """Makes `model` train on (`x`, `y`) with (target_epsilon, delta)-DP.

  Args:
    model: a ``tf.keras.Model`` (use ``quantize_model`` first for
      quantization policies). Compiled here and trained in place.
    x, y: the private records (arrays or tensors with N rows). The library
      samples them itself (Poisson, q = batch_size / N).
    target_epsilon: epsilon for the whole run, the estimator's analysis
      releases included; also the budget ``fit`` enforces.
    delta: target delta, in (0, 1).
    epochs: planned epochs (each ceil(N / batch_size) Poisson steps).
    batch_size: expected batch size B (q = B / N).
    loss: per-example Keras loss (``reduction=Reduction.NONE``) or its name.
    optimizer: "sgd" (``DPQuantOptimizer``) or "adam".
    learning_rate: the optimizer's learning rate.
    l2_norm_clip: per-example clip norm C.
    policy: optional ``dpquant_tf.schedule`` policy; a loss-aware one runs
      `estimator` (default: ``LossSensitivityEstimator(x, y, loss=loss)``)
      and its releases are counted into the calibration.
    estimator: optional ``LossSensitivityEstimator``.
    metrics: Keras metrics (computed on real rows only, padding excluded).
    accountant: ``Accountant.RDP`` (default) or ``PLD``.
    journal_path: optional privacy journal of the ledger (a file in the
      directory where you keep checkpoints): restoring an older checkpoint,
      also in a new process, then never lowers the spent budget (see
      ``PrivacyLedger``).
    **optimizer_kwargs: more optimizer arguments (``gradient_bits``...).

  Returns:
    A :class:`DPTraining`; call its ``fit()``.
  """
  if not isinstance(model, tf.keras.Model):
    V.fail("model", type(model).__name__, "a tf.keras.Model", TypeError)
  n = _rows("x", x)
  if _rows("y", y) != n:
    V.fail("y", f"{_rows('y', y)} rows", f"one label per record of x ({n})")
  target_epsilon = V.check_positive("target_epsilon", target_epsilon)
  delta = V.check_open_unit("delta", delta)
  epochs = V.check_int("epochs", epochs, low=1)
  batch_size = V.check_int("batch_size", batch_size, low=1, high=n)
  if optimizer not in _OPTIMIZERS:
    V.fail("optimizer", optimizer, f"one of {sorted(_OPTIMIZERS)}")
  for key in ("noise_multiplier", "ledger", "sampling_probability",
              "expected_batch_size", "dataset_size"):
    if key in optimizer_kwargs:
      V.fail(key, optimizer_kwargs[key], "not given: make_private sets it "
             "from the target and the data")
  from dpquant_tf.schedule import _estimator as _est  # pylint: disable=g-import-not-at-top
  from dpquant_tf.schedule import _scheduler as _sch  # pylint: disable=g-import-not-at-top
  if policy is not None and getattr(policy, "needs_sensitivities", False):
    if estimator is None:
      estimator = _est.LossSensitivityEstimator(x, y, loss=loss)
  count = planned_analysis_count(policy, epochs)
  analyses = ([(estimator.dp_event(), count)] if count and
              estimator is not None else [])
  q = batch_size / n
  noise = calibrate_noise_multiplier(target_epsilon, delta, n, batch_size,
                                     epochs, analyses=analyses,
                                     accountant=accountant)
  ledger = PrivacyLedger(sampling_method=SamplingMethod.POISSON,
                         dataset_size=n, accountant=accountant,
                         journal_path=journal_path)
  opt = _OPTIMIZERS[optimizer](
      l2_norm_clip=l2_norm_clip, noise_multiplier=noise, ledger=ledger,
      expected_batch_size=q * n, sampling_probability=q,
      learning_rate=learning_rate, **optimizer_kwargs)
  model.compile(optimizer=opt, loss=loss, metrics=metrics)
  _step.install_dp_train_step(model, loss=loss)
  dataset = poisson_dataset(np.asarray(x), np.asarray(y), q)
  callbacks = []
  if policy is not None:
    callbacks.append(_sch.DPQuantScheduler(
        policy, ledger=ledger, estimator=estimator, delta=delta))
  callbacks.append(PrivacyCallback(ledger, delta,
                                   budget_epsilon=target_epsilon))
  return DPTraining(
      model=model, dataset=dataset, optimizer=opt,
      ledger=ledger, callbacks=callbacks, noise_multiplier=noise,
      sampling_probability=q, batch_size=batch_size, epochs=epochs,
      delta=delta, target_epsilon=target_epsilon, analyses=analyses)

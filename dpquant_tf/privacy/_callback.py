"""PrivacyCallback: epsilon in Keras logs and a hard privacy budget."""

import math
from typing import Optional

import tensorflow as tf

from dpquant_tf import _validation as V

__all__ = ["BudgetExceededError", "PrivacyCallback"]


class BudgetExceededError(RuntimeError):
  """Training could not take even one more step within the budget."""


class PrivacyCallback(tf.keras.callbacks.Callback):
  """Writes ``epsilon`` and ``analysis_epsilon_share`` into ``logs``.

  At the end of every epoch the ledger's epsilon (at `delta`) and the share
  of it spent by analysis releases go into ``logs`` (so History, CSVLogger
  and TensorBoard see them). With `budget_epsilon`, after every batch (every
  ``steps_per_execution`` steps) the callback projects the epsilon after the
  next execution, using the optimizer's current (q, z); if that would exceed
  the budget it sets ``model.stop_training`` so the step is never taken. If
  not even the first execution fits, ``on_train_begin`` raises
  ``BudgetExceededError``. It also rejects models with BatchNormalization
  before any step.

  Args:
    ledger: the ``PrivacyLedger`` the optimizer is attached to.
    delta: target delta.
    budget_epsilon: optional epsilon budget.
  """

  def __init__(self, ledger, delta: float,
               budget_epsilon: Optional[float] = None):
    super().__init__()
    self.ledger = ledger
    self.delta = V.check_open_unit("delta", delta)
    self.budget_epsilon = (None if budget_epsilon is None else
                           V.check_positive("budget_epsilon", budget_epsilon))
    self.stopped_for_budget = False
    self._batch_size = None

  def _optimizer(self):
    opt = getattr(self.model, "optimizer", None)
    return opt if hasattr(opt, "current_event_parameters") else None

  def _steps_per_execution(self) -> int:
    spe = getattr(self.model, "_steps_per_execution", None)
    try:
      return max(1, int(spe.numpy())) if spe is not None else 1
    except (AttributeError, TypeError, ValueError):
      return 1

  def _would_exceed(self) -> bool:
    opt = self._optimizer()
    if self.budget_epsilon is None or opt is None:
      return False
    import dp_accounting  # pylint: disable=g-import-not-at-top
    q, z = opt.current_event_parameters(self.model.trainable_variables,
                                        self._batch_size)
    if q < 0:
      return False  # Unknown q: epsilon() will raise when queried.
    event = dp_accounting.PoissonSampledDpEvent(
        q, dp_accounting.GaussianDpEvent(z))
    projected = self.ledger.epsilon_with(
        [(event, self._steps_per_execution())], self.delta)
    return not projected <= self.budget_epsilon

  def on_train_begin(self, logs=None):
    opt = self._optimizer()
    if opt is not None:
      opt.check_model(self.model)
    if self._would_exceed():
      self.stopped_for_budget = True
      raise BudgetExceededError(
          f"The next step would take epsilon past budget_epsilon="
          f"{self.budget_epsilon} at delta={self.delta} (now "
          f"{self.ledger.epsilon(self.delta):.4g}).")

  def on_train_batch_end(self, batch, logs=None):
    if self._would_exceed():
      self.stopped_for_budget = True
      self.model.stop_training = True

  def on_epoch_end(self, epoch, logs=None):
    if logs is None:
      return
    eps = self.ledger.epsilon(self.delta)
    logs["epsilon"] = eps if math.isfinite(eps) else float("inf")
    logs["analysis_epsilon_share"] = self.ledger.analysis_share(self.delta)

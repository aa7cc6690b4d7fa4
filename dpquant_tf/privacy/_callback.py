"""PrivacyCallback: the proven epsilon in Keras logs and a hard privacy budget.

The callback installs the owned train step on the model (``set_model``, before
Keras builds the train function). Before the first step it checks that the
model's optimizer is a DPQuant optimizer attached to its ledger and that the
first execution fits the budget. Before every later execution it
projects the next FULL execution (``steps_per_execution`` steps, also across an
epoch end) plus the analyses that the ledger's planners (``DPQuantScheduler``)
will release at the next epoch's beginning; the scheduler in turn asks the
callback (through the ledger) before it releases anything, so the two
cooperate in any order of the ``callbacks=[...]`` list.
"""

import math
import sys
import weakref
from typing import Optional

import tensorflow as tf

from dpquant_tf import _validation as V
from dpquant_tf.privacy import _events

__all__ = ["BudgetExceededError", "PrivacyCallback", "budget_guards"]

# model -> the PrivacyCallbacks with a budget in its running fit (weak keys).
_GUARDS = weakref.WeakKeyDictionary()


def budget_guards(model) -> list:
  """The budget-enforcing ``PrivacyCallback``s of `model`'s running fit.

  ``DPQuantScheduler`` calls ``check_release`` on each before it releases an
  analysis or changes bit widths, whatever the order of the callbacks.
  """
  try:
    return list(_GUARDS.get(model, ()))
  except TypeError:
    return []


class BudgetExceededError(RuntimeError):
  """Training could not take even one more step within the budget."""


class PrivacyCallback(tf.keras.callbacks.Callback):
  """Writes the proven ``epsilon`` into ``logs`` and enforces a budget.

  ``logs["epsilon"]`` is the epsilon that holds for the sampling actually
  used (``PrivacyLedger.proven_epsilon``): with ``SamplingMethod.SHUFFLED``
  (plain ``fit`` batches, the default) the bound without amplification, with
  the Poisson-amplified figure beside it as ``logs["epsilon_if_poisson"]``;
  with ``SamplingMethod.POISSON`` the Poisson figure. Also logged:
  ``analysis_epsilon_share``.

  With `budget_epsilon`, the budget (compared with the proven epsilon) is
  checked before every execution that could exceed it, the first included:

  * ``on_train_begin`` raises ``BudgetExceededError`` if the first execution
    would exceed it (no step is taken, the weights are unchanged);
  * after every execution it projects the next full execution
    (``steps_per_execution`` steps, even when Keras shortens the last one of
    an epoch) and, at an epoch end, the next epoch's planned analysis
    releases; if that would exceed the budget it sets ``model.stop_training``.
  * ``check_release`` is called by ``DPQuantScheduler`` before it releases an
    analysis or changes bit widths at an epoch's beginning.

  ``set_model`` installs the owned train step (``install_dp_train_step``)
  on a model that has none: every step of the fit then goes through the
  optimizer's ``dp_step``; a step is recorded at the sampler's q only when
  its batch carries the seal of the library's ``poisson_dataset``, consumed
  as drawn, else at q = 1 (no amplification by sampling). ``on_train_begin``
  also refuses (before any step): an optimizer that is not a DPQuant optimizer
  attached to `ledger` (e.g. after ``load_model`` or a recompile); models
  that break per-example DP (``check_model``).

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
    check_delta = getattr(ledger, "check_delta", None)
    if check_delta is not None:   # below 1/N when the ledger knows N
      self.delta = check_delta(self.delta)
    self.budget_epsilon = (None if budget_epsilon is None else
                           V.check_positive("budget_epsilon", budget_epsilon))
    self.stopped_for_budget = False
    self._spe = 1
    self._steps = None
    self._epoch = 0
    self._batch_size = None
    self._first_q = None

  # ------------------------------------------------------------ checks
  def _optimizer(self):
    opt = getattr(self.model, "optimizer", None)
    if not (hasattr(opt, "current_event_parameters") and
            hasattr(opt, "dp_events") and self.ledger.is_attached(opt)):
      V.fail("model.optimizer", type(opt).__name__,
             "a DPQuant optimizer attached to this callback's ledger: "
             "construct it with ledger=ledger, or call "
             "ledger.attach(model.optimizer) after load_model or after "
             "compiling with a new optimizer (an unattached optimizer's steps "
             "are not accounted)")
    return opt

  def _read_steps_per_execution(self) -> int:
    spe = getattr(self.model, "_steps_per_execution", None)
    try:
      return max(1, int(spe.numpy())) if spe is not None else 1
    except (AttributeError, TypeError, ValueError):
      return 1

  def _unknown_q(self, why: str):
    raise _events.UnknownSamplingProbabilityError(
        f"The sampling probability of the first step cannot be known ({why})"
        ": construct the optimizer with sampling_probability= or with "
        "dataset_size= and expected_batch_size=, or call "
        "optimizer.set_sampling_probability() before fit.")

  def _check_sampling(self, opt) -> float:
    """Returns the q of the first step; raises if it is unknown.

    The owned step records q per step from the batch (the library sampler's
    seal, else 1); until the first step this is the optimizer's declared q,
    or 1 when none was declared. fit's arguments are never inspected.
    """
    q, _ = opt.current_event_parameters(self.model.trainable_variables, None)
    if q < 0:
      self._unknown_q("no owned train step is installed")
    return q

  # ------------------------------------------------------------ owned step
  def set_model(self, model):
    """Installs the owned DP train step (kept if installed already).

    Keras calls this before it builds the train function, so every step of
    this fit goes through ``DPQuantOptimizer.dp_step``'s checks.
    """
    super().set_model(model)
    opt = getattr(model, "optimizer", None)
    opt = getattr(opt, "inner_optimizer", None) or opt
    install = getattr(opt, "install_train_step", None)
    if install is not None:  # a DPQuant optimizer; others: on_train_begin refuses
      install(model)

  # ------------------------------------------------------------ projection
  def _next_execution(self):
    """(event, steps) of the next full execution at the current (q, z)."""
    opt = self.model.optimizer
    q, z = opt.current_event_parameters(self.model.trainable_variables,
                                        self._batch_size)
    if self._first_q is not None:
      # A shortened last batch of an epoch lowers the derived q; the next
      # execution starts a new epoch with full batches.
      q = max(q, self._first_q)
    return _events.sampled_gaussian_event(q, z), self._spe

  def projected_epsilon(self, extra_analysis=()) -> float:
    """Proven epsilon after `extra_analysis` and the next full execution."""
    return self.ledger.proven_epsilon(
        self.delta, extra_train=[self._next_execution()],
        extra_analysis=extra_analysis)

  def _fits(self, extra_analysis=()) -> bool:
    if self.budget_epsilon is None:
      return True
    return self.projected_epsilon(extra_analysis) <= self.budget_epsilon

  def check_release(self, events=()) -> None:
    """Raises ``BudgetExceededError`` unless `events` (released now) and the
    next full execution fit the budget. Called by ``DPQuantScheduler``."""
    if not self._fits(events):
      self.stopped_for_budget = True
      # fit aborts: on_train_end will not run, so unregister here.
      self.on_train_end()
      raise BudgetExceededError(
          f"Releasing {len(list(events))} analyses and the next execution "
          f"would take epsilon past budget_epsilon={self.budget_epsilon} at "
          f"delta={self.delta} (now "
          f"{self.ledger.proven_epsilon(self.delta):.4g}).")

  def _stop_unless_next_fits(self, next_epoch: bool) -> None:
    extra = (self.ledger.planned_releases(self._epoch + 1) if next_epoch
             else [])
    if not self._fits(extra):
      if not self.stopped_for_budget:  # say why, once (issue 23)
        print(f"PrivacyCallback: stopping training: the next "
              f"{'epoch' if next_epoch else 'execution'} would take epsilon "
              f"past budget_epsilon={self.budget_epsilon} at delta="
              f"{self.delta:g} (spent "
              f"{self.ledger.proven_epsilon(self.delta):.4g}).",
              file=sys.stderr, flush=True)
      self.stopped_for_budget = True
      self.model.stop_training = True

  # ------------------------------------------------------------ Keras hooks
  def on_train_begin(self, logs=None):
    opt = self._optimizer()
    check_model = getattr(opt, "check_model", None)
    if check_model is not None:
      check_model(self.model)
    self._spe = self._read_steps_per_execution()
    self._steps = (self.params or {}).get("steps")
    self._batch_size = None
    self._first_q = self._check_sampling(opt)
    if self.budget_epsilon is not None:
      self.check_release(())
      guards = _GUARDS.setdefault(self.model, [])
      if all(g is not self for g in guards):
        guards.append(self)

  def on_epoch_begin(self, epoch, logs=None):
    self._epoch = int(epoch)

  def on_train_batch_end(self, batch, logs=None):
    self._batch_size = None  # The optimizer now knows its last batch.
    at_epoch_end = bool(self._steps) and int(batch) + 1 >= self._steps
    self._stop_unless_next_fits(at_epoch_end)

  def on_epoch_end(self, epoch, logs=None):
    if logs is not None:
      eps = self.ledger.proven_epsilon(self.delta)
      logs["epsilon"] = eps if math.isfinite(eps) else float("inf")
      if self.ledger.sampling_method.value != "poisson":
        poisson = self.ledger.epsilon(self.delta)
        logs["epsilon_if_poisson"] = (poisson if math.isfinite(poisson)
                                      else float("inf"))
      logs["analysis_epsilon_share"] = self.ledger.analysis_share(self.delta)
    self._epoch = int(epoch)
    self._stop_unless_next_fits(True)

  def on_train_end(self, logs=None):
    guards = _GUARDS.get(self.model, [])
    guards[:] = [g for g in guards if g is not self]

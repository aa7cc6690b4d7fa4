"""PrivacyCallback: the proven epsilon in Keras logs and a hard privacy budget.

Before the first step the callback checks that the model's optimizer is a
DPQuant optimizer attached to its ledger, that the sampling probability q the
optimizer will record is the one of the data ``fit`` actually iterates (a
``validation_split`` or a ``poisson_dataset`` of another rate is refused), and
that the first execution fits the budget. Before every later execution it
projects the next FULL execution (``steps_per_execution`` steps, also across an
epoch end) plus the analyses that the ledger's planners (``DPQuantScheduler``)
will release at the next epoch's beginning; the scheduler in turn asks the
callback (through the ledger) before it releases anything, so the two
cooperate in any order of the ``callbacks=[...]`` list.
"""

import inspect
import math
import sys
import weakref
from typing import Optional

import tensorflow as tf

from dpquant_tf import _validation as V
from dpquant_tf.privacy import _events
from dpquant_tf.privacy import _sampling

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


def _fit_locals(model) -> Optional[dict]:
  """The local variables of the running ``model.fit`` (None if not found).

  Keras gives callbacks only ``params`` (epochs, steps, verbose); the data
  ``fit`` iterates (after ``validation_split``) and its ``batch_size`` are
  read from fit's frame so that q is checked before the first step.
  """
  frame = inspect.currentframe()
  try:
    while frame is not None:
      if (frame.f_code.co_name == "fit" and
          frame.f_locals.get("self") is model):
        return dict(frame.f_locals)
      frame = frame.f_back
    return None
  finally:
    del frame


def _num_rows(x) -> Optional[int]:
  """Rows of array-like fit input (arrays, tensors, lists/dicts of them)."""
  if isinstance(x, dict):
    x = next(iter(x.values()), None)
  elif isinstance(x, (list, tuple)) and x and hasattr(x[0], "shape"):
    x = x[0]
  shape = getattr(x, "shape", None)
  if shape is None or isinstance(x, tf.data.Dataset) or not len(shape):
    return None
  rows = shape[0]
  return None if rows is None else int(rows)


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

  ``on_train_begin`` also refuses (before any step): an optimizer that is not
  a DPQuant optimizer attached to `ledger` (e.g. after ``load_model`` or a
  recompile); an unknown q; a q that differs from the data iterated
  (``validation_split``, a ``poisson_dataset`` of another rate, fewer steps
  per epoch than the optimizer's q implies); models that break per-example
  DP (``check_model``).

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
    """Returns the q of the first step; raises if it is unknown or wrong."""
    variables = self.model.trainable_variables
    fit = _fit_locals(self.model) or {}
    x = fit.get("x")
    rate = _sampling.sampling_rate_of(x) if x is not None else None
    if rate is not None:
      q, _ = opt.current_event_parameters(variables, None)
      if q < 0 or not math.isclose(q, rate, rel_tol=1e-9):
        V.fail("optimizer sampling_probability", q,
               f"the rate of the poisson_dataset fit iterates ({rate:g}): "
               "the ledger would record the wrong q. Use the same rate "
               "(optimizer.set_sampling_probability(rate))")
      return q
    rows = _num_rows(x)
    if rows is not None:
      batch = min(int(fit.get("batch_size") or 32), rows)
      self._batch_size = batch
      q, _ = opt.current_event_parameters(variables, batch)
      if q < 0:
        self._unknown_q("no sampling_probability or dataset_size")
      true_q = batch / rows
      if q < true_q * (1 - 1e-9):
        V.fail("optimizer q", q,
               f">= batch_size / training examples = {batch}/{rows} = "
               f"{true_q:.6g}, the q of the data fit iterates (a "
               "validation_split or a dataset_size larger than the training "
               "set?): give the optimizer dataset_size= the number of "
               "examples actually trained on")
      return q
    q, _ = opt.current_event_parameters(variables, None)
    n, steps = getattr(opt, "_dataset_size", None), self._steps
    if q < 0 and n is not None and steps:
      # Fixed batches B with ceil(N / B) == steps: the largest such B.
      b_max = n if steps == 1 else max(1, (n - 1) // (steps - 1))
      q = min(1.0, b_max / n)
    if q < 0:
      self._unknown_q("no batch size is known before the first step")
    if (n is not None and steps and self.ledger.sampling_method.value ==
        "shuffled" and steps < _sampling.steps_per_epoch(n, q)):
      V.fail("steps per epoch", steps,
             f">= steps_per_epoch(dataset_size={n}, q={q:.6g}) = "
             f"{_sampling.steps_per_epoch(n, q)}: fit iterates fewer "
             "examples than the optimizer's dataset_size (validation_split?)")
    return q

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

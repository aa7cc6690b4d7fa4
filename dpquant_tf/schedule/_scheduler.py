"""DPQuantScheduler: the Keras callback that applies a policy at epoch boundaries.

At the beginning of every epoch it (1) runs the ``LossSensitivityEstimator``
when the policy needs it and an analysis is due (the estimator records the
release in the ledger), (2) asks the policy for the epoch's decision, (3)
assigns the resulting ``QuantPlan`` to the model's quantized layers with
``set_plan`` and, for bits policies that target gradients, the per-layer
gradient bits to the ``DPQuantOptimizer`` -- variable assignments only, so the
compiled train step is not retraced. At the end of every epoch it writes the
plan into ``logs`` (so History, CSVLogger and TensorBoard see it):

* ``quant_layer_fraction``: fraction of quantizable layers quantized;
* ``quant_flop_fraction``: their share of the forward + backward MACs;
* ``quant_bits/<layer>``: forward bits of each layer (0 = not quantized);
* ``grad_bits/<layer>``: gradient bits given to the optimizer (when set);
* ``epsilon`` (the ledger's proven figure, the same ``PrivacyCallback``
  logs), ``epsilon_if_poisson`` (only when the sampling does not prove
  amplification) and ``analysis_epsilon_share`` when a ledger and delta are
  given.

Everything logged is either public (architecture, schedule randomness) or
post-processing of released values (weights, the estimator's noised releases).
"""

import json
from typing import Any, Dict, List, Optional

import numpy as np
import tensorflow as tf

from dpquant_tf import _validation as v
from dpquant_tf.privacy import _random
from dpquant_tf.schedule import _base
from dpquant_tf.schedule import _estimator as _est
from dpquant_tf.schedule import _plan


def _is_dpquant_optimizer(optimizer) -> bool:
  try:
    from dpquant_tf.optimizers import _dp_quant  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover
    return False
  return isinstance(optimizer, _dp_quant._DPQuantMixin)  # pylint: disable=protected-access


class DPQuantScheduler(tf.keras.callbacks.Callback):
  """Applies a schedule policy to a quantized model (and optimizer) every epoch.

  Args:
    policy: a ``dpquant_tf.schedule`` policy.
    ledger: the ``PrivacyLedger`` that accounts the training; required when an
      estimator runs (its releases spend privacy).
    estimator: a ``LossSensitivityEstimator``; required by policies with
      ``needs_sensitivities`` (``LossAwarePolicy``).
    delta: the delta at which ``epsilon`` and ``analysis_epsilon_share`` are
      logged (needs `ledger`); None logs neither.
    base_config: the ``LayerQuantConfig`` of a quantized layer (formats and
      bits); None uses the paper's LUQ-FP4 setting (INT4-SAWB forward, LUQ-FP4
      backward).
    seed: seeds the policy's generator (schedule randomness is public, but it
      is non-deterministic by default).

  Attributes:
    history: one JSON-compatible dict per epoch (plan, bits, analyses).
    releases: the ``Releases`` seen by the policy.
  """

  def __init__(self, policy, *, ledger=None, estimator=None,
               delta: Optional[float] = None, base_config=None,
               seed: Optional[int] = None):
    super().__init__()
    v.check_type("policy", policy, _base.Policy, "a dpquant_tf.schedule policy")
    if estimator is not None:
      v.check_type("estimator", estimator, _est.LossSensitivityEstimator,
                   "None or a LossSensitivityEstimator")
      if ledger is None:
        v.fail("ledger", ledger, "a PrivacyLedger when an estimator is given: "
               "its releases spend privacy and must be accounted")
    if policy.needs_sensitivities and estimator is None:
      v.fail("estimator", estimator, f"a LossSensitivityEstimator: "
             f"{type(policy).__name__} needs released sensitivity estimates")
    if delta is not None:
      if ledger is None:
        v.fail("ledger", ledger, "a PrivacyLedger when delta is given")
      # Below 1/N when the ledger knows N (refused before any step).
      check = getattr(ledger, "check_delta", None)
      delta = (check(delta) if check is not None
               else v.check_open_unit("delta", delta))
    if base_config is not None:
      base_config = _plan.check_base_config(base_config)
    self.policy = policy
    self.ledger = ledger
    self.estimator = estimator
    self.delta = delta
    self.base_config = base_config
    self.seed = None if seed is None else v.check_int("seed", seed)
    self._generator = _random.make_generator(seed=self.seed)
    self.releases = _base.Releases()
    self.history: List[Dict[str, Any]] = []
    self._layers = None
    self._pending: Optional[Dict[str, Any]] = None
    self._kernels_at_begin: Dict[str, np.ndarray] = {}
    self._iterations_at_begin = 0

  # -- Keras hooks -------------------------------------------------------------

  def set_model(self, model):
    """With a DPQuant optimizer, installs the owned DP train step (Keras
    calls this before it builds the train function)."""
    super().set_model(model)
    if _is_dpquant_optimizer(getattr(model, "optimizer", None)):
      from dpquant_tf.training import _step  # pylint: disable=g-import-not-at-top
      _step.install_dp_train_step(model)

  def on_train_begin(self, logs=None):
    # Privacy guards run here, not at the caller's discretion.
    from dpquant_tf import distribute  # pylint: disable=g-import-not-at-top
    distribute.check_scheduler(
        self, getattr(self.model, "distribute_strategy", None))
    self._layers = _plan.quantizable_layers(self.model)
    if not self._layers:
      v.fail("model", self.model.name, "a model with quantizable layers "
             "(dpquant_tf.quantization.quantize_model)")
    if self.ledger is not None:
      self.ledger.add_planner(self)

  def on_train_end(self, logs=None):
    if self.ledger is not None:
      self.ledger.remove_planner(self)

  def planned_releases(self, epoch: int) -> List[Any]:
    """(DpEvent, count) pairs this scheduler releases at the beginning of
    `epoch` (the estimator's analysis when one is due), for budget guards."""
    if (self.estimator is not None and self.policy.needs_sensitivities
        and self.policy.analysis_due(int(epoch))):
      return [(self.estimator.dp_event(), 1)]
    return []

  def _check_budget(self, events) -> None:
    """Every budget guard of this fit (``PrivacyCallback``) must accept
    `events` plus the next execution; a guard raises BudgetExceededError."""
    from dpquant_tf import privacy  # pylint: disable=g-import-not-at-top
    for guard in privacy.budget_guards(self.model):
      guard.check_release(events)

  def on_epoch_begin(self, epoch, logs=None):
    if self._layers is None:
      self.on_train_begin()
    names = [info.name for info in self._layers]
    analysis = None
    releases = self.planned_releases(epoch)
    if releases:
      # Never release an analysis that would take the run past a budget.
      self._check_budget(releases)
      analysis = self.estimator.estimate(self.model, ledger=self.ledger,
                                         layers=names,
                                         base_config=self.base_config)
      self.releases.sensitivities.append(_base.SensitivityRelease(epoch, analysis))
    decision = self.policy.decide(epoch, self._layers, self.releases,
                                  self._generator)
    plan = _plan.plan_from_decision(decision, base_config=self.base_config)
    _plan.set_plan(self.model, plan)
    if decision.gradient_bits is not None:
      optimizer = self.model.optimizer
      if not _is_dpquant_optimizer(optimizer):
        v.fail("model.optimizer", type(optimizer).__name__, "a DPQuantOptimizer"
               f" or DPQuantAdamOptimizer: {type(self.policy).__name__} sets "
               "per-layer gradient bits")
      optimizer.set_gradient_bits(_plan.gradient_bit_keys(
          self.model, dict(decision.gradient_bits)))
    # New bit widths change the effective noise multiplier (BOUND mode): the
    # epoch's first execution is checked with them before it runs.
    self._check_budget(())
    if self.policy.needs_update_norms:
      self._kernels_at_begin = self._kernels()
      self._iterations_at_begin = self._iterations()
    self._pending = self._entry(epoch, decision, plan, analysis)

  def on_epoch_end(self, epoch, logs=None):
    if self._pending is None:
      return
    entry, self._pending = self._pending, None
    if self.policy.needs_update_norms and self._kernels_at_begin:
      self.releases.update_rms = self._update_rms()
      entry["update_rms"] = dict(self.releases.update_rms)
    if self.ledger is not None and self.delta is not None:
      # The one proven figure under "epsilon", as PrivacyCallback logs it
      # (whatever the callback order); the Poisson-amplified figure only
      # under its own name when batches were not Poisson sampled.
      entry["epsilon"] = float(self.ledger.proven_epsilon(self.delta))
      if not self.ledger.proves_amplification():
        entry["epsilon_if_poisson"] = float(self.ledger.epsilon(self.delta))
      entry["analysis_epsilon_share"] = float(self.ledger.analysis_share(self.delta))
    self.history.append(entry)
    if logs is not None:
      logs.update(self.log_values(entry))

  # -- helpers -------------------------------------------------------------------

  def _entry(self, epoch, decision, plan, analysis) -> Dict[str, Any]:
    macs = {info.name: float(info.fwd_macs) + float(info.bwd_macs)
            for info in self._layers}
    quantized = decision.quantized
    total = sum(macs.values())
    bits = _plan.forward_bits(plan, [info.name for info in self._layers])
    return {
        "epoch": int(epoch),
        "quantized": list(quantized),
        "layer_fraction": len(quantized) / len(self._layers),
        "flop_fraction": (sum(macs[n] for n in quantized) / total) if total else 0.0,
        "bits": bits,
        "gradient_bits": (None if decision.gradient_bits is None
                          else {k: int(b) for k, b in decision.gradient_bits.items()}),
        "analysis": None if analysis is None else dict(analysis),
    }

  @staticmethod
  def log_values(entry: Dict[str, Any]) -> Dict[str, float]:
    """The scalar values written into Keras `logs` for one history entry."""
    out = {"quant_layer_fraction": float(entry["layer_fraction"]),
           "quant_flop_fraction": float(entry["flop_fraction"])}
    for name, b in entry["bits"].items():
      out[f"quant_bits/{name}"] = float(b)
    for name, b in (entry.get("gradient_bits") or {}).items():
      out[f"grad_bits/{name}"] = float(b)
    for key in ("epsilon", "epsilon_if_poisson", "analysis_epsilon_share"):
      if key in entry:
        out[key] = float(entry[key])
    return out

  def _kernels(self) -> Dict[str, np.ndarray]:
    out = {}
    for info in self._layers:
      kernel = _plan.kernel_of(self.model, info)
      if kernel is not None:
        out[info.name] = np.array(kernel.numpy(), dtype=np.float64)
    return out

  def _iterations(self) -> int:
    iterations = getattr(self.model.optimizer, "iterations", None)
    return 0 if iterations is None else int(iterations.numpy())

  def _update_rms(self) -> Dict[str, float]:
    """Per-coordinate RMS of each kernel's update per step (released weights)."""
    now = self._kernels()
    steps = max(self._iterations() - self._iterations_at_begin, 1)
    return {name: float(np.sqrt(np.mean((now[name] - before) ** 2))) / steps
            for name, before in self._kernels_at_begin.items() if name in now}

  def to_json(self) -> str:
    """The per-epoch history as JSON (for the examples' metrics files)."""
    return json.dumps({"policy": _base.serialize_policy(self.policy),
                       "estimator": (None if self.estimator is None
                                     else self.estimator.get_config()),
                       "epochs": self.history})

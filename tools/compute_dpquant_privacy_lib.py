"""Logic of tools/compute_dpquant_privacy.py: plan a run's privacy.

Two directions:

* epsilon for a planned run: N, expected batch size B, noise multiplier z,
  epochs, delta, and a plan of loss-sensitivity analyses (one
  ``sampled_gaussian_event(q_a, sigma_a)`` every
  ``analysis_period`` epochs, ceil(epochs / period) releases, as
  ``dpquant_tf.schedule`` records them);
* the inverse: the noise multiplier for a target epsilon (bisection).

Training is ``privacy.planned_steps(N, B, epochs)`` = ceil(epochs *
ceil(N / B)) Poisson-sampled steps at q = B / N (an epoch is
``privacy.steps_per_epoch``, as the input pipelines run it).
"""

import dataclasses
import math
from typing import Any, Dict, List, Optional, Tuple

from dpquant_tf import _validation as V
from dpquant_tf import privacy

__all__ = ["PrivacyPlan", "analysis_events", "run"]


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
  """A planned run. ``noise_multiplier`` None means: calibrate it."""
  dataset_size: int
  batch_size: float
  epochs: float
  delta: float
  noise_multiplier: Optional[float] = None
  target_epsilon: Optional[float] = None
  analysis_period: int = 0
  analysis_sampling_rate: float = 0.05
  analysis_noise_multiplier: float = 4.0
  accountant: str = "rdp"
  sampling: str = "poisson"

  def __post_init__(self):
    if (self.noise_multiplier is None) == (self.target_epsilon is None):
      V.fail("noise_multiplier", self.noise_multiplier,
             "given exactly when target_epsilon is not (target_epsilon="
             f"{self.target_epsilon!r})")
    V.check_int("analysis_period", self.analysis_period, low=0)
    V.check_probability("analysis_sampling_rate", self.analysis_sampling_rate)
    V.check_positive("analysis_noise_multiplier",
                     self.analysis_noise_multiplier)


def analysis_events(plan: PrivacyPlan) -> List[Tuple[Any, int]]:
  """The planned analysis releases as (DpEvent, count)."""
  if plan.analysis_period == 0:
    return []
  count = math.ceil(plan.epochs / plan.analysis_period)
  event = privacy.sampled_gaussian_event(plan.analysis_sampling_rate,
                                        plan.analysis_noise_multiplier)
  return [(event, count)]


def run(plan: PrivacyPlan) -> Dict[str, Any]:
  """Epsilon (or the calibrated noise) of `plan`, with a statement."""
  analyses = analysis_events(plan)
  accountant = V.check_enum("accountant", plan.accountant,
                            privacy.Accountant)
  z = plan.noise_multiplier
  if z is None:
    z = privacy.calibrate_noise_multiplier(
        plan.target_epsilon, plan.delta, plan.dataset_size, plan.batch_size,
        plan.epochs, analyses=analyses, accountant=accountant)
  kw = dict(dataset_size=plan.dataset_size, batch_size=plan.batch_size,
            epochs=plan.epochs, delta=plan.delta, accountant=accountant)
  eps = privacy.planned_epsilon(noise_multiplier=z, analyses=analyses, **kw)
  eps_train = privacy.planned_epsilon(noise_multiplier=z, **kw)
  steps = privacy.planned_steps(plan.dataset_size, plan.batch_size,
                                plan.epochs)
  q = min(plan.batch_size / plan.dataset_size, 1.0)
  ledger = privacy.PrivacyLedger(sampling_method=plan.sampling,
                                 accountant=accountant,
                                 dataset_size=plan.dataset_size)
  ledger.record(privacy.sampled_gaussian_event(q, z), kind="train",
                count=steps)
  for event, count in analyses:
    ledger.record(event, kind="analysis", count=count)
  share = (eps - eps_train) / eps if eps > 0 and math.isfinite(eps) else 0.0
  return {
      "mode": "epsilon" if plan.target_epsilon is None else "calibrate",
      "dataset_size": plan.dataset_size,
      "batch_size": plan.batch_size,
      "epochs": plan.epochs,
      "steps": steps,
      "sampling_probability": q,
      "noise_multiplier": float(z),
      "delta": plan.delta,
      "target_epsilon": plan.target_epsilon,
      "epsilon": eps,
      # The figure that holds for --sampling (without amplification when
      # batches are shuffled, not Poisson sampled).
      "proven_epsilon": ledger.proven_epsilon(plan.delta),
      "training_epsilon": eps_train,
      "analysis_releases": sum(c for _, c in analyses),
      "analysis_epsilon_share": share,
      "accountant": accountant.value,
      "sampling": plan.sampling,
      "statement": ledger.statement(plan.delta),
  }

"""Empirical privacy auditing: lower bounds on the epsilon training leaks.

* Statistics (pure functions): ``clopper_pearson``, ``epsilon_from_rates``,
  ``threshold_epsilon_lower_bound``,
  ``pooled_threshold_epsilon_lower_bound``, ``one_run_p_value``,
  ``one_run_epsilon_lower_bound``.
* ``audit_mechanism``: white-box audit of one DP optimizer step on
  neighbouring batches, many trials (docs/AUDIT.md).
* ``audit_checkpoint_replay``: an adversary holding two consecutive
  checkpoints tries to regenerate the step's noise.
* ``audit_one_run``: Steinke et al. (2023) audit of a whole training run
  from canaries included with probability 1/2 (input canaries, or gradient
  canaries through ``gradient_canaries``, the optimizer's audit hook).

A lower bound above the ledger's epsilon falsifies the privacy claim.
"""

from dpquant_tf.audit._checkpoint import audit_checkpoint_replay
from dpquant_tf.audit._gradient_canaries import CanariesNotTracedError
from dpquant_tf.audit._gradient_canaries import fit_with_gradient_canaries
from dpquant_tf.audit._gradient_canaries import gradient_canaries
from dpquant_tf.audit._gradient_canaries import GradientCanaries
from dpquant_tf.audit._gradient_canaries import per_step_scores
from dpquant_tf.audit._gradient_canaries import StepProjections
from dpquant_tf.audit._mechanism import audit_mechanism
from dpquant_tf.audit._mechanism import linear_probe_model
from dpquant_tf.audit._mechanism import MechanismAudit
from dpquant_tf.audit._one_run import audit_one_run
from dpquant_tf.audit._one_run import OneRunAudit
from dpquant_tf.audit._one_run import score_and_bound
from dpquant_tf.audit._stats import clopper_pearson
from dpquant_tf.audit._stats import epsilon_from_rates
from dpquant_tf.audit._stats import one_run_epsilon_lower_bound
from dpquant_tf.audit._stats import one_run_p_value
from dpquant_tf.audit._stats import pooled_threshold_epsilon_lower_bound
from dpquant_tf.audit._stats import PooledThresholdAudit
from dpquant_tf.audit._stats import threshold_epsilon_lower_bound
from dpquant_tf.audit._stats import ThresholdAudit

__all__ = [
    "CanariesNotTracedError",
    "GradientCanaries",
    "MechanismAudit",
    "OneRunAudit",
    "PooledThresholdAudit",
    "StepProjections",
    "ThresholdAudit",
    "audit_checkpoint_replay",
    "audit_mechanism",
    "audit_one_run",
    "clopper_pearson",
    "epsilon_from_rates",
    "fit_with_gradient_canaries",
    "gradient_canaries",
    "linear_probe_model",
    "one_run_epsilon_lower_bound",
    "one_run_p_value",
    "per_step_scores",
    "pooled_threshold_epsilon_lower_bound",
    "score_and_bound",
    "threshold_epsilon_lower_bound",
]

"""Statistics of empirical privacy auditing: pure NumPy/SciPy functions.

Every function turns an attacker's observed success into a lower bound on
epsilon that holds with the stated confidence *if* the audited mechanism is
(epsilon, delta)-DP. A lower bound above the accountant's epsilon therefore
falsifies the claim (a bug); a lower bound below it proves nothing beyond
"no bug of this strength was seen".

No maintained library fits the pinned stack: ``jax-privacy`` (its
``auditing.CanaryScoreAuditor``) needs numpy 2 and dp-accounting 0.6 (which
TF-Privacy 0.9 excludes), ``tensorflow-empirical-privacy`` pulls
tf-models-official. The formulas below are short and cite their source.

References:
  Clopper, Pearson (1934). The use of confidence or fiducial limits
    illustrated in the case of the binomial. Biometrika 26(4).
  Kairouz, Oh, Viswanath (2015). The composition theorem for differential
    privacy. ICML. https://arxiv.org/abs/1311.0776 (hypothesis-testing view:
    FPR + e^eps FNR >= 1 - delta, and symmetrically).
  Jagielski, Ullman, Oprea (2020). Auditing differentially private machine
    learning: how private is private SGD? NeurIPS.
    https://arxiv.org/abs/2006.07709
  Nasr, Song, Thakurta, Papernot, Carlini (2021). Adversary instantiation:
    lower bounds for differentially private machine learning. IEEE S&P.
    https://arxiv.org/abs/2101.04535
  Steinke, Nasr, Jagielski (2023). Privacy auditing with one (1) training
    run. NeurIPS. https://arxiv.org/abs/2305.08846
"""

import dataclasses
import math
from typing import Optional, Sequence, Tuple

import numpy as np
from scipy import optimize
from scipy import special
from scipy import stats

from dpquant_tf import _validation as V

__all__ = [
    "ThresholdAudit",
    "clopper_pearson",
    "epsilon_from_rates",
    "one_run_epsilon_lower_bound",
    "one_run_p_value",
    "threshold_epsilon_lower_bound",
]

_EPS_MAX = 100.0


def clopper_pearson(successes: int, trials: int,
                    confidence: float = 0.95) -> Tuple[float, float]:
  """Exact two-sided Clopper-Pearson interval for a binomial proportion.

  Theorem (Clopper and Pearson 1934): with ``k ~ Binomial(n, p)``, the
  interval ``[B(a/2; k, n-k+1), B(1-a/2; k+1, n-k)]`` (``B`` the beta
  quantile, ``a = 1 - confidence``) contains p with probability at least
  ``confidence`` for every p. For a one-sided bound at level ``1 - a``, call
  with ``confidence = 1 - 2a`` and keep one end.

  Args:
    successes: k, 0 <= k <= n.
    trials: n >= 1.
    confidence: in (0, 1).

  Returns:
    (lower, upper), both in [0, 1].
  """
  n = V.check_int("trials", trials, low=1)
  k = V.check_int("successes", successes, low=0, high=n)
  confidence = V.check_open_unit("confidence", confidence)
  alpha = 1.0 - confidence
  lower = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
  upper = 1.0 if k == n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
  return lower, upper


def epsilon_from_rates(fpr: float, fnr: float, delta: float) -> float:
  """Largest epsilon that a test with these error rates rules out.

  Theorem (Kairouz et al. 2015, Thm. 2.1): if M is (eps, delta)-DP, every
  test of H0: "input D" against H1: "input D'" has
  ``FPR + e^eps * FNR >= 1 - delta`` and ``FNR + e^eps * FPR >= 1 - delta``.
  So ``eps >= log((1 - delta - FNR) / FPR)`` (and the symmetric term); with
  FPR, FNR replaced by upper confidence bounds this is a lower bound on eps
  with the joint confidence of those bounds (Jagielski et al. 2020, Nasr et
  al. 2021).

  Args:
    fpr: false-positive rate (or an upper bound), in [0, 1].
    fnr: false-negative rate (or an upper bound), in [0, 1].
    delta: the delta of the claim, in [0, 1).

  Returns:
    max(0, the bound), capped at 100 when FPR (or FNR) is 0.
  """
  best = 0.0
  for a, b in ((fpr, fnr), (fnr, fpr)):
    num = 1.0 - delta - b
    if num <= 0:
      continue
    best = max(best, _EPS_MAX if a <= 0 else math.log(num / a))
  return min(best, _EPS_MAX)


@dataclasses.dataclass(frozen=True)
class ThresholdAudit:
  """Result of ``threshold_epsilon_lower_bound``.

  Attributes:
    epsilon_lower_bound: eps such that the claim "(eps', delta)-DP" is
      rejected at the stated confidence for every eps' < eps.
    threshold: the score threshold ("guess D'" iff score > threshold).
    false_positives, negatives: D-side trials above the threshold / total
      evaluated.
    false_negatives, positives: D'-side trials at or below it / total.
    fpr_upper, fnr_upper: one-sided Clopper-Pearson upper bounds.
    confidence: joint confidence of the bound.
  """
  epsilon_lower_bound: float
  threshold: float
  false_positives: int
  negatives: int
  false_negatives: int
  positives: int
  fpr_upper: float
  fnr_upper: float
  confidence: float


def _count_errors(scores_d, scores_d_prime, threshold):
  fp = int(np.sum(scores_d > threshold))
  fn = int(np.sum(scores_d_prime <= threshold))
  return fp, fn


def _bound_at(scores_d, scores_d_prime, threshold, delta, confidence):
  """Lower bound for one fixed threshold (no selection)."""
  fp, fn = _count_errors(scores_d, scores_d_prime, threshold)
  n0, n1 = len(scores_d), len(scores_d_prime)
  # Union bound: each one-sided bound fails with probability (1-conf)/2.
  two_sided = 1.0 - 2.0 * (1.0 - confidence) / 2.0
  fpr_ub = clopper_pearson(fp, n0, two_sided)[1]
  fnr_ub = clopper_pearson(fn, n1, two_sided)[1]
  eps = epsilon_from_rates(fpr_ub, fnr_ub, delta)
  return ThresholdAudit(eps, float(threshold), fp, n0, fn, n1, fpr_ub,
                        fnr_ub, confidence)


def threshold_epsilon_lower_bound(
    scores_d: Sequence[float], scores_d_prime: Sequence[float], *,
    delta: float, confidence: float = 0.95, selection_fraction: float = 0.1,
    seed: Optional[int] = 0,
    threshold: Optional[float] = None) -> ThresholdAudit:
  """Epsilon lower bound of the test "score > t means D'" (t chosen fairly).

  The threshold is chosen on a held-out split: a random
  ``selection_fraction`` of each side's trials picks the t that maximizes
  the plug-in bound (Clopper-Pearson bounds at the same confidence), and
  only the remaining trials, independent of t, are counted. The bound is
  then ``epsilon_from_rates(FPR_ub, FNR_ub, delta)`` with one-sided
  Clopper-Pearson upper bounds at level ``1 - (1 - confidence) / 2`` each,
  so the statement "M is not (eps, delta)-DP for eps < bound" errs with
  probability at most ``1 - confidence`` (union bound) whenever trials are
  independent (Jagielski et al. 2020, Sec. 3; Nasr et al. 2021). Both
  directions of the test are used (``epsilon_from_rates``); the score
  direction "larger means D'" is fixed in advance.

  Args:
    scores_d: attack scores of trials run on D (no canary).
    scores_d_prime: attack scores of trials run on D' (with the canary).
    delta: the delta of the claim being audited.
    confidence: e.g. 0.95.
    selection_fraction: share of each side used to choose t, in (0, 1).
    seed: seeds the split (public; it does not affect validity).
    threshold: a threshold fixed before the trials were run (e.g. from the
      claimed mechanism's distributions); then no split is made and every
      trial is counted.

  Returns:
    A ``ThresholdAudit``.
  """
  delta = V.check_probability("delta", delta, allow_zero=True)
  confidence = V.check_open_unit("confidence", confidence)
  selection_fraction = V.check_open_unit("selection_fraction",
                                         selection_fraction)
  s0 = np.asarray(scores_d, np.float64).ravel()
  s1 = np.asarray(scores_d_prime, np.float64).ravel()
  if min(len(s0), len(s1)) < 4:
    V.fail("scores", (len(s0), len(s1)), "at least 4 trials per side")
  if not (np.all(np.isfinite(s0)) and np.all(np.isfinite(s1))):
    V.fail("scores", "non-finite", "finite attack scores")
  if threshold is not None:
    return _bound_at(s0, s1, float(threshold), delta, confidence)
  rng = np.random.default_rng(seed)
  s0, s1 = rng.permutation(s0), rng.permutation(s1)
  k0 = max(1, int(len(s0) * selection_fraction))
  k1 = max(1, int(len(s1) * selection_fraction))
  sel0, ev0, sel1, ev1 = s0[:k0], s0[k0:], s1[:k1], s1[k1:]
  best_t = _select_threshold(sel0, sel1, len(ev0), len(ev1), delta,
                             confidence)
  return _bound_at(ev0, ev1, best_t, delta, confidence)


def _select_threshold(sel0, sel1, n0, n1, delta, confidence):
  """The t maximizing the bound that the selection split's error rates would
  give on an evaluation split of n0 and n1 trials (uses only sel0, sel1)."""
  candidates = np.unique(np.concatenate([sel0, sel1]))
  s0, s1 = np.sort(sel0), np.sort(sel1)
  fpr = 1.0 - np.searchsorted(s0, candidates, side="right") / len(s0)
  fnr = np.searchsorted(s1, candidates, side="right") / len(s1)
  # Bounds are monotone in the counts: score the candidates on a grid.
  order = np.argsort(-(np.log1p(-np.minimum(fnr, 1 - 1e-12)) -
                       np.log(np.maximum(fpr, 0.5 / len(s0)))))
  alpha = 1.0 - confidence
  best_t, best_eps = float(candidates[0]), -1.0
  for i in order[:64]:
    fp = int(round(fpr[i] * n0))
    fn = int(round(fnr[i] * n1))
    fpr_ub = clopper_pearson(fp, n0, 1.0 - alpha)[1]
    fnr_ub = clopper_pearson(fn, n1, 1.0 - alpha)[1]
    eps = epsilon_from_rates(fpr_ub, fnr_ub, delta)
    if eps > best_eps:
      best_t, best_eps = float(candidates[i]), eps
  return best_t


def one_run_p_value(m: int, r: int, v: int, epsilon: float,
                    delta: float = 0.0) -> float:
  """p-value of "v or more of r guesses correct" under (eps, delta)-DP.

  Theorem (Steinke, Nasr, Jagielski 2023, Thm. 3.1 with delta = 0): m
  canaries, each included independently with probability 1/2; an auditor
  guesses the membership of r of them from the output of an eps-DP
  algorithm. The number of correct guesses W is stochastically dominated by
  Binomial(r, p), p = e^eps / (e^eps + 1), so
  ``P[W >= v] <= beta = P[Binomial(r, p) >= v]``. With delta > 0 (their
  Sec. 5, the general (eps, delta) theorem) the bound becomes
  ``beta + 2 m delta * alpha`` with
  ``alpha = max_{1 <= i <= v} (P[Binomial(r, p) >= v - i] - beta) / i``.

  Args:
    m: number of canaries.
    r: number of guesses (the others abstain), r <= m.
    v: number of correct guesses, v <= r.
    epsilon: eps >= 0 of the null hypothesis.
    delta: delta of the null hypothesis.

  Returns:
    The p-value (at most 1).
  """
  p = float(special.expit(epsilon))
  beta = float(stats.binom.sf(v - 1, r, p))
  if delta == 0 or v == 0:
    return min(beta, 1.0)
  i = np.arange(1, v + 1)
  alpha = float(np.max((stats.binom.sf(v - i - 1, r, p) - beta) / i))
  return min(beta + 2.0 * m * delta * max(alpha, 0.0), 1.0)


def one_run_epsilon_lower_bound(m: int, r: int, v: int, *, delta: float,
                                confidence: float = 0.95) -> float:
  """Largest eps whose (eps, delta) claim v correct guesses of r reject.

  The claim "(eps, delta)-DP" is rejected at level ``1 - confidence`` when
  ``one_run_p_value(m, r, v, eps, delta) <= 1 - confidence``; the p-value
  increases with eps, so the rejected claims are an interval [0, eps_lb)
  (Steinke, Nasr, Jagielski 2023, Sec. 5 and Algorithm 1).

  Args:
    m: number of canaries (each included with probability 1/2).
    r: number of guesses.
    v: number of correct guesses.
    delta: delta of the claim.
    confidence: e.g. 0.95.

  Returns:
    The lower bound (0 if not even eps = 0 is rejected).
  """
  m = V.check_int("m", m, low=1)
  r = V.check_int("r", r, low=0, high=m)
  v = V.check_int("v", v, low=0, high=r)
  delta = V.check_probability("delta", delta, allow_zero=True)
  confidence = V.check_open_unit("confidence", confidence)
  alpha = 1.0 - confidence

  def objective(eps):
    return alpha - one_run_p_value(m, r, v, eps, delta)

  if r == 0 or objective(0.0) <= 0:
    return 0.0
  hi = 1.0
  while objective(hi) > 0:
    if hi >= _EPS_MAX:
      return _EPS_MAX
    hi *= 2.0
  return float(optimize.brentq(objective, 0.0, hi, xtol=1e-6))

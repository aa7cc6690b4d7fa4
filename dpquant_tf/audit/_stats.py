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
  Hoeffding (1956). On the distribution of the number of successes in
    independent trials. Ann. Math. Statist. 27(3), 713-721 (Theorem 4:
    binomial tails dominate those of a sum of independent, non-identical
    Bernoulli variables with the same mean, away from the mean).
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
    "PooledThresholdAudit",
    "ThresholdAudit",
    "clopper_pearson",
    "epsilon_from_rates",
    "one_run_epsilon_lower_bound",
    "one_run_p_value",
    "pooled_threshold_epsilon_lower_bound",
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


def _checked_audit_args(scores_d, scores_d_prime, delta, confidence,
                        selection_fraction, *, same_size):
  """Validates the threshold audits' arguments; returns them converted."""
  delta = V.check_probability("delta", delta, allow_zero=True)
  confidence = V.check_open_unit("confidence", confidence)
  selection_fraction = V.check_open_unit("selection_fraction",
                                         selection_fraction)
  s0 = np.asarray(scores_d, np.float64).ravel()
  s1 = np.asarray(scores_d_prime, np.float64).ravel()
  if same_size and (len(s0) != len(s1) or len(s0) < 4):
    V.fail("scores", (len(s0), len(s1)),
           "the same number (at least 4) of trials per side")
  if min(len(s0), len(s1)) < 4:
    V.fail("scores", (len(s0), len(s1)), "at least 4 trials per side")
  if not (np.all(np.isfinite(s0)) and np.all(np.isfinite(s1))):
    V.fail("scores", "non-finite", "finite attack scores")
  return delta, confidence, selection_fraction, s0, s1


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
  delta, confidence, selection_fraction, s0, s1 = _checked_audit_args(
      scores_d, scores_d_prime, delta, confidence, selection_fraction,
      same_size=False)
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


@dataclasses.dataclass(frozen=True)
class PooledThresholdAudit:
  """Result of ``pooled_threshold_epsilon_lower_bound``.

  Attributes:
    epsilon_lower_bound: eps such that "(eps', delta)-DP" is rejected at the
      stated confidence for every eps' < eps.
    threshold: t of T1 ("score > t means D'").
    mirror_threshold: t' of T2 ("score < t' means D").
    false_positives: FP1 + FP2 (D-trials above t plus D'-trials below t').
    false_negatives: FN1 + FN2 (D'-trials at or below t plus D-trials at or
      above t').
    trials: pooled trials per count, 2n (n per side).
    fpr_upper, fnr_upper: Clopper-Pearson upper bounds on the average rates.
    confidence: joint confidence of the bound.
  """
  epsilon_lower_bound: float
  threshold: float
  mirror_threshold: float
  false_positives: int
  false_negatives: int
  trials: int
  fpr_upper: float
  fnr_upper: float
  confidence: float


def _pooled_bound_at(s0, s1, t, t_mirror, delta, confidence):
  fp = int(np.sum(s0 > t)) + int(np.sum(s1 < t_mirror))
  fn = int(np.sum(s1 <= t)) + int(np.sum(s0 >= t_mirror))
  n = len(s0) + len(s1)
  two_sided = 1.0 - 2.0 * (1.0 - confidence) / 2.0
  fpr_ub = clopper_pearson(fp, n, two_sided)[1]
  fnr_ub = clopper_pearson(fn, n, two_sided)[1]
  eps = epsilon_from_rates(fpr_ub, fnr_ub, delta)
  return PooledThresholdAudit(eps, float(t), float(t_mirror), fp, fn, n,
                              fpr_ub, fnr_ub, confidence)


def pooled_threshold_epsilon_lower_bound(
    scores_d: Sequence[float], scores_d_prime: Sequence[float], *,
    delta: float, confidence: float = 0.95,
    threshold: Optional[float] = None,
    mirror_threshold: Optional[float] = None,
    selection_fraction: float = 0.1,
    seed: Optional[int] = 0) -> PooledThresholdAudit:
  """Epsilon lower bound of two mirrored threshold tests, pooled.

  T1 tests H0 "input D" against H1 "input D'" by "score > t means D'":
  FPR1 = P_D[s > t], FNR1 = P_D'[s <= t]. T2 tests the swapped pair (H0
  "D'", H1 "D") by "score < t' means D": FPR2 = P_D'[s < t'], FNR2 =
  P_D[s >= t']. DP is symmetric in the neighbouring pair, so if M is
  (eps, delta)-DP each test has ``FPR_i + e^eps FNR_i >= 1 - delta`` (and
  the symmetric inequality; Kairouz et al. 2015, Thm. 2.1), hence so do the
  averages FPR = (FPR1 + FPR2) / 2 and FNR = (FNR1 + FNR2) / 2 (the
  inequality is linear). With n trials per side, the pooled count
  FP1 + FP2 is a sum of 2n independent Bernoulli variables with mean 2n FPR
  (n with probability FPR1, n with FPR2), and likewise FN1 + FN2.

  Theorem (Hoeffding 1956, Thm. 4): for S a sum of N independent Bernoulli
  variables with mean N p, ``P[b <= S <= c] >= P[b <= Bin(N, p) <= c]``
  whenever ``0 <= b <= Np - 1`` and ``Np <= c <= N``. With c = N this gives
  ``P[S <= k] <= P[Bin(N, p) <= k]`` for ``k <= Np - 2``. The one-sided
  Clopper-Pearson upper bound U(S) misses p exactly on
  ``{S <= k*}``, k* the largest k with ``P[Bin(N, p) <= k] < alpha``, so it
  keeps its level whenever ``k* <= Np - 2``.

  Edge case (stated honestly): at level alpha = 0.025 (confidence 0.95)
  ``k* <= Np - 2`` fails only for ``N (1 - p) < 0.28`` (checked numerically
  for N from 4 to 40,000; ``tests/audit/test_audit_stats.py``), i.e. a rate
  within 0.28 / N of 1. There the Poisson-binomial lower tail can exceed the
  binomial one (e.g. P[S < N] grows with heterogeneity). But a rate that
  close to 1 can only make the bound positive if at least 7 of the N trials
  (8 for N >= 20) are non-events, since otherwise ``1 - U`` stays below
  the smallest possible upper bound of the other rate, ``U(0)``; their
  expected number being below 0.28, the multiplicative Chernoff bound
  (valid for non-identical independent Bernoullis) gives probability below
  (e 0.28 / 7)^7 < 2e-7 (< 1e-8 for N >= 20): at confidence 0.95 the stated
  confidence holds up to that additive term. The exact coverage of the
  pooled Clopper-Pearson bound for sums of two binomials is also checked
  on a grid of (p1, p2), edges included, in the tests.

  The two upper bounds are one-sided at level ``1 - (1 - confidence) / 2``
  each (union bound, no independence between the counts needed). The
  thresholds must be fixed independently of the counted trials: either
  given (e.g. t from the claimed score distributions and t' its mirror
  image) or chosen on a random ``selection_fraction`` split that is then
  not counted, as in ``threshold_epsilon_lower_bound``. Both sides must have
  the same number of trials (so FPR and FNR are averaged with the same
  weights).

  Args:
    scores_d: attack scores of trials on D (no canary).
    scores_d_prime: scores of trials on D' (with the canary), same count.
    delta: the delta of the claim being audited.
    confidence: e.g. 0.95.
    threshold, mirror_threshold: t and t', fixed in advance (give both or
      neither).
    selection_fraction: share of each side used to choose t and t' when
      they are not given.
    seed: seeds the split (public).

  Returns:
    A ``PooledThresholdAudit``.
  """
  delta, confidence, selection_fraction, s0, s1 = _checked_audit_args(
      scores_d, scores_d_prime, delta, confidence, selection_fraction,
      same_size=True)
  if (threshold is None) != (mirror_threshold is None):
    V.fail("mirror_threshold", mirror_threshold,
           "given together with threshold (or both None)")
  if threshold is not None:
    return _pooled_bound_at(s0, s1, float(threshold), float(mirror_threshold),
                            delta, confidence)
  rng = np.random.default_rng(seed)
  s0, s1 = rng.permutation(s0), rng.permutation(s1)
  k = max(1, int(len(s0) * selection_fraction))
  sel0, ev0, sel1, ev1 = s0[:k], s0[k:], s1[:k], s1[k:]
  n = 2 * len(ev0)
  t = _select_threshold(sel0, sel1, n, n, delta, confidence)
  # T2 is T1 on negated scores with the roles of D and D' swapped.
  t_mirror = -_select_threshold(-sel1, -sel0, n, n, delta, confidence)
  return _pooled_bound_at(ev0, ev1, t, t_mirror, delta, confidence)


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

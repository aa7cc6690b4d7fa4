"""The audit statistics against closed forms and simulated mechanisms."""

import math

import dp_accounting
import numpy as np
import pytest
from scipy import special
from scipy import stats

from dpquant_tf import audit


def test_clopper_pearson_closed_forms_and_validation():
  # k = 0 and k = n: the interval ends have closed forms.
  lo, hi = audit.clopper_pearson(0, 10, 0.95)
  assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 10))
  lo, hi = audit.clopper_pearson(10, 10, 0.95)
  assert hi == 1.0 and lo == pytest.approx(0.025 ** (1 / 10))
  lo, hi = audit.clopper_pearson(5, 10, 0.95)
  assert stats.binom.sf(4, 10, lo) == pytest.approx(0.025)
  assert stats.binom.cdf(5, 10, hi) == pytest.approx(0.025)
  with pytest.raises(ValueError, match="Expected successes=11"):
    audit.clopper_pearson(11, 10)


def test_clopper_pearson_coverage():
  rng = np.random.default_rng(0)
  p, n = 0.1, 50
  ks = rng.binomial(n, p, size=2000)
  cover = np.mean([audit.clopper_pearson(int(k), n, 0.9)[0] <= p
                   <= audit.clopper_pearson(int(k), n, 0.9)[1] for k in ks])
  assert cover >= 0.9


def test_epsilon_from_rates_is_exact_for_randomized_response():
  # eps-randomized response: FPR = FNR = 1 / (1 + e^eps) meets the bound.
  for eps in (0.5, 1.0, 3.0):
    rate = 1 / (1 + math.exp(eps))
    assert audit.epsilon_from_rates(rate, rate, 0.0) == pytest.approx(eps)
  assert audit.epsilon_from_rates(0.5, 0.5, 0.0) == 0.0


def _gaussian_scores(n, shift, seed):
  rng = np.random.default_rng(seed)
  return rng.normal(size=n), rng.normal(size=n) + shift


def test_threshold_bound_is_sound_and_has_power_on_gaussian_scores():
  # Scores of the Gaussian mechanism with noise multiplier 1: the tight
  # epsilon is the PLD one; the bound must stay below it at every seed.
  acc = dp_accounting.pld.PLDAccountant()
  acc.compose(dp_accounting.GaussianDpEvent(1.0))
  eps_true = acc.get_epsilon(1e-5)
  bounds = [audit.threshold_epsilon_lower_bound(
      *_gaussian_scores(2000, 1.0, s), delta=1e-5, seed=s).epsilon_lower_bound
            for s in range(10)]
  assert max(bounds) <= eps_true
  assert min(bounds) > 1.0  # power: a real leak is seen
  # A mechanism 10x less noisy is flagged against the claim for z = 1.
  big = audit.threshold_epsilon_lower_bound(*_gaussian_scores(500, 10.0, 0),
                                            delta=1e-5)
  assert big.epsilon_lower_bound > eps_true


def test_one_run_bound_closed_form_and_delta():
  # All r guesses right, delta = 0: p^r = alpha, eps = logit(alpha^(1/r)).
  for r in (10, 40):
    want = special.logit(0.05 ** (1 / r))
    got = audit.one_run_epsilon_lower_bound(100, r, r, delta=0.0)
    assert got == pytest.approx(want, abs=1e-5)
    with_delta = audit.one_run_epsilon_lower_bound(100, r, r, delta=1e-3)
    assert with_delta < got
  assert audit.one_run_p_value(100, 40, 20, 0.0) == pytest.approx(
      stats.binom.sf(19, 40, 0.5))
  assert audit.one_run_epsilon_lower_bound(100, 40, 20, delta=1e-5) == 0.0


def test_one_run_bound_is_sound_for_randomized_response():
  # Guesses from eps-randomized response are right with p = e^eps/(1+e^eps):
  # the 95% bound may exceed eps in at most about 5% of runs.
  eps, m, rng = 1.0, 200, np.random.default_rng(1)
  p = special.expit(eps)
  over = [audit.one_run_epsilon_lower_bound(
      m, m, int(rng.binomial(m, p)), delta=0.0) > eps for _ in range(200)]
  assert np.mean(over) <= 0.08


def test_fixed_threshold_counts_every_trial():
  s0, s1 = _gaussian_scores(400, 1.0, 3)
  fixed = audit.threshold_epsilon_lower_bound(s0, s1, delta=1e-5,
                                              threshold=1.5)
  assert fixed.negatives == 400 and fixed.positives == 400
  assert fixed.false_positives == int((s0 > 1.5).sum())
  split = audit.threshold_epsilon_lower_bound(s0, s1, delta=1e-5)
  assert split.negatives == 360


def _pooled_coverage(n, p1, p2, ub):
  """Exact P[average rate <= pooled upper bound ub[k] (k of 2n)]."""
  pmf = np.convolve(stats.binom.pmf(np.arange(n + 1), n, p1),
                    stats.binom.pmf(np.arange(n + 1), n, p2))
  return float(pmf[ub >= (p1 + p2) / 2].sum())


def test_pooled_clopper_pearson_keeps_its_level_for_two_binomials():
  # Hoeffding (1956) Thm. 4: the pooled count of two binomials with rates
  # p1 != p2 is less spread than Binomial(2n, mean); the one-sided upper
  # bound at 0.975 must cover the mean with probability >= 0.975, edges
  # (rates near 0 and 1, very unequal rates) included.
  grid = [0.0, 1e-4, 0.01, 0.1, 0.3, 0.5, 0.9, 0.99, 0.999, 1.0]
  worst = 1.0
  for n in (5, 40):
    ub = np.array([audit.clopper_pearson(k, 2 * n, 0.95)[1]
                   for k in range(2 * n + 1)])
    worst = min([worst] + [_pooled_coverage(n, p1, p2, ub)
                           for p1 in grid for p2 in grid])
  assert worst >= 0.975 - 1e-9
  # Power of the check: a bound that ignores the pooling (n, not 2n trials
  # counted as 2n) is caught by the same computation.
  pmf = stats.binom.pmf(np.arange(41), 40, 0.3)
  narrow = np.array([audit.clopper_pearson(k, 40, 0.5)[1] for k in range(41)])
  assert pmf[narrow >= 0.3].sum() < 0.975


def test_hoeffding_condition_fails_only_within_028_over_n_of_one():
  # The edge case the docstring of pooled_threshold_epsilon_lower_bound
  # states: k* <= N p - 2 holds unless N (1 - p) < 0.28 (alpha = 0.025).
  for n_total in (8, 80, 2000):
    for p in np.linspace(0.001, 0.999, 500):
      cdf = stats.binom.cdf(np.arange(n_total + 1), n_total, p)
      below = np.nonzero(cdf < 0.025)[0]
      if len(below) and below.max() > n_total * p - 2:
        assert n_total * (1 - p) < 0.28


def test_pooled_bound_is_sound_and_tighter_on_gaussian_scores():
  # Gaussian mechanism, z = 1: the pooled bound stays below the tight (PLD)
  # epsilon at every seed, and on average beats the one-tailed bound at the
  # same fixed threshold (it counts twice the trials).
  acc = dp_accounting.pld.PLDAccountant()
  acc.compose(dp_accounting.GaussianDpEvent(1.0))
  eps_true = acc.get_epsilon(1e-5)
  pooled, single = [], []
  for s in range(20):
    s0, s1 = _gaussian_scores(3000, 1.0, 100 + s)
    res = audit.pooled_threshold_epsilon_lower_bound(
        s0, s1, delta=1e-5, threshold=2.5, mirror_threshold=-1.5)
    pooled.append(res.epsilon_lower_bound)
    single.append(audit.threshold_epsilon_lower_bound(
        s0, s1, delta=1e-5, threshold=2.5).epsilon_lower_bound)
    assert res.trials == 6000
    assert res.false_positives == int((s0 > 2.5).sum() + (s1 < -1.5).sum())
  assert max(pooled) <= eps_true
  assert np.mean(pooled) > np.mean(single) + 0.05
  split = audit.pooled_threshold_epsilon_lower_bound(
      *_gaussian_scores(3000, 1.0, 7), delta=1e-5)
  assert 1.0 < split.epsilon_lower_bound <= eps_true
  assert split.trials == 2 * 2700
  # Power: a 10x less noisy mechanism is flagged against the z = 1 claim.
  big = audit.pooled_threshold_epsilon_lower_bound(
      *_gaussian_scores(500, 10.0, 0), delta=1e-5)
  assert big.epsilon_lower_bound > eps_true
  with pytest.raises(ValueError, match="same number"):
    audit.pooled_threshold_epsilon_lower_bound([0.0] * 5, [1.0] * 6,
                                               delta=1e-5)

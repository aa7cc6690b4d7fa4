"""Tests of tools/study_stats_lib: paired t intervals, Holm, verdicts."""

import math

import numpy as np
import pytest

from tools import study_stats_lib as ss

V = ss.Verdict


def test_paired_differences_use_only_common_seeds():
  a = {0: 80.0, 1: 82.0, 2: 90.0}
  b = {1: 81.0, 2: 85.0, 3: 70.0}
  assert ss.paired_differences(a, b) == {1: 1.0, 2: 5.0}


def test_paired_t_matches_the_textbook_interval():
  d = [1.0, 2.0, 3.0, 4.0, 5.0]  # mean 3, sd sqrt(2.5), t_{0.975,4} = 2.776445
  out = ss.paired_t(d)
  half = 2.7764451051977987 * math.sqrt(2.5) / math.sqrt(5)
  assert out["mean"] == pytest.approx(3.0)
  assert out["ci_low"] == pytest.approx(3.0 - half)
  assert out["ci_high"] == pytest.approx(3.0 + half)
  # t = 3 / (sqrt(2.5)/sqrt(5)) = 4.2426 on 4 df: two-sided p = 0.01324.
  assert out["p_value"] == pytest.approx(0.013236, abs=2e-5)
  # Against a margin: the same interval, the test of mean = margin.
  assert ss.paired_t(d, margin=3.0)["p_value"] == pytest.approx(1.0)


def test_paired_t_degenerate_cases():
  one = ss.paired_t([2.0])
  assert one["mean"] == 2.0 and one["ci_low"] is None and one["p_value"] is None
  flat = ss.paired_t([1.0, 1.0, 1.0])
  assert flat["ci_low"] == flat["ci_high"] == 1.0 and flat["p_value"] is None
  # Identical pairs (models at chance) decide nothing, whatever the margin.
  [same] = ss.decide_claims([{"name": "s", "margin": -2.0, "differences": [0.0] * 5}])
  assert same.verdict is ss.Verdict.UNDECIDED and same.p_holm is None
  with pytest.raises(ValueError, match="differences"):
    ss.paired_t([1.0, float("nan")])
  with pytest.raises(ValueError, match="alpha"):
    ss.paired_t([1.0, 2.0], alpha=1.5)


def test_holm_adjustment_and_ordering():
  # Sorted p: 0.01 (x4 = 0.04), 0.02 (x3 = 0.06), 0.03 (x2 = 0.06, monotone), 0.5.
  adj = ss.holm_adjust([0.03, 0.5, 0.01, 0.02, None])
  assert adj[2] == pytest.approx(0.04)
  assert adj[3] == pytest.approx(0.06)
  assert adj[0] == pytest.approx(0.06)  # raw 0.06, not below the previous rank
  assert adj[1] == pytest.approx(0.5)
  assert adj[4] is None
  # Monotone in the raw p values, and never below them.
  raw = [0.03, 0.5, 0.01, 0.02]
  order = np.argsort(raw)
  assert all(adj[order[i]] <= adj[order[i + 1]] for i in range(3))
  assert all(a >= r for a, r in zip(adj, raw))


def _draws(mean, sd, n, seed):
  return list(np.random.default_rng(seed).normal(mean, sd, n))


def test_verdicts_known_answers():
  claims = [
      {"name": "clear win", "margin": 0.0, "differences": _draws(3.0, 0.5, 8, 0)},
      {"name": "clear loss", "margin": 0.0, "differences": _draws(-3.0, 0.5, 8, 1)},
      {"name": "noise only", "margin": 0.0, "differences": _draws(0.0, 3.0, 5, 2)},
      # "At most 2 points worse": -0.5 +- small holds, -4 +- small does not.
      {"name": "within 2", "margin": -2.0, "differences": _draws(-0.5, 0.3, 6, 3)},
      {"name": "not within 2", "margin": -2.0, "differences": _draws(-4.0, 0.3, 6, 4)},
      {"name": "too few", "margin": 0.0, "differences": [5.0]},
  ]
  got = {c.name: c for c in ss.decide_claims(claims)}
  assert got["clear win"].verdict is V.HOLDS
  assert got["clear loss"].verdict is V.DOES_NOT_HOLD
  assert got["noise only"].verdict is V.UNDECIDED
  assert got["within 2"].verdict is V.HOLDS
  assert got["not within 2"].verdict is V.DOES_NOT_HOLD
  assert got["too few"].verdict is V.UNDECIDED and got["too few"].p_holm is None
  win = got["clear win"]
  assert win.ci_low > 0 and win.n == 8 and win.p_holm >= win.p_value


def test_correction_can_turn_a_marginal_claim_undecided():
  # Unadjusted p = 0.021 alone holds; in a family of 5 where it has the
  # smallest p, Holm multiplies it by 5 and it becomes undecided.
  d = [1.0, 2.0, 0.1, 1.5, 0.2, 1.8]
  alone = ss.decide_claims([{"name": "m", "differences": d}])[0]
  assert alone.p_value < 0.05 and alone.verdict is V.HOLDS
  family = [{"name": "m", "differences": d}] + [
      {"name": f"noise{i}", "differences": _draws(0.0, 3.0, 6, 10 + i)} for i in range(4)]
  marginal = ss.decide_claims(family)[0]
  assert marginal.p_value == pytest.approx(alone.p_value)
  assert marginal.p_holm == pytest.approx(5 * alone.p_value)
  assert marginal.p_holm > 0.05 and marginal.verdict is V.UNDECIDED


def test_pairs_to_decide_is_the_smallest_n_that_decides():
  from scipy import stats
  mean, sd, m = 1.0, 2.0, 3
  n = ss.pairs_to_decide(mean, sd, margin=0.0, alpha=0.05, family_size=m)
  level = 1 - 0.05 / (2 * m)
  def t_stat(k):
    return mean * math.sqrt(k) / sd
  assert t_stat(n) > stats.t.ppf(level, n - 1)          # n decides ...
  assert not t_stat(n - 1) > stats.t.ppf(level, n - 2)  # ... n - 1 does not
  # A simulated study with that many pairs at exactly that mean and sd decides.
  d = [mean + sd * z for z in _unit_sample(n)]
  (res,) = ss.decide_claims([{"name": "c", "differences": d, "margin": 0.0}])
  assert res.verdict is ss.Verdict.HOLDS and res.pairs_needed is None
  # Larger spread needs more pairs; no spread or mean at the margin: None.
  assert ss.pairs_to_decide(mean, 2 * sd) > n
  assert ss.pairs_to_decide(mean, 0.0) is None
  assert ss.pairs_to_decide(-2.0, 1.0, margin=-2.0) is None
  assert ss.pairs_to_decide(None, None) is None
  assert ss.pairs_to_decide(1e-6, 1.0) is None           # beyond MAX_PAIRS


def test_undecided_claims_report_the_pairs_needed():
  (res,) = ss.decide_claims([{"name": "c", "differences": [1.0, -0.5, 2.0],
                              "margin": 0.0}])
  assert res.verdict is ss.Verdict.UNDECIDED
  assert res.pairs_needed == ss.pairs_to_decide(res.mean, res.sd)
  assert res.pairs_needed > 3


def _unit_sample(n):
  """n values with sample mean exactly 0 and sample sd exactly 1."""
  import statistics
  xs = [float(i) for i in range(n)]
  mu, s = statistics.fmean(xs), statistics.stdev(xs)
  return [(x - mu) / s for x in xs]

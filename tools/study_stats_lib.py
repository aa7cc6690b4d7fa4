"""Statistics that decide the paired study's claims (docs/RESULTS.md).

Pure Python + scipy; no TensorFlow. The input is one number per seed and
policy (test accuracy in percent); within a seed every policy shares the
initialisation, the Poisson sample sequence and the DP noise stream (common
random numbers), so the claim is judged on the per-seed *paired differences*
d_s = a_s - b_s, not on two unpaired means.

The test (stated in every report):

* **Interval**: the paired t interval, mean(d) +- t_{1-alpha/2, n-1} *
  sd(d) / sqrt(n), at level 1 - alpha (95% by default), unadjusted.
* **Test of a claim** "difference > margin" (margin 0 for "better than",
  -2 for "at most 2 points worse"): the two-sided paired t test of
  H0: E[d] = margin, p = 2 P(T_{n-1} > |t|), t = (mean(d) - margin) /
  (sd(d) / sqrt(n)).
* **Multiple comparisons**: Holm-Bonferroni over all claims of one report
  (one family), at family-wise level alpha: sort the p values, p_(i) is
  adjusted to max_{j <= i} min(1, (m - j + 1) p_(j)).
* **Verdict**: *holds* when the Holm-adjusted p is below alpha and
  mean(d) > margin; *does not hold* when it is below alpha and mean(d) <
  margin (the data say the difference is on the wrong side of the margin);
  otherwise *undecided at this n* (also with fewer than 2 pairs, or with
  zero spread, where the t test is undefined). Deciding
  the direction from a two-sided test keeps the chance of a wrong-direction
  verdict below alpha / 2 per claim.

Because the verdict uses the corrected p and the interval is unadjusted, a
95% interval that just excludes the margin can still give "undecided".
"""

import dataclasses
import enum
import math
import statistics
from typing import Dict, List, Mapping, Optional, Sequence

from dpquant_tf import _validation

__all__ = ["ClaimResult", "Verdict", "decide_claims", "holm_adjust",
           "paired_differences", "paired_t", "pairs_to_decide"]

# pairs_to_decide searches up to this many pairs; beyond it returns None.
MAX_PAIRS = 10_000


class Verdict(enum.Enum):
  HOLDS = "holds"
  DOES_NOT_HOLD = "does not hold"
  UNDECIDED = "undecided at this n"


@dataclasses.dataclass(frozen=True)
class ClaimResult:
  """One claim: its paired differences, interval, test and verdict."""
  name: str
  margin: float
  n: int
  mean: Optional[float]
  sd: Optional[float]
  ci_low: Optional[float]
  ci_high: Optional[float]
  p_value: Optional[float]
  p_holm: Optional[float]
  verdict: Verdict
  differences: tuple = ()
  # Undecided claims: pairs that would decide at the observed mean and sd
  # (pairs_to_decide); None when decided, or when no n would (zero mean
  # distance, zero or unknown spread, or more than MAX_PAIRS).
  pairs_needed: Optional[int] = None


def paired_differences(a: Mapping[int, float], b: Mapping[int, float]) -> Dict[int, float]:
  """a[s] - b[s] for every seed s present in both (the pairs)."""
  return {s: float(a[s]) - float(b[s]) for s in sorted(set(a) & set(b))}


def paired_t(differences: Sequence[float], *, margin: float = 0.0,
             alpha: float = 0.05) -> Dict[str, Optional[float]]:
  """Mean, sd, the 1-alpha paired t interval and the two-sided p of E[d]=margin.

  Fewer than 2 differences: mean only (sd, interval and p are None). Zero
  spread (every pair differs by the same amount, e.g. models stuck at chance
  that predict one class): a zero-width interval and p None, since the t test
  is undefined; the claim is then undecided, not "proven" by n identical
  pairs.
  """
  _validation.check_open_unit("alpha", alpha)
  d = [float(x) for x in differences]
  for x in d:
    if not math.isfinite(x):
      _validation.fail("differences", x, "finite numbers")
  n = len(d)
  out = {"n": n, "mean": statistics.fmean(d) if d else None, "sd": None,
         "ci_low": None, "ci_high": None, "p_value": None}
  if n < 2:
    return out
  from scipy import stats  # pylint: disable=g-import-not-at-top
  mean, sd = out["mean"], statistics.stdev(d)
  se = sd / math.sqrt(n)
  half = float(stats.t.ppf(1 - alpha / 2, n - 1)) * se
  out.update(sd=sd, ci_low=mean - half, ci_high=mean + half)
  if se > 0:
    t = (mean - margin) / se
    out["p_value"] = float(2 * stats.t.sf(abs(t), n - 1))
  return out


def pairs_to_decide(mean: Optional[float], sd: Optional[float], *,
                    margin: float = 0.0, alpha: float = 0.05,
                    family_size: int = 1) -> Optional[int]:
  """Smallest n of pairs that would decide the claim at the observed spread.

  Planning figure, not a test: if further pairs had the observed mean and sd,
  the claim is decided once the two-sided paired t test of E[d] = margin has
  p < alpha / family_size (Bonferroni, the most conservative step of Holm),
  i.e. |mean - margin| / (sd / sqrt(n)) > t_{1 - alpha / (2 m), n - 1}.

  Returns:
    That n (>= 2), or None when no n decides it: unknown or zero spread, a
    mean equal to the margin, or more than ``MAX_PAIRS`` pairs.
  """
  _validation.check_open_unit("alpha", alpha)
  family_size = _validation.check_int("family_size", family_size, low=1)
  if mean is None or sd is None or not sd > 0 or mean == margin:
    return None
  from scipy import stats  # pylint: disable=g-import-not-at-top
  level = 1 - alpha / (2 * family_size)
  distance = abs(float(mean) - float(margin))

  def decides(n: int) -> bool:
    return distance * math.sqrt(n) / sd > float(stats.t.ppf(level, n - 1))

  if not decides(MAX_PAIRS):
    return None
  lo, hi = 2, MAX_PAIRS          # decides(hi) holds; find the smallest such n
  while lo < hi:
    mid = (lo + hi) // 2
    if decides(mid):
      hi = mid
    else:
      lo = mid + 1
  return lo


def holm_adjust(p_values: Sequence[Optional[float]]) -> List[Optional[float]]:
  """Holm-Bonferroni adjusted p values (None entries are left out of the family)."""
  idx = [i for i, p in enumerate(p_values) if p is not None]
  m = len(idx)
  out: List[Optional[float]] = [None] * len(p_values)
  running = 0.0
  for rank, i in enumerate(sorted(idx, key=lambda j: p_values[j])):
    running = max(running, min(1.0, (m - rank) * p_values[i]))
    out[i] = running
  return out


def decide_claims(claims: Sequence[Mapping[str, object]], *,
                  alpha: float = 0.05) -> List[ClaimResult]:
  """Interval, Holm-corrected test and verdict of every claim of one family.

  Args:
    claims: dicts with ``name`` (str), ``differences`` (per-seed paired
      differences, points) and ``margin`` (the claim is "E[d] > margin").
    alpha: family-wise error level; the intervals are 1 - alpha.

  Returns:
    One :class:`ClaimResult` per claim, in input order.
  """
  tests = []
  for claim in claims:
    margin = float(claim.get("margin", 0.0))
    diffs = list(claim["differences"])
    tests.append((claim["name"], margin, diffs,
                  paired_t(diffs, margin=margin, alpha=alpha)))
  adjusted = holm_adjust([t[3]["p_value"] for t in tests])
  out = []
  for (name, margin, diffs, t), p_holm in zip(tests, adjusted):
    verdict = Verdict.UNDECIDED
    if p_holm is not None and p_holm < alpha and t["mean"] != margin:
      verdict = Verdict.HOLDS if t["mean"] > margin else Verdict.DOES_NOT_HOLD
    needed = None
    if verdict is Verdict.UNDECIDED:
      needed = pairs_to_decide(t["mean"], t["sd"], margin=margin, alpha=alpha,
                               family_size=len(tests))
    out.append(ClaimResult(name=name, margin=margin, n=t["n"], mean=t["mean"],
                           sd=t["sd"], ci_low=t["ci_low"], ci_high=t["ci_high"],
                           p_value=t["p_value"], p_holm=p_holm, verdict=verdict,
                           differences=tuple(diffs), pairs_needed=needed))
  return out

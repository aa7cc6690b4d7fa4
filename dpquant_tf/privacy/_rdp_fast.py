"""Vectorized RDP of the Poisson-subsampled Gaussian mechanism.

The same series as dp_accounting 0.4.3's ``_compute_log_a_int`` and
``_compute_log_a_frac`` (Mironov, Talwar, Zhang, "Renyi Differential Privacy
of the Sampled Gaussian Mechanism", arXiv:1908.10530), summed with numpy over
all orders and terms at once instead of a Python loop per term. The terms and
the stopping rule are the same; only the summation order differs (shifted
sums of exponentials instead of sequential log-adds), so curves agree with
dp_accounting to ~1e-15 absolute. Tests check epsilons to 1e-9. It is far
faster, which keeps a ledger with 100 distinct noise values under a second.
"""

import math

import numpy as np
from scipy import special

__all__ = ["poisson_gaussian_rdp"]


def _signed_logsumexp(log_terms, signs):
  """Row-wise log(sum sign * exp(log_terms)); NaN where the sum is <= 0."""
  m = np.max(log_terms, axis=1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  total = np.sum(signs * np.exp(log_terms - m), axis=1)
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(total > 0, m[:, 0] + np.log(np.where(total > 0, total, 1)),
                    np.nan)


def _log_a_int(q, sigma, alphas):
  """log A_alpha for integer alphas (vector)."""
  alphas = np.asarray(alphas, dtype=np.float64)
  i = np.arange(int(alphas.max()) + 1, dtype=np.float64)[None, :]
  a = alphas[:, None]
  valid = i <= a
  with np.errstate(invalid="ignore"):
    log_comb = (special.gammaln(a + 1) - special.gammaln(i + 1) -
                special.gammaln(np.where(valid, a - i, 0) + 1))
  s = (log_comb + i * math.log(q) + (a - i) * math.log(1 - q) +
       (i * i - i) / (2 * sigma**2))
  s = np.where(valid, s, -np.inf)
  return _signed_logsumexp(s, np.ones_like(s))


def _log_a_frac_rows(q, sigma, a, n_terms):
  """Series for the alphas `a` (column) with `n_terms` terms.

  Returns (log A, converged) per row; converged rows stop at the first term
  with max(log_s0, log_s1) < -30, as dp_accounting does.
  """
  z0 = sigma**2 * math.log(1 / q - 1) + .5
  i = np.arange(n_terms, dtype=np.float64)[None, :]
  coef = special.binom(a, i)
  with np.errstate(divide="ignore"):
    log_coef = np.log(np.abs(coef))
  j = a - i
  log_t0 = log_coef + i * math.log(q) + j * math.log(1 - q)
  log_t1 = log_coef + j * math.log(q) + i * math.log(1 - q)
  # log(.5) + log_erfc(x) with log_erfc(x) = log(2) + log_ndtr(-x * sqrt(2)).
  log_e0 = special.log_ndtr(-(i - z0) / sigma)
  log_e1 = special.log_ndtr(-(z0 - j) / sigma)
  log_s0 = log_t0 + (i * i - i) / (2 * (sigma**2)) + log_e0
  log_s1 = log_t1 + (j * j - j) / (2 * (sigma**2)) + log_e1
  small = np.maximum(log_s0, log_s1) < -30
  converged = small.any(axis=1)
  stop = np.argmax(small, axis=1)[:, None]  # First index where it stops.
  keep = i <= stop
  signs = np.where(coef > 0, 1.0, -1.0)
  log_a0 = _signed_logsumexp(np.where(keep, log_s0, -np.inf), signs)
  log_a1 = _signed_logsumexp(np.where(keep, log_s1, -np.inf), signs)
  return np.logaddexp(log_a0, log_a1), converged


def _log_a_frac(q, sigma, alphas):
  """log A_alpha for fractional alphas (vector); NaN if not converged."""
  alphas = np.asarray(alphas, dtype=np.float64)
  out = np.full(alphas.shape, np.nan)
  pending = np.arange(alphas.size)
  n_terms = 64
  while pending.size and n_terms <= 65536:
    vals, ok = _log_a_frac_rows(q, sigma, alphas[pending][:, None], n_terms)
    out[pending[ok]] = vals[ok]
    pending = pending[~ok]
    n_terms *= 4
  return out


def poisson_gaussian_rdp(q: float, sigma: float, orders) -> np.ndarray:
  """RDP at `orders` of the Poisson-sampled Gaussian (rate q, multiplier).

  Returns NaN entries where the vectorized series could not be evaluated
  (callers then fall back to dp_accounting).
  """
  orders = np.asarray(orders, dtype=np.float64)
  if q == 0:
    return np.zeros_like(orders)
  if sigma == 0 or not np.isfinite(orders).all():
    return np.where(np.isfinite(orders) & (sigma != 0), np.nan, np.inf)
  if q == 1.:
    return orders / (2 * sigma**2)
  out = np.empty_like(orders)
  is_int = orders == np.floor(orders)
  for group in (is_int & (orders <= 64), is_int & (orders > 64)):
    if group.any():
      out[group] = _log_a_int(q, sigma, orders[group]) / (orders[group] - 1)
  if (~is_int).any():
    out[~is_int] = (_log_a_frac(q, sigma, orders[~is_int]) /
                    (orders[~is_int] - 1))
  # RDP is never negative; round-off (about -1e-16 at q = 1e-9) is clamped.
  # NaN (not evaluated) stays NaN.
  return np.where(np.isnan(out), out, np.maximum(out, 0.0))

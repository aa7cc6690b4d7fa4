"""Memoized composition of dp_accounting events (RDP and PLD).

Each distinct event's RDP curve is computed once (vectorized for sampled
Gaussian events, see ``_rdp_fast``; a dp_accounting ``RdpAccountant`` for
other events; cached by the event's repr) and equal
steps are composed with ``count``, so a run with 10,000 steps and 100 distinct
noise values composes 100 curves, not 10,000 events.
"""

import enum
import math
from typing import Iterable, Optional, Sequence, Tuple
import warnings

import dp_accounting
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib
import numpy as np

from dpquant_tf import _validation as V
from dpquant_tf.privacy import _rdp_fast

__all__ = ["Accountant", "check_delta", "compose_epsilon",
           "PLD_MAX_POINTS", "rdp_curve"]

# Largest PLD support (points of the discretized privacy-loss distribution,
# estimated before composing) the PLD path builds; larger compositions are
# accounted with RDP (an upper bound on the PLD figure) and a warning.
PLD_MAX_POINTS = 2e7
# dp_accounting's default discretization of the privacy loss.
_PLD_INTERVAL = 1e-4


def check_delta(delta, dataset_size: Optional[int]) -> float:
  """delta in (0, 1) and, with N known, below 1/N; warns above 1/(10 N).

  A delta of 1/N or more allows releasing one record in the clear (the
  "name and shame" mechanism is (0, 1/N)-DP), so it is refused; TF-Privacy
  and Opacus recommend delta well below 1/N.
  """
  delta = V.check_open_unit("delta", delta)
  if dataset_size is None:
    return delta
  n = V.check_int("dataset_size", dataset_size, low=1)
  if delta >= 1.0 / n:
    V.fail("delta", delta, f"< 1/dataset_size = 1/{n} = {1.0 / n:.3g} (a "
           "delta of 1/N or more permits publishing a record in the clear)")
  if delta > 1.0 / (10 * n):
    warnings.warn(
        f"delta={delta!r} is above 1/(10 N) = {1.0 / (10 * n):.3g} "
        f"(dataset_size={n}); a delta well below 1/N is recommended.",
        stacklevel=3)
  return delta

EventCounts = Sequence[Tuple[dp_accounting.DpEvent, int]]


class Accountant(enum.Enum):
  """Which dp_accounting accountant composes the events."""
  RDP = "rdp"
  PLD = "pld"


_RDP_CACHE = {}


def rdp_curve(event: dp_accounting.DpEvent) -> np.ndarray:
  """RDP of one occurrence of `event` at dp_accounting's default orders."""
  key = repr(event)
  curve = _RDP_CACHE.get(key)
  if curve is None:
    curve = _fast_curve(event)
    if curve is None:
      acc = dp_accounting.rdp.RdpAccountant()
      acc.compose(event)
      curve = acc.rdp
    # Clamp at zero: RDP is never negative; summation round-off below 0
    # (about -1e-16 at q = 1e-9) multiplied by 1e15 steps would lower the
    # epsilon of other events.
    curve = np.maximum(np.asarray(curve, dtype=np.float64), 0.0)
    curve.setflags(write=False)
    _RDP_CACHE[key] = curve
  return curve


def _fast_curve(event):
  """Vectorized curve for (Poisson-sampled) Gaussian events, else None."""
  q = 1.0
  if isinstance(event, dp_accounting.PoissonSampledDpEvent):
    q, event = float(event.sampling_probability), event.event
  if not isinstance(event, dp_accounting.GaussianDpEvent):
    return None
  curve = _rdp_fast.poisson_gaussian_rdp(
      q, float(event.noise_multiplier), rdp_lib.DEFAULT_RDP_ORDERS)
  return None if np.isnan(curve).any() else curve


def _rdp_epsilon(events: EventCounts, delta: float) -> float:
  orders = np.array(rdp_lib.DEFAULT_RDP_ORDERS)
  total = np.zeros_like(orders, dtype=np.float64)
  for event, count in events:
    total += count * rdp_curve(event)
  return max(0.0, float(rdp_lib.compute_epsilon(orders, total, delta)[0]))


_PLD_CACHE = {}


def _pld_points(events: EventCounts) -> float:
  """Estimated support size of the composed PLD (before building it).

  A Gaussian of noise multiplier z has a privacy-loss range of about 2 c / z
  (tails cut at c = 8 standard deviations), discretized at 1e-4; a k-fold
  composition (truncated at the same tail mass) spreads as sqrt(k). Events
  that are not (sampled) Gaussians count as one Gaussian of z = 1.
  """
  total = 0.0
  for event, count in events:
    inner = getattr(event, "event", event)
    z = float(getattr(inner, "noise_multiplier", 1.0))
    if z <= 0:
      return math.inf
    total += (16.0 / z) / _PLD_INTERVAL * math.sqrt(count)
  return total


def _pld_epsilon(events: EventCounts, delta: float) -> float:
  points = _pld_points(events)
  if points > PLD_MAX_POINTS:
    warnings.warn(
        f"PLD accounting of these events would build about {points:.3g} "
        f"points (limit {PLD_MAX_POINTS:.3g}, noise multipliers this small "
        "need gigabytes); the epsilon is computed with RDP instead, an upper "
        "bound on the PLD figure.", stacklevel=3)
    return _rdp_epsilon(events, delta)
  key = (tuple((repr(e), c) for e, c in events), delta)
  eps = _PLD_CACHE.get(key)
  if eps is None:
    acc = dp_accounting.pld.PLDAccountant()
    for event, count in events:
      acc.compose(dp_accounting.SelfComposedDpEvent(event, int(count)))
    eps = float(acc.get_epsilon(delta))
    if len(_PLD_CACHE) > 256:
      _PLD_CACHE.clear()
    _PLD_CACHE[key] = eps
  return eps


def compose_epsilon(events: EventCounts, delta: float,
                    accountant: Accountant = Accountant.RDP) -> float:
  """Epsilon at `delta` of the composition of ``(event, count)`` pairs."""
  events = [(e, int(c)) for e, c in events if int(c) > 0]
  if not events:
    return 0.0
  delta = float(delta)
  if accountant is Accountant.RDP:
    return _rdp_epsilon(events, delta)
  return _pld_epsilon(events, delta)


def as_event_counts(items: Iterable) -> list:
  """Accepts DpEvents or (DpEvent, count) pairs; returns pairs."""
  out = []
  for item in items:
    if isinstance(item, dp_accounting.DpEvent):
      out.append((item, 1))
    else:
      event, count = item
      out.append((event, int(count)))
  return out


def is_finite(x: float) -> bool:
  return math.isfinite(x)

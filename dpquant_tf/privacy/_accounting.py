"""Memoized composition of dp_accounting events (RDP and PLD).

Each distinct event's RDP curve is computed once (vectorized for sampled
Gaussian events, see ``_rdp_fast``; a dp_accounting ``RdpAccountant`` for
other events; cached by the event's repr) and equal
steps are composed with ``count``, so a run with 10,000 steps and 100 distinct
noise values composes 100 curves, not 10,000 events.
"""

import enum
import math
from typing import Iterable, Sequence, Tuple

import dp_accounting
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib
import numpy as np

from dpquant_tf.privacy import _rdp_fast

__all__ = ["Accountant", "compose_epsilon", "rdp_curve"]

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
  return float(rdp_lib.compute_epsilon(orders, total, delta)[0])


_PLD_CACHE = {}


def _pld_epsilon(events: EventCounts, delta: float) -> float:
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

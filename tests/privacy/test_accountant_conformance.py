"""One conformance suite for every accounting path of the ledger (issue 11).

Paths: RDP with the vectorized curves of ``_rdp_fast`` (the default), RDP
with dp_accounting's own curves (the fallback ``rdp_curve`` uses for other
events), and PLD. Each must equal dp_accounting composing the same events
directly, and satisfy the properties every accountant has: composition order
does not matter, epsilon grows with steps and falls with noise.
"""

import dp_accounting
import pytest

from dpquant_tf import privacy
from dpquant_tf.privacy import _accounting

DELTA = 1e-5
PATHS = ("rdp_fast", "rdp_reference", "pld")


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
  if request.param == "rdp_reference":
    # Select dp_accounting's own curve for every event (no fast series).
    monkeypatch.setattr(_accounting, "_fast_curve", lambda event: None)
    monkeypatch.setattr(_accounting, "_RDP_CACHE", {})
  else:
    monkeypatch.setattr(_accounting, "_RDP_CACHE", {})
  return request.param


def _ledger(path):
  return privacy.PrivacyLedger(
      sampling_method="poisson",
      accountant="pld" if path == "pld" else "rdp")


def _reference(path, events):
  acc = (dp_accounting.pld.PLDAccountant() if path == "pld" else
         dp_accounting.rdp.RdpAccountant())
  for event, count in events:
    acc.compose(dp_accounting.SelfComposedDpEvent(event, count))
  return acc.get_epsilon(DELTA)


def _step(q, z):
  return privacy.sampled_gaussian_event(q, z)


def _eps(path, train=(), analyses=()):
  ledger = _ledger(path)
  for event, count in train:
    ledger.record(event, kind="train", count=count)
  for event, count in analyses:
    ledger.record(event, kind="analysis", count=count)
  return ledger.epsilon(DELTA)


CASES = {
    "constant": ([(_step(0.02, 1.1), 60)], []),
    "varying": ([(_step(0.02, 1.2), 30), (_step(0.02, 2.0), 20),
                 (_step(0.01, 1.5), 10)], []),
    "with_analyses": ([(_step(0.02, 1.0), 40)],
                      [(_step(0.1, 4.0), 3), (privacy.gaussian_event(8.0),
                                              1)]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_equals_dp_accounting(path, case):
  train, analyses = CASES[case]
  rel = 1e-9 if path != "pld" else 1e-6
  assert _eps(path, train, analyses) == pytest.approx(
      _reference(path, list(train) + list(analyses)), rel=rel)


def test_composition_order_does_not_matter(path):
  train = CASES["varying"][0]
  orders = [train, train[::-1], [train[1], train[0], train[2]]]
  values = [_eps(path, order) for order in orders]
  assert max(values) - min(values) <= 1e-6 * max(values)


def test_monotone_in_steps_and_noise(path):
  by_steps = [_eps(path, [(_step(0.02, 1.5), s)]) for s in (5, 20, 80)]
  assert by_steps == sorted(by_steps) and by_steps[0] < by_steps[-1]
  by_noise = [_eps(path, [(_step(0.02, z), 20)]) for z in (4.0, 2.0, 1.2)]
  assert by_noise == sorted(by_noise) and by_noise[0] < by_noise[-1]

"""Tests of the schedule policies (pure; no model needed)."""

import collections
import itertools
import json

import numpy as np
import pytest
from scipy import stats

import dpquant_tf  # noqa: F401  (Keras 2 first)
import tensorflow as tf

from dpquant_tf import schedule
from dpquant_tf.schedule import _base

LayerInfo = collections.namedtuple("LayerInfo", ["name", "index", "fwd_macs", "bwd_macs"])


def _layers(n):
  return [LayerInfo(f"l{i}", i, 100 * (i + 1), 200 * (i + 1)) for i in range(n)]


def _chi2_pvalue(counts, probs):
  counts = np.asarray(counts, dtype=np.float64)
  expected = counts.sum() * np.asarray(probs, dtype=np.float64)
  return stats.chisquare(counts, expected).pvalue


# -- rotation -----------------------------------------------------------------


def _rotation_counts(policy, layers, epochs, rng):
  counts = np.zeros(len(layers))
  for epoch in range(epochs):
    d = policy.decide(epoch, layers, schedule.Releases(), rng)
    on = [i for i, info in enumerate(layers) if d.enabled[info.name]]
    assert len(on) == policy_k(policy, len(layers))
    counts[on] += 1
  return counts


def policy_k(policy, n):
  return _base.num_quantized(policy.ratio, n)


def _visit_statistic(counts, epochs, k):
  """Chi-square(n - 1) statistic for per-layer visit counts of uniform k-subsets."""
  n = len(counts)
  p = k / n
  var = epochs * p * (1 - p) * n / (n - 1)  # variance along the sum-constrained subspace
  return float(np.sum((counts - epochs * p) ** 2) / var)


def test_rotation_visits_every_layer_with_expected_frequency():
  layers, epochs = _layers(8), 3000
  policy = schedule.RotationPolicy(ratio=0.25)  # k = 2, p = 1/4
  counts = _rotation_counts(policy, layers, epochs, np.random.default_rng(0))
  assert counts.min() > 0
  stat = _visit_statistic(counts, epochs, 2)
  assert stats.chi2.sf(stat, len(layers) - 1) > 1e-3, counts
  # Each count within 4.5 standard errors of epochs * k / n.
  se = np.sqrt(epochs * 0.25 * 0.75)
  np.testing.assert_array_less(np.abs(counts - epochs * 0.25), 4.5 * se)


def test_rotation_frequency_test_has_power():
  """The same statistic rejects a mildly biased sampler (first layer 1.5x as likely)."""
  layers, epochs = _layers(8), 3000
  rng = np.random.default_rng(0)
  logits = np.zeros(8)
  logits[0] = np.log(1.5)
  counts = np.zeros(8)
  for _ in range(epochs):
    counts[list(_base.gumbel_top_k(logits, 2, rng))] += 1
  stat = _visit_statistic(counts, epochs, 2)
  assert stats.chi2.sf(stat, len(layers) - 1) < 1e-6


def test_rotation_accepts_tf_generator_and_is_reproducible():
  layers = _layers(6)
  policy = schedule.RotationPolicy(ratio=0.5)
  runs = []
  for _ in range(2):
    gen = tf.random.Generator.from_seed(7)
    runs.append([policy.decide(e, layers, schedule.Releases(), gen).quantized
                 for e in range(5)])
  assert runs[0] == runs[1]
  assert all(len(q) == 3 for q in runs[0])
  assert len({tuple(sorted(q)) for q in runs[0]}) > 1  # it rotates


def test_static_policy_keeps_one_subset_and_round_trips():
  layers = _layers(10)
  policy = schedule.StaticPolicy(ratio=0.75)  # round(7.5) = 8
  rng = np.random.default_rng(3)
  plans = {tuple(policy.decide(e, layers, schedule.Releases(), rng).quantized)
           for e in range(6)}
  assert len(plans) == 1 and len(next(iter(plans))) == 8
  restored = schedule.deserialize_policy(
      json.loads(json.dumps(schedule.serialize_policy(policy))))
  assert restored.decide(0, layers, schedule.Releases(), rng).quantized == list(
      next(iter(plans)))


def test_ratio_rounds_half_up_and_extremes():
  assert _base.num_quantized(0.5, 5) == 3
  assert _base.num_quantized(0.9, 10) == 9
  layers = _layers(4)
  rng = np.random.default_rng(0)
  assert schedule.RotationPolicy(ratio=0.0).decide(0, layers, schedule.Releases(),
                                                   rng).quantized == []
  assert len(schedule.RotationPolicy(ratio=1.0).decide(
      0, layers, schedule.Releases(), rng).quantized) == 4


# -- loss-aware ---------------------------------------------------------------

_L = np.array([0.0, 0.05, 0.1, 0.3])
_BETA = 10.0


def _subset_probs(p, k):
  """Exact P(unordered k-subset) under successive sampling without replacement."""
  n = len(p)
  out = {}
  for subset in itertools.combinations(range(n), k):
    total = 0.0
    for order in itertools.permutations(subset):
      prob, left = 1.0, 1.0
      for i in order:
        prob *= p[i] / left
        left -= p[i]
      total += prob
    out[subset] = total
  return out


def _loss_aware_draws(draws=12000, seed=0):
  layers = _layers(4)
  policy = schedule.LossAwarePolicy(ratio=0.5, beta=_BETA)
  released = schedule.Releases(sensitivities=[schedule.SensitivityRelease(
      0, {f"l{i}": float(x) for i, x in enumerate(_L)})])
  rng = np.random.default_rng(seed)
  orders = [policy.draw_order(layers, released, rng) for _ in range(draws)]
  first = collections.Counter(int(o[0][1:]) for o in orders)
  subsets = collections.Counter(tuple(sorted(int(n[1:]) for n in o)) for o in orders)
  return policy, layers, released, first, subsets


def test_loss_aware_first_draw_matches_softmax():
  policy, layers, released, first, _ = _loss_aware_draws()
  pi = np.exp(-_BETA * _L) / np.exp(-_BETA * _L).sum()
  np.testing.assert_allclose(policy.probabilities(layers, released), pi, rtol=1e-12)
  counts = [first[i] for i in range(4)]
  assert _chi2_pvalue(counts, pi) > 1e-3
  # Power: the same counts reject uniform and a halved beta.
  assert _chi2_pvalue(counts, np.full(4, 0.25)) < 1e-6
  half = np.exp(-_BETA / 2 * _L) / np.exp(-_BETA / 2 * _L).sum()
  assert _chi2_pvalue(counts, half) < 1e-6


def test_loss_aware_k_subsets_match_successive_sampling():
  _, _, _, _, subsets = _loss_aware_draws()
  pi = np.exp(-_BETA * _L) / np.exp(-_BETA * _L).sum()
  exact = _subset_probs(pi, 2)
  keys = sorted(exact)
  counts = [subsets[s] for s in keys]
  assert _chi2_pvalue(counts, [exact[s] for s in keys]) > 1e-3
  # Power: reject "k-subset probability proportional to prod(pi)" (conditional
  # Poisson sampling, a different without-replacement scheme).
  prod = np.array([pi[a] * pi[b] for a, b in keys])
  assert _chi2_pvalue(counts, prod / prod.sum()) < 1e-6
  # Lower estimated sensitivity => quantized more often.
  inclusion = [sum(c for s, c in subsets.items() if i in s) for i in range(4)]
  assert inclusion == sorted(inclusion, reverse=True)


def test_loss_aware_ema_and_period():
  policy = schedule.LossAwarePolicy(ratio=0.5, alpha=0.25, period=3)
  assert [policy.analysis_due(e) for e in range(7)] == [
      True, False, False, True, False, False, True]
  names = ["a", "b"]
  released = schedule.Releases(sensitivities=[
      schedule.SensitivityRelease(0, {"a": 1.0, "b": 0.0}),
      schedule.SensitivityRelease(3, {"a": 0.0, "b": 2.0})])
  np.testing.assert_allclose(policy.smoothed(names, released), [0.75, 0.5])
  # No release yet: uniform, i.e. plain rotation.
  np.testing.assert_allclose(
      policy.probabilities([LayerInfo(n, i, 1, 1) for i, n in enumerate(names)],
                           schedule.Releases()), [0.5, 0.5])


# -- bits ---------------------------------------------------------------------


def test_bit_ramp_produces_documented_bits():
  layers = _layers(3)
  linear = schedule.BitRampPolicy(b_start=2, b_end=8, epochs=7, mode="linear")
  assert [linear.bits_at(e) for e in range(9)] == [2, 3, 4, 5, 6, 7, 8, 8, 8]
  expo = schedule.BitRampPolicy(b_start=2, b_end=8, epochs=5, mode="exponential")
  assert [expo.bits_at(e) for e in range(5)] == [2, 3, 4, 6, 8]
  d = linear.decide(3, layers, schedule.Releases(), None)
  assert d.gradient_bits == {"l0": 5, "l1": 5, "l2": 5}
  assert not any(d.enabled.values()) and d.layer_bits is None
  d = schedule.BitRampPolicy(b_start=8, b_end=4, epochs=3, target="layers").decide(
      1, layers, schedule.Releases(), None)
  assert d.layer_bits == {"l0": 6, "l1": 6, "l2": 6} and all(d.enabled.values())


def test_depth_policy_gives_more_bits_toward_output():
  d = schedule.DepthBitsPolicy(b_input=4, b_output=8).bits(0, _layers(4), None)
  assert d == {"l0": 4, "l1": 5, "l2": 7, "l3": 8}
  assert schedule.DepthBitsPolicy().bits(0, _layers(1), None) == {"l0": 8}


def test_norm_adaptive_bits():
  policy = schedule.NormAdaptiveBitsPolicy(b_ref=4, b_min=2, b_max=6)
  layers = _layers(5)
  assert set(policy.bits(0, layers, schedule.Releases()).values()) == {4}
  rms = {"l0": 1.0, "l1": 0.5, "l2": 2.0, "l3": 1e-6, "l4": 100.0}
  # median 1.0: +1 bit per halving, clipped to [2, 6].
  assert policy.bits(1, layers, schedule.Releases(update_rms=rms)) == {
      "l0": 4, "l1": 5, "l2": 3, "l3": 6, "l4": 2}


def test_combined_policy():
  layers = _layers(6)
  policy = schedule.CombinedPolicy(
      selection=schedule.RotationPolicy(ratio=0.5),
      bits=schedule.DepthBitsPolicy(b_input=2, b_output=7, target="layers"))
  d = policy.decide(0, layers, schedule.Releases(), np.random.default_rng(0))
  assert len(d.quantized) == 3
  assert d.layer_bits == {"l0": 2, "l1": 3, "l2": 4, "l3": 5, "l4": 6, "l5": 7}
  assert d.gradient_bits is None and not policy.spends_privacy
  la = schedule.CombinedPolicy(selection=schedule.LossAwarePolicy(period=2),
                               bits=schedule.BitRampPolicy())
  assert la.needs_sensitivities and la.analysis_due(2) and not la.analysis_due(1)


@pytest.mark.parametrize("policy", [
    schedule.StaticPolicy(ratio=0.5, layers=["l0", "l2"]),
    schedule.RotationPolicy(ratio=0.75),
    schedule.LossAwarePolicy(ratio=0.9, beta=3.0, alpha=0.2, period=1),
    schedule.BitRampPolicy(b_start=3, b_end=6, epochs=4, mode="exponential"),
    schedule.DepthBitsPolicy(b_input=3, b_output=5, target="layers"),
    schedule.NormAdaptiveBitsPolicy(b_ref=5, b_min=3, b_max=7),
    schedule.CombinedPolicy(selection=schedule.LossAwarePolicy(),
                            bits=schedule.BitRampPolicy()),
])
def test_serialization_round_trip(policy):
  blob = json.loads(json.dumps(schedule.serialize_policy(policy)))
  restored = schedule.deserialize_policy(blob)
  assert type(restored) is type(policy)
  assert restored.get_config() == policy.get_config()
  assert restored.spends_privacy is False
  layers = _layers(4)
  released = schedule.Releases(
      sensitivities=[schedule.SensitivityRelease(0, {f"l{i}": 0.1 * i for i in range(4)})],
      update_rms={f"l{i}": 1.0 + i for i in range(4)})
  a = policy.decide(2, layers, released, np.random.default_rng(5))
  b = restored.decide(2, layers, released, np.random.default_rng(5))
  assert a == b


@pytest.mark.parametrize("make, message", [
    (lambda: schedule.RotationPolicy(ratio=1.5), "Expected ratio=1.5 to be in [0, 1]."),
    (lambda: schedule.LossAwarePolicy(period=0), "Expected period=0 to be an integer in [1, inf]."),
    (lambda: schedule.LossAwarePolicy(alpha=0.0), "Expected alpha=0.0 to be in (0, 1]."),
    (lambda: schedule.BitRampPolicy(b_start=1), "Expected b_start=1 to be an integer in [2, 16]."),
    (lambda: schedule.BitRampPolicy(mode="cubic"), "Expected mode='cubic' to be one of"),
    (lambda: schedule.DepthBitsPolicy(target="weights"), "Expected target='weights' to be one of"),
])
def test_validation_messages(make, message):
  with pytest.raises((ValueError, TypeError)) as err:
    make()
  assert str(err.value).startswith(message)


def test_layers_and_generator_validation():
  with pytest.raises(ValueError, match="Expected layers=.* distinct layer names"):
    schedule.RotationPolicy().decide(0, [LayerInfo("a", 0, 1, 1)] * 2,
                                     schedule.Releases(), np.random.default_rng(0))
  with pytest.raises(TypeError, match="Expected generator="):
    schedule.RotationPolicy().decide(0, _layers(2), schedule.Releases(), 42)


def test_next_plan_returns_a_quant_plan():
  from dpquant_tf import quantization  # pylint: disable=g-import-not-at-top
  layers = _layers(4)
  rng = np.random.default_rng(0)
  plan = schedule.RotationPolicy(ratio=0.5).next_plan(0, layers, schedule.Releases(), rng)
  assert isinstance(plan, quantization.QuantPlan) and len(plan.enabled_layers()) == 2
  assert plan[plan.enabled_layers()[0]] == quantization.LayerQuantConfig()  # LUQ-FP4
  base = quantization.LayerQuantConfig(fwd_format="fp8_e4m3", fwd_bits=8,
                                       bwd_format="fp8_e5m2", bwd_bits=8)
  plan = schedule.StaticPolicy(layers=["l1"]).next_plan(
      0, layers, schedule.Releases(), rng, base_config=base)
  assert plan.enabled_layers() == ["l1"] and plan["l1"] == base
  assert plan["l0"] == base.disabled()
  plan = schedule.CombinedPolicy(
      selection=schedule.StaticPolicy(layers=["l3"]),
      bits=schedule.DepthBitsPolicy(b_input=2, b_output=8, target="layers")).next_plan(
          0, layers, schedule.Releases(), rng)
  assert plan["l3"] == quantization.LayerQuantConfig(
      fwd_format="int", fwd_bits=8, bwd_format="int", bwd_bits=8)
  with pytest.raises(TypeError, match="Expected base_config="):
    schedule.RotationPolicy().next_plan(0, layers, schedule.Releases(), rng,
                                        base_config="int4")

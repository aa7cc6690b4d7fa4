"""Gradient canaries: the optimizer's audit hook and the one-run audit."""

import logging

import numpy as np
import pytest
import tensorflow as tf

import dpquant_tf
from dpquant_tf import audit
from tests.audit import _broken


def _optimizer(**kwargs):
  args = dict(l2_norm_clip=1.0, noise_multiplier=0.0, learning_rate=0.5,
              expected_batch_size=4.0, sampling_probability=1.0)
  args.update(kwargs)
  return dpquant_tf.DPQuantOptimizer(**args)


def _zero_gradient_step(model, optimizer):
  # Per-example loss 0 * f(x): every data gradient is exactly zero, so the
  # step moves the weights only by what the hook adds (z = 0).
  x = tf.ones([4, 3])

  @tf.function
  def step():
    with tf.GradientTape() as tape:
      loss = 0.0 * tf.reshape(model(x), [-1])
    optimizer.dp_step(model, x, loss, tape)
  return step


def test_default_optimizers_have_no_hook_and_the_context_removes_it(caplog):
  for cls in (dpquant_tf.DPQuantOptimizer, dpquant_tf.DPQuantAdamOptimizer):
    assert cls(l2_norm_clip=1.0, noise_multiplier=1.0)._audit_hook is None
  opt, model = _optimizer(), audit.linear_probe_model(3)
  with caplog.at_level(logging.WARNING):
    with audit.gradient_canaries(opt, model.trainable_variables, canaries=4):
      assert opt._audit_hook is not None
      with pytest.raises(ValueError, match="already audited"):
        with audit.gradient_canaries(opt, model.trainable_variables,
                                     canaries=4):
          pass
  assert "AUDITED" in caplog.text
  assert opt._audit_hook is None
  with pytest.raises(RuntimeError, match="boom"):
    with audit.gradient_canaries(opt, model.trainable_variables, canaries=4):
      raise RuntimeError("boom")
  assert opt._audit_hook is None
  with pytest.raises(ValueError, match="sampling probability unknown"):
    with audit.gradient_canaries(
        dpquant_tf.DPQuantOptimizer(l2_norm_clip=1.0, noise_multiplier=1.0),
        model.trainable_variables, canaries=4):
      pass


def test_hook_adds_c_times_each_included_direction_before_normalization():
  # q = 1, z = 0, zero data gradient: one step moves the weights by exactly
  # -lr * C * sum_{i in} u_i / B; a graph traced inside the context adds
  # nothing once it has exited.
  opt, model = _optimizer(l2_norm_clip=2.0), audit.linear_probe_model(3)
  model.layers[0].kernel.assign(tf.ones([3, 1]))
  step = _zero_gradient_step(model, opt)
  with audit.gradient_canaries(opt, model.trainable_variables, canaries=6,
                               seed=1) as cans:
    w0 = cans.flat_weights()
    step()
    moved = cans.flat_weights() - w0
  want = -0.5 * 2.0 * cans.directions[cans.included].sum(axis=0) / 4.0
  assert 0 < cans.included.sum() < 6
  np.testing.assert_allclose(moved, want, atol=1e-6)
  # Score = projection of the parameter change on -u_i (positive when in,
  # up to the cross-talk of the other directions in this 3-d space).
  np.testing.assert_allclose(cans.scores(w0), -cans.directions @ moved,
                             atol=1e-6)
  before = cans.flat_weights()
  step()  # traced with the hook; the gate is closed now
  np.testing.assert_allclose(cans.flat_weights(), before, atol=0)


def test_canaries_are_poisson_sampled_at_the_optimizer_q():
  # q = 0.3: each included canary is present in about 30% of the steps
  # (seeded sampling for this test only); 200 steps, 4 canaries.
  opt = _optimizer(sampling_probability=0.3)
  model = audit.linear_probe_model(64)
  x = tf.ones([4, 64])

  @tf.function
  def one():
    with tf.GradientTape() as tape:
      loss = 0.0 * tf.reshape(model(x), [-1])
    # White-box: the step as the owned train step takes it for a sealed
    # sampler batch at q = 0.3 (dp_step, a custom loop, records q = 1 and
    # the canaries would follow it).
    opt._owned_step(model, x, loss, tape, tf.constant(0.3, tf.float64))
  with audit.gradient_canaries(opt, model.trainable_variables, canaries=4,
                               seed=2, sampling_seed=3) as cans:
    w0 = cans.flat_weights()
    for _ in range(200):
      one()
    coef = cans.directions @ (w0 - cans.flat_weights())
  # Per step an included canary moves its score by lr*C/B = 0.125 (plus
  # cross-talk of the nearly orthogonal others, |u_i . u_j| ~ 1/8).
  frac = coef / (200 * 0.125)
  inc = cans.included
  assert inc.any()
  assert np.all(np.abs(frac[inc] - 0.3) < 0.15), frac
  assert np.all(np.abs(frac[~inc]) < 0.15), frac


def test_one_run_gradient_canaries_sound_and_flag_missing_noise():
  ok = audit.audit_one_run(canaries=100, epochs=3, noise_multiplier=5.0,
                           canary_kind="gradient")
  assert ok.canary_kind == "gradient" and ok.steps == 12
  assert not ok.violated, ok
  broken = audit.audit_one_run(canaries=100, epochs=3, noise_multiplier=5.0,
                               canary_kind="gradient",
                               optimizer_cls=_broken.NoNoiseOptimizer)
  assert broken.claimed_epsilon == ok.claimed_epsilon
  assert broken.violated, broken
  with pytest.raises(ValueError, match="canary_kind"):
    audit.audit_one_run(canaries=10, canary_kind="weights")


def test_per_step_scores_closed_form_and_power():
  # No move at any step: each step contributes log(1 - q + q e^{-1/(2 z^2)}).
  q, z = 0.1, 0.8
  got = audit.per_step_scores(np.zeros([7, 2]), unit=0.5,
                              sampling_probability=q, noise_multiplier=z)
  want = 7 * np.log(1 - q + q * np.exp(-0.5 / z**2))
  np.testing.assert_allclose(got, [want, want])
  # Simulated in/out canaries (moves in units of 0.5): "in" ranks higher.
  rng = np.random.default_rng(0)
  inc = rng.random(200) < 0.5
  moves = (rng.random([300, 200]) < q) * inc + rng.normal(size=[300, 200]) * z
  scores = audit.per_step_scores(0.5 * moves, unit=0.5,
                                 sampling_probability=q, noise_multiplier=z)
  assert scores[inc].mean() > scores[~inc].mean() + 1.0
  with pytest.raises(ValueError, match="noise_multiplier"):
    audit.per_step_scores(moves, unit=1.0, sampling_probability=q,
                          noise_multiplier=0.0)


def test_per_step_score_refuses_adam_and_final_score_works_for_it():
  model = audit.linear_probe_model(8)
  x = tf.ones([4, 8])
  opt = dpquant_tf.DPQuantAdamOptimizer(
      l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=4.0,
      sampling_probability=0.5)

  def fit(callbacks):
    assert callbacks == []
    with tf.GradientTape() as tape:
      loss = -tf.reshape(model(x), [-1])
    opt.dp_step(model, x, loss, tape)
  with pytest.raises(ValueError, match="plain SGD"):
    audit.fit_with_gradient_canaries(model, opt, fit, canaries=4)
  assert opt._audit_hook is None
  scores, included = audit.fit_with_gradient_canaries(model, opt, fit,
                                                      canaries=4,
                                                      score="final")
  assert scores.shape == (4,) and included.shape == (4,)
  assert np.all(np.isfinite(scores)) and opt._audit_hook is None


class _ZeroLoss(tf.keras.losses.Loss):
  """Per-example loss 0 * f(x): every data gradient is exactly zero."""

  def __init__(self):
    super().__init__(reduction="none")

  def call(self, y_true, y_pred):
    return 0.0 * tf.reshape(y_pred, [-1])


def _fitted_probe(dim=256):
  """A linear probe compiled with a DP optimizer (z = 0) and a zero loss,
  fit once already (its train step is traced without canaries)."""
  opt, model = _optimizer(), audit.linear_probe_model(dim)
  model.compile(optimizer=opt, loss=_ZeroLoss())
  opt.install_train_step(model)
  x, y = np.ones([4, dim], np.float32), np.zeros([4], np.float32)
  model.fit(x, y, batch_size=4, epochs=1, verbose=0)
  return opt, model, (x, y)


def test_auditing_a_model_fit_before_still_injects_the_canaries():
  """Issue 20: auditing a model that was already fit once injected no
  canaries (the traced step had no hook) and reported 0, silently."""
  opt, model, (x, y) = _fitted_probe()
  scores, included = audit.fit_with_gradient_canaries(
      model, opt, lambda cbs: model.fit(x, y, batch_size=4, epochs=3,
                                        verbose=0, callbacks=cbs),
      canaries=8, seed=1, score="final")
  # 3 steps, each moving an included canary's score by lr*C/B = 0.125
  # (plus the small cross-talk of nearly orthogonal directions).
  assert included.any() and (~included).any()
  assert np.all(scores[included] > 0.2), scores
  assert np.all(np.abs(scores[~included]) < 0.15), scores
  # On exit the step is retraced without the hook: training moves nothing.
  w = model.get_weights()
  model.fit(x, y, batch_size=4, epochs=1, verbose=0)
  for a, b in zip(w, model.get_weights()):
    np.testing.assert_array_equal(a, b)


def test_steps_traced_before_the_context_fail_loudly():
  opt, model = _optimizer(), audit.linear_probe_model(3)
  step = _zero_gradient_step(model, opt)
  step()  # traced without the hook
  with pytest.raises(audit.CanariesNotTracedError, match="WITHOUT"):
    with audit.gradient_canaries(opt, model.trainable_variables, canaries=4):
      step()
  assert opt._audit_hook is None


def test_seeded_canary_sampling_is_stated_in_the_ledger():
  ledger = dpquant_tf.privacy.PrivacyLedger(sampling_method="poisson")
  opt = _optimizer(ledger=ledger)
  model = audit.linear_probe_model(3)
  with audit.gradient_canaries(opt, model.trainable_variables, canaries=4,
                               sampling_seed=3, ledger=ledger):
    pass
  assert ledger.seeded_sources() == ["canaries"]
  assert "audit canaries" in " ".join(ledger.statement(1e-5).split())


_REPLICA_CHECK = r"""
import dpquant_tf
from dpquant_tf import audit, distribute
distribute.configure_cpu_devices(2)
import tensorflow as tf
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
  opt = dpquant_tf.DPQuantOptimizer(l2_norm_clip=1.0, noise_multiplier=1.0,
                                    sampling_probability=0.5)
  model = audit.linear_probe_model(3)
try:  # Outside the scope: the caller's strategy has one replica.
  with audit.gradient_canaries(opt, model.trainable_variables, canaries=2):
    pass
  print("ACCEPTED")
except ValueError as e:
  print("REFUSED", e)
"""


@pytest.mark.slow  # a subprocess with 2 logical CPUs
def test_replica_check_uses_the_strategy_that_owns_the_variables():
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))
  out = subprocess.run([sys.executable, "-c", _REPLICA_CHECK], cwd=root,
                       capture_output=True, text=True, timeout=600,
                       check=True, env=dict(os.environ, PYTHONPATH=root))
  last = out.stdout.strip().splitlines()[-1]
  assert last.startswith("REFUSED") and "replicas=2" in last, last

"""DPQuantOptimizer: TF-Privacy equivalence, degenerate cases, events, API."""

import dp_accounting
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_privacy.privacy.optimizers import dp_optimizer_keras

from dpquant_tf import privacy
from dpquant_tf import training
from dpquant_tf.optimizers import DPQuantAdamOptimizer
from dpquant_tf.optimizers import DPQuantOptimizer
from dpquant_tf.optimizers import PerExampleMethod
from dpquant_tf.privacy import _mechanisms as M
from tests.optimizers._helpers import make_data as _data
from tests.optimizers._helpers import make_loss as _loss
from tests.optimizers._helpers import make_model as _model

HUGE_CLIP = 2.0**20  # C * (1 / C) == 1 exactly: clipping is a no-op.


def _grads(opt, model, x, y):
  with tf.GradientTape() as tape:
    loss = _loss()(y, model(x))
  if not hasattr(opt, "_bind"):  # TF-Privacy's optimizer
    return [g.numpy() for g, _ in opt._compute_gradients(
        loss, model.trainable_variables, tape=tape)]
  with opt._bind(model, x):
    return [g.numpy() for g, _ in opt._compute_gradients(
        loss, model.trainable_variables, tape=tape)]


def test_is_tf_privacy_subclass():
  assert issubclass(DPQuantOptimizer,
                    dp_optimizer_keras.GenericDPSGDOptimizer)
  assert issubclass(DPQuantAdamOptimizer,
                    dp_optimizer_keras.GenericDPAdamOptimizer)


@pytest.mark.parametrize("num_microbatches", [None, 4])
def test_quantization_off_equals_tf_privacy(num_microbatches):
  x, y = _data()
  model = _model()
  ours = DPQuantOptimizer(0.3, 0.0, num_microbatches,
                          per_example_method="jacobian")
  theirs = dp_optimizer_keras.DPKerasSGDOptimizer(
      l2_norm_clip=0.3, noise_multiplier=0.0,
      num_microbatches=num_microbatches)
  for a, b in zip(_grads(ours, model, x, y), _grads(theirs, model, x, y)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_auto_per_example_path_equals_jacobian():
  x, y = _data()
  model = _model()
  auto = _grads(DPQuantOptimizer(0.3, 0.0), model, x, y)
  jac = _grads(DPQuantOptimizer(0.3, 0.0, per_example_method=(
      PerExampleMethod.JACOBIAN)), model, x, y)
  for a, b in zip(auto, jac):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _one_fit_step(optimizer, loss):
  x, y = _data()
  model = _model()
  model.compile(optimizer=optimizer, loss=loss)
  if isinstance(optimizer, DPQuantOptimizer):
    training.install_dp_train_step(model)
  model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
  return [w.numpy() for w in model.trainable_variables]


def test_degenerate_equals_plain_keras_sgd_step():
  dp = _one_fit_step(DPQuantOptimizer(HUGE_CLIP, 0.0, learning_rate=0.1),
                     _loss())
  plain = _one_fit_step(tf.keras.optimizers.legacy.SGD(learning_rate=0.1),
                        _loss("sum_over_batch_size"))
  for a, b in zip(dp, plain):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_quantization_on_noise_zero_equals_quantize_only_step():
  x, y = _data()
  model = _model()
  opt = DPQuantOptimizer(4.0, 0.0, gradient_bits=3, seed=7,
                         sensitivity_mode="bound")
  got = _grads(opt, model, x, y)
  # Independent computation: jacobian, clip (no-op at this C), quantize with
  # a generator in the same state, sum, divide by the batch size.
  with tf.GradientTape() as tape:
    loss = _loss()(y, model(x))
  jac = tape.jacobian(loss, model.trainable_variables)
  gen = tf.random.Generator.from_seed(7)
  clipped = M.clip_per_example(jac, 4.0)
  quant = M.quantize_per_example(clipped, tf.constant([3, 3, 3, 3]), 4.0, gen)
  for g, q in zip(got, quant):
    np.testing.assert_allclose(g, tf.reduce_sum(q, 0).numpy() / 8,
                               rtol=1e-5, atol=1e-6)
  levels = M.levels_for_bits(3)
  for g in got:  # Each coordinate is a sum of 8 grid points, over 8.
    k = g * 8 / 4.0 * levels
    np.testing.assert_allclose(k, np.round(k), atol=1e-3)


def test_noise_twin_through_optimizer():
  x, y = _data()
  model = _model()
  clean = _grads(DPQuantOptimizer(0.5, 0.0), model, x, y)
  unit = _grads(DPQuantOptimizer(0.5, 1.0, seed=3), model, x, y)
  scaled = _grads(DPQuantOptimizer(0.5, 2.5, seed=3), model, x, y)
  for c, u, s in zip(clean, unit, scaled):
    np.testing.assert_allclose(s - c, 2.5 * (u - c), rtol=1e-4, atol=1e-6)


def test_noise_std_statistical_through_optimizer():
  x, y = _data()
  tf.keras.utils.set_random_seed(0)
  model = tf.keras.Sequential([  # ~650 parameters: ~650 noise draws a step.
      tf.keras.layers.Dense(64, activation="tanh", input_shape=(6,)),
      tf.keras.layers.Dense(3)])
  clip, sigma = 0.5, 1.3
  clean = _grads(DPQuantOptimizer(clip, 0.0), model, x, y)
  opt = DPQuantOptimizer(clip, sigma, seed=21)
  samples = []
  for _ in range(6):
    noisy = _grads(opt, model, x, y)
    samples.append(np.concatenate([(n - c).ravel() * 8
                                   for n, c in zip(noisy, clean)]))
  samples = np.concatenate(samples)
  n = samples.size
  def consistent(s):
    return abs(samples.std() / s - 1) < 5 / np.sqrt(2 * n)
  assert consistent(sigma * clip)
  assert not consistent(sigma * clip * 2 / 3)
  assert not consistent(sigma * clip * 3 / 2)


def test_events_constant_run_and_ledger_equals_dp_accounting():
  ledger = privacy.PrivacyLedger()
  opt = DPQuantOptimizer(1.0, 1.1, ledger=ledger, dataset_size=64,
                         learning_rate=0.1)
  x, y = _data(64)
  model = _model()
  model.compile(optimizer=opt, loss=_loss())
  training.install_dp_train_step(model).fit(x, y, batch_size=8, epochs=2, verbose=0)
  # fit's arrays are not the library's sampler: no amplification (q = 1).
  event = dp_accounting.PoissonSampledDpEvent(
      1.0, dp_accounting.GaussianDpEvent(1.1))
  assert opt.dp_events() == [(event, 16)]
  acc = dp_accounting.rdp.RdpAccountant()
  acc.compose(dp_accounting.SelfComposedDpEvent(event, 16))
  assert ledger.epsilon(1e-5) == pytest.approx(acc.get_epsilon(1e-5),
                                               rel=1e-9)


def test_event_table_overflow_raises_never_approximates():
  x, y = _data()
  model = _model()
  ledger = privacy.PrivacyLedger()
  opt = DPQuantOptimizer(1.0, 1.0, sampling_probability=0.1,
                         event_table_size=2, ledger=ledger)
  for z in (1.0, 2.0, 3.0):
    opt.set_noise_multiplier(z)
    _grads(opt, model, x, y)
  with pytest.raises(privacy.EventTableOverflowError):
    opt.dp_events()
  with pytest.raises(privacy.EventTableOverflowError):
    ledger.epsilon(1e-5)


def test_a_step_without_the_library_sampler_is_recorded_at_q_one():
  # Formerly "unknown q": the owned step never guesses q; a batch that is not
  # the library sampler's is accounted without amplification.
  x, y = _data()
  model = _model()
  opt = DPQuantOptimizer(1.0, 1.0, sampling_probability=0.01)
  _grads(opt, model, x, y)
  (event, count), = opt.dp_events()
  assert (event.sampling_probability, count) == (1.0, 1)


def test_microbatches_of_several_examples_halve_recorded_noise():
  x, y = _data()
  model = _model()
  opt = DPQuantOptimizer(1.0, 1.0, num_microbatches=2,
                         sampling_probability=0.1)
  _grads(opt, model, x, y)
  (event, count), = opt.dp_events()
  assert event.event.noise_multiplier == 0.5 and count == 1


def test_gradient_accumulation_records_every_call():
  x, y = _data(32)
  model = _model()
  opt = DPQuantOptimizer(1.0, 1.0, gradient_accumulation_steps=2,
                         dataset_size=32)
  model.compile(optimizer=opt, loss=_loss())
  training.install_dp_train_step(model).fit(x, y, batch_size=8, epochs=1, verbose=0)
  (event, count), = opt.dp_events()
  assert (event.sampling_probability, count) == (1.0, 4)


def test_errors_before_any_step():
  x, y = _data()
  with pytest.raises(ValueError, match="Expected l2_norm_clip=-1"):
    DPQuantOptimizer(-1.0, 1.0)
  with pytest.raises(ValueError, match="Expected noise_multiplier=-0.5"):
    DPQuantOptimizer(1.0, -0.5)
  with pytest.raises(ValueError, match=r"Expected gradient_bits=1 to be"):
    DPQuantOptimizer(1.0, 1.0, gradient_bits=1)
  with pytest.raises(ValueError, match="Expected gradient_bits\\['dense'\\]"):
    DPQuantOptimizer(1.0, 1.0, gradient_bits={"dense": 40})
  opt = DPQuantOptimizer(1.0, 1.0)
  with pytest.raises(ValueError, match="Expected bits=25"):
    opt.set_gradient_bits(25)
  model = _model()
  model.compile(optimizer=DPQuantOptimizer(1.0, 1.0),
                loss=_loss("sum_over_batch_size"))
  with pytest.raises(ValueError, match="Reduction.NONE"):
    training.install_dp_train_step(model).fit(x, y, batch_size=8, verbose=0)
  w0 = [w.numpy() for w in model.weights]
  model = _model()
  model.compile(optimizer=DPQuantOptimizer(1.0, 1.0, num_microbatches=3),
                loss=_loss())
  with pytest.raises(ValueError, match="a divisor of the batch size 8"):
    training.install_dp_train_step(model).fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(
        8, drop_remainder=True), verbose=0)
  assert len(w0) == 4


def test_batchnorm_model_rejected():
  x, y = _data()
  tf.keras.utils.set_random_seed(0)
  model = tf.keras.Sequential([
      tf.keras.layers.Dense(4, input_shape=(6,)),
      tf.keras.layers.BatchNormalization(), tf.keras.layers.Dense(3)])
  opt = DPQuantOptimizer(1.0, 1.0, dataset_size=8)
  with pytest.raises(ValueError, match="BatchNormalization"):
    DPQuantOptimizer.check_model(model)
  model.compile(optimizer=opt, loss=_loss())
  before = [w.numpy() for w in model.weights]
  with pytest.raises(ValueError, match="BatchNormalization"):
    training.install_dp_train_step(model).fit(x, y, batch_size=8, verbose=0)
  for a, b in zip(before, model.weights):
    np.testing.assert_array_equal(a, b.numpy())


def test_update_bits_quantize_the_noised_update():
  x, y = _data()
  model = _model()
  opt = DPQuantOptimizer(1.0, 0.7, update_bits=3, seed=0,
                         sampling_probability=0.1)
  for g in _grads(opt, model, x, y):
    scale = np.abs(g).max()
    k = g / scale * 3
    np.testing.assert_allclose(k, np.round(k), atol=1e-5)
  assert opt.dp_events()[0][0].event.noise_multiplier == 0.7


def test_custom_training_loop_minimize_in_tf_function():
  x, y = _data(16)
  model = _model()
  opt = DPQuantOptimizer(1.0, 0.5, dataset_size=16, learning_rate=0.1)
  model(x)

  @tf.function
  def step(xb, yb):
    with tf.GradientTape() as tape:
      loss = _loss()(yb, model(xb, training=True))
    opt.dp_step(model, xb, loss, tape)

  before = [w.numpy() for w in model.trainable_variables]
  step(x[:8], y[:8])
  step(x[8:], y[8:])
  assert opt.dp_event_steps() == 2
  assert not np.allclose(before[0], model.trainable_variables[0].numpy())


def test_auto_path_on_quantized_conv_model_equals_jacobian():
  import dataclasses  # pylint: disable=g-import-not-at-top
  from dpquant_tf import quantization  # pylint: disable=g-import-not-at-top
  tf.keras.utils.set_random_seed(0)
  model = quantization.quantize_model(tf.keras.Sequential([
      tf.keras.layers.Conv2D(4, 3, activation="relu", input_shape=(8, 8, 1)),
      tf.keras.layers.Flatten(), tf.keras.layers.Dense(10)]))
  plan = quantization.get_plan(model)
  quantization.set_plan(model, {k: dataclasses.replace(v, enabled=False)
                                for k, v in plan.layers.items()})
  rng = np.random.default_rng(0)
  x = rng.random((8, 8, 8, 1)).astype("float32")
  y = rng.integers(0, 10, 8)

  def grads(method):
    opt = DPQuantOptimizer(0.5, 0.0, per_example_method=method)
    with tf.GradientTape() as tape:
      loss = tf.keras.losses.SparseCategoricalCrossentropy(
          from_logits=True, reduction="none")(y, model(x, training=True))
    with opt._bind(model, x):
      return [g.numpy() for g, _ in opt._compute_gradients(
          loss, model.trainable_variables, tape=tape)]

  for a, b in zip(grads("auto"), grads("jacobian")):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

"""Fast path inside training: quantized layers, DPQuantOptimizer, TF-Privacy parity."""

import numpy as np
import pytest

import dpquant_tf  # noqa: F401  (Keras 2 first)
import tensorflow as tf

from dpquant_tf import optimizers
from dpquant_tf import perexample as pe
from dpquant_tf import quantization as q
from tensorflow_privacy.privacy.optimizers import dp_optimizer_keras

L = tf.keras.layers
B = 8
_LOSS = tf.keras.losses.SparseCategoricalCrossentropy(
    from_logits=True, reduction=tf.keras.losses.Reduction.NONE)


def _cnn():
  """A tiny CNN with every quantizable kind plus a GroupNorm."""
  inp = tf.keras.Input((8, 8, 2))
  x = L.Conv2D(4, 3, strides=2, padding="same", activation="relu",
               name="conv")(inp)
  x = L.GroupNormalization(2, name="gn")(x)
  x = L.DepthwiseConv2D(3, padding="same", name="dw")(x)
  x = L.Flatten()(x)
  x = L.Dense(6, activation="tanh", name="dense")(x)
  out = L.Dense(3, name="logits")(x)
  return tf.keras.Model(inp, out)


def _data(seed=0):
  rng = np.random.default_rng(seed)
  return (tf.constant(rng.normal(size=(B, 8, 8, 2)).astype(np.float32)),
          tf.constant(rng.integers(0, 3, size=B).astype(np.int32)))


def _grads(model, x, y, m, jit=False):
  @tf.function(jit_compile=jit)
  def f():
    with tf.GradientTape(persistent=True) as tape:
      loss = _LOSS(y, model(x, training=True))
    variables = model.trainable_variables
    return (pe.per_example_gradients(loss, variables, tape, m),
            pe.jacobian_gradients(loss, variables, tape, m))
  return f()


def _close(fast, slow, tol=2e-5):
  for a, b in zip(fast, slow):
    scale = max(float(tf.reduce_max(tf.abs(b))), 1e-6)
    np.testing.assert_allclose(a.numpy() / scale, b.numpy() / scale, atol=tol)


def _quantized(fwd_bits=4, bwd_bits=4, rounding=q.Rounding.NEAREST):
  tf.keras.utils.set_random_seed(1)
  config = q.LayerQuantConfig(fwd_bits=fwd_bits, bwd_bits=bwd_bits)
  return pe.tap_model(q.quantize_model(_cnn(), config=config,
                                       rounding=rounding, seed=3))


def _fast(model, x, y, m, jit=False):
  @tf.function(jit_compile=jit)
  def f():
    with tf.GradientTape() as tape:
      loss = _LOSS(y, model(x, training=True))
    return pe.per_example_gradients(loss, model.trainable_variables, tape, m)
  return f()


def _loop_reference(model, x, y, m):
  """One ordinary backward pass per microbatch (mean loss): the definition
  of the per-microbatch gradient. (Tracing the pfor jacobian through the
  quantizers' format switch takes minutes, so quantized models are checked
  against this loop; both are exact.)"""
  k = B // m
  out = []
  for j in range(m):
    with tf.GradientTape() as tape:
      loss = tf.reduce_mean(_LOSS(y[j * k:(j + 1) * k],
                                  model(x[j * k:(j + 1) * k], training=True)))
    out.append(tape.gradient(loss, model.trainable_variables))
  return [tf.stack(g) for g in zip(*out)]


@pytest.mark.parametrize("m", [pytest.param(B, marks=pytest.mark.slow), B // 4])
def test_quantized_nearest_matches_per_microbatch_backward(m):
  model = _quantized()
  assert len(q.quantized_layers(model)) == 4
  x, y = _data()
  _close(_fast(model, x, y, m), _loop_reference(model, x, y, m))


def test_quantization_changes_the_gradients():
  """Power: the quantized per-example gradients differ from unquantized ones."""
  model = _quantized()
  x, y = _data()
  fast_q = _fast(model, x, y, B)
  q.set_plan(model, q.QuantPlan.select(
      [i.name for i in q.quantizable_layers(model)], []))
  fast_off = _fast(model, x, y, B)
  _close(fast_off, _loop_reference(model, x, y, B))
  diff = max(float(tf.reduce_max(tf.abs(a - b)))
             for a, b in zip(fast_q, fast_off))
  assert diff > 1e-3


@pytest.mark.slow
def test_quantized_stochastic_forward_matches_jacobian_xla():
  # Forward stochastic rounding runs once, in the forward pass both paths
  # share; backward off so that both paths see the same rounding.
  model = _quantized(bwd_bits=0, rounding=q.Rounding.STOCHASTIC)
  x, y = _data(1)
  _close(*_grads(model, x, y, B // 2, jit=True))


@pytest.mark.slow
def test_quantized_fast_path_runs_under_xla():
  # XLA fuses float ops differently, which can move 4-bit rounding decisions,
  # so XLA and graph results are not compared here (the slow test above
  # compares fast and jacobian paths inside one XLA function).
  model = _quantized()
  x, y = _data(1)
  grads = _fast(model, x, y, B // 2, jit=True)
  for g, v in zip(grads, model.trainable_variables):
    assert g.shape == [B // 2] + v.shape.as_list()
    assert bool(tf.reduce_all(tf.math.is_finite(g)))


def _train_one_step(model, opt, x, y, jit=False):
  model.compile(optimizer=opt, loss=_LOSS, jit_compile=jit)
  if hasattr(opt, "dp_step"):  # DP: the owned train step
    dpquant_tf.install_dp_train_step(model)
  model.train_on_batch(x, y)
  return model.get_weights()


def _fresh(weights):
  model = pe.tap_model(_cnn())
  model.set_weights(weights)
  return model


@pytest.mark.parametrize("noise", [0.0, 1.3])
def test_dpquant_fast_equals_jacobian_step(noise):
  """Same clipped sums (noise 0) and, with one seed, the same noised update."""
  tf.keras.utils.set_random_seed(2)
  init = pe.tap_model(_cnn()).get_weights()
  x, y = _data(2)
  out = {}
  for method in ("auto", "jacobian"):
    opt = optimizers.DPQuantOptimizer(
        l2_norm_clip=0.05, noise_multiplier=noise, learning_rate=1.0, seed=11,
        per_example_method=method)
    out[method] = _train_one_step(_fresh(init), opt, x, y)
  moved = max(float(np.abs(a - b).max()) for a, b in zip(out["auto"], init))
  assert moved > 1e-3
  for a, b in zip(out["auto"], out["jacobian"]):
    np.testing.assert_allclose(a, b, atol=2e-6)


def test_dpquant_fast_path_matches_tf_privacy_clipped_sum():
  """Noise 0, active clipping, 2 examples per microbatch: TF-Privacy's
  DPKerasSGDOptimizer (jacobian) and DPQuantOptimizer (fast) agree."""
  tf.keras.utils.set_random_seed(3)
  base = _cnn()
  init = base.get_weights()
  x, y = _data(3)
  plain = _cnn()
  plain.set_weights(init)
  ref = _train_one_step(plain, dp_optimizer_keras.DPKerasSGDOptimizer(
      l2_norm_clip=0.05, noise_multiplier=0.0, num_microbatches=B // 2,
      learning_rate=1.0), x, y)
  fast = _train_one_step(_fresh(init), optimizers.DPQuantOptimizer(
      l2_norm_clip=0.05, noise_multiplier=0.0, num_microbatches=B // 2,
      learning_rate=1.0), x, y)
  for a, b in zip(fast, ref):
    np.testing.assert_allclose(a, b, atol=2e-6)


def test_fit_with_jit_compile_equals_eager_graph():
  tf.keras.utils.set_random_seed(4)
  init = pe.tap_model(_cnn()).get_weights()
  x, y = _data(4)
  results = []
  for jit in (False, True):
    opt = optimizers.DPQuantOptimizer(l2_norm_clip=0.05, noise_multiplier=0.0,
                                      learning_rate=1.0)
    results.append(_train_one_step(_fresh(init), opt, x, y, jit=jit))
  for a, b in zip(*results):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_tapped_model_computes_the_same_function_and_round_trips():
  tf.keras.utils.set_random_seed(5)
  base = _cnn()
  tapped = pe.tap_model(base)
  x, _ = _data(5)
  np.testing.assert_allclose(tapped(x).numpy(), base(x).numpy(), atol=1e-6)
  assert [l.name for l in tapped.layers if isinstance(l, pe.TappedLayer)] == [
      "tap_conv", "tap_gn", "tap_dw", "tap_dense", "tap_logits"]
  clone = tf.keras.Model.from_config(tapped.get_config())
  clone.set_weights(tapped.get_weights())
  np.testing.assert_allclose(clone(x).numpy(), base(x).numpy(), atol=1e-6)
  assert isinstance(clone.get_layer("tap_dense"), pe.TappedLayer)


def test_tap_model_and_tapped_layer_validate():
  with pytest.raises(TypeError, match="Expected layer="):
    pe.TappedLayer(L.MaxPool2D())
  with pytest.raises(TypeError, match="Expected model="):
    pe.tap_model("not a model")

  class Sub(tf.keras.Model):
    def call(self, x):
      return x

  with pytest.raises(ValueError, match="Sequential or Functional"):
    pe.tap_model(Sub())

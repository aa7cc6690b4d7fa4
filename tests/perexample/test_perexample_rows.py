"""One example is one row (docs/METHOD.md invariant 8): folded batches and
out-of-range Embedding ids never let one example add more than C."""

import numpy as np
import pytest

import dpquant_tf
import tensorflow as tf

from dpquant_tf import perexample as pe

L = tf.keras.layers
B, T, C = 6, 4, 0.01
_LOSS = tf.keras.losses.SparseCategoricalCrossentropy(
    from_logits=True, reduction=tf.keras.losses.Reduction.NONE)


def _time_distributed_model():
  tf.keras.utils.set_random_seed(0)
  inp = tf.keras.Input((T, 3))
  h = L.TimeDistributed(pe.TappedLayer(L.Dense(5, activation="tanh")))(inp)
  return tf.keras.Model(inp, L.GlobalAveragePooling1D()(h))


def _seq_data():
  rng = np.random.default_rng(0)
  return (rng.normal(size=(B, T, 3)).astype(np.float32),
          rng.integers(0, 5, size=B).astype(np.int32))


def _exact_per_example(model, x, y):
  """One ordinary backward pass per example: the definition."""
  out = []
  for i in range(len(x)):
    with tf.GradientTape() as tape:
      loss = _LOSS(y[i:i + 1], model(x[i:i + 1], training=True))
    out.append(tape.gradient(loss, model.trainable_variables))
  return [np.stack([g[v].numpy() for g in out]) for v in range(len(out[0]))]


@pytest.mark.parametrize("jit, static", [
    pytest.param(False, True, marks=pytest.mark.slow), (True, False),
                                         (True, True)])
def test_time_distributed_clips_per_example_or_takes_the_jacobian(jit, static):
  model = _time_distributed_model()
  x, y = _seq_data()
  batch = B if static else None
  spec = [tf.TensorSpec([batch, T, 3]), tf.TensorSpec([batch], tf.int32)]

  @tf.function(input_signature=spec, jit_compile=jit)
  def step(x, y):
    with tf.GradientTape() as tape:
      loss = _LOSS(y, model(x, training=True))
    taps = pe.collect(loss, model.trainable_variables, tape)
    return taps.clipped_sum(C), taps.per_example_gradients()

  (sums, norms), materialized = step(x, y)
  exact = _exact_per_example(model, x, y)
  for m, e in zip(materialized, exact):   # the path used with quantization
    np.testing.assert_allclose(m.numpy(), e, rtol=1e-4, atol=1e-7)
  exact_norms = np.sqrt(sum(np.sum(e.reshape(B, -1) ** 2, 1) for e in exact))
  assert norms.shape == (B,)   # one norm per example, not per time step
  np.testing.assert_allclose(norms.numpy(), exact_norms, rtol=1e-5)
  scale = C * np.minimum(1 / exact_norms, 1 / C)
  for s, e in zip(sums, exact):
    np.testing.assert_allclose(s.numpy(), np.tensordot(scale, e, 1),
                               rtol=1e-4, atol=1e-9)


def test_time_distributed_with_dynamic_rows_is_refused_without_jit():
  model = _time_distributed_model()
  x, y = _seq_data()
  spec = [tf.TensorSpec([None, T, 3]), tf.TensorSpec([None], tf.int32)]

  @tf.function(input_signature=spec)
  def step(x, y):
    with tf.GradientTape() as tape:
      loss = _LOSS(y, model(x, training=True))
    return pe.collect(loss, model.trainable_variables, tape).clipped_sum(C)

  with pytest.raises(tf.errors.InvalidArgumentError, match="sees a batch whose rows"):
    step(x, y)


def test_time_distributed_fit_is_refused_or_matches_the_jacobian_path():
  x, y = _seq_data()
  model = _time_distributed_model()
  before = [w.copy() for w in model.get_weights()]
  deltas = []
  for method in (dpquant_tf.PerExampleMethod.AUTO,
                 dpquant_tf.PerExampleMethod.JACOBIAN):
    model.set_weights(before)
    opt = dpquant_tf.DPQuantOptimizer(
        l2_norm_clip=C, noise_multiplier=0.0, per_example_method=method,
        learning_rate=1.0, sampling_probability=0.5)
    model.compile(optimizer=opt, loss=_LOSS, jit_compile=True)
    dpquant_tf.install_dp_train_step(model)
    try:
      model.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0)
    except ValueError as e:   # refused by the model check, before any step
      assert "TimeDistributed" in str(e)
      for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)
      return
    deltas.append([a - b for a, b in zip(model.get_weights(), before)])
  for fast, exact in zip(*deltas):
    np.testing.assert_allclose(fast, exact, rtol=1e-4, atol=1e-9)


VOCAB = 5


def _embedding_model():
  tf.keras.utils.set_random_seed(1)
  inp = tf.keras.Input((T,), dtype=tf.int32)
  h = L.Embedding(VOCAB, 3)(inp)
  h = L.Flatten()(h)
  return pe.tap_model(tf.keras.Model(inp, L.Dense(4)(h)))


def test_out_of_range_embedding_ids_add_at_most_c_under_jit():
  model = _embedding_model()
  rng = np.random.default_rng(2)
  x = rng.integers(0, VOCAB, size=(B, T)).astype(np.int32)
  y = rng.integers(0, 4, size=B).astype(np.int32)
  # Example 0's ids point into the slots of examples 1..4 (id + j * VOCAB).
  x[0] = [VOCAB * j + 1 for j in range(1, T + 1)]

  @tf.function(jit_compile=True)
  def clipped_sum(x, y):
    with tf.GradientTape() as tape:
      loss = _LOSS(y, model(x, training=True))
    return pe.collect(loss, model.trainable_variables, tape).clipped_sum(C)[0]

  with_bad = clipped_sum(tf.constant(x), tf.constant(y))
  without = clipped_sum(tf.constant(x[1:]), tf.constant(y[1:]))
  diff = np.sqrt(sum(np.sum((a.numpy() - b.numpy()) ** 2)
                     for a, b in zip(with_bad, without)))
  assert diff <= C * (1 + 1e-5), diff / C

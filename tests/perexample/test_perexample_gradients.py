"""Fast per-example gradients equal the jacobian path's, layer by layer."""

import logging

import numpy as np
import pytest

import dpquant_tf  # noqa: F401  (Keras 2 first)
import tensorflow as tf

from dpquant_tf import perexample as pe

L = tf.keras.layers
B = 4


def _model(layer_fn, input_shape, int_input=False):
  inp = tf.keras.Input(input_shape, dtype="int32" if int_input else "float32")
  x = layer_fn()(inp)
  x = L.Flatten()(x)
  out = L.Dense(3, name="head")(x)
  return tf.keras.Model(inp, out)


def _data(input_shape, int_input=False, vocab=7, seed=0):
  rng = np.random.default_rng(seed)
  if int_input:
    x = rng.integers(0, vocab, size=(B,) + tuple(input_shape)).astype(np.int32)
  else:
    x = rng.normal(size=(B,) + tuple(input_shape)).astype(np.float32)
  y = rng.integers(0, 3, size=(B,)).astype(np.int32)
  return tf.constant(x), tf.constant(y)


_LOSS = tf.keras.losses.SparseCategoricalCrossentropy(
    from_logits=True, reduction=tf.keras.losses.Reduction.NONE)


def _both(model, x, y, m, jit=False, chunk_size=None, jacobian=True):
  """(fast, jacobian) per-microbatch gradients in one traced function
  (jacobian None when `jacobian` is False)."""
  @tf.function(jit_compile=jit)
  def f():
    with tf.GradientTape(persistent=True) as tape:
      loss = _LOSS(y, model(x, training=True))
    fast = pe.per_example_gradients(loss, model.trainable_variables, tape, m,
                                    chunk_size=chunk_size)
    if not jacobian:
      return fast, None
    slow = pe.jacobian_gradients(loss, model.trainable_variables, tape, m)
    return fast, slow
  return f()


def _assert_close(fast, slow, tol=2e-5):
  assert len(fast) == len(slow)
  for a, b in zip(fast, slow):
    assert a.shape == b.shape
    scale = max(float(tf.reduce_max(tf.abs(b))), 1e-6)
    np.testing.assert_allclose(a.numpy() / scale, b.numpy() / scale, atol=tol)


LAYERS = {
    "dense": (lambda: L.Dense(5, activation="tanh"), (6,)),
    "dense_3d": (lambda: L.Dense(5, activation="relu"), (3, 6)),
    "dense_nobias": (lambda: L.Dense(5, use_bias=False), (6,)),
    "conv2d_same_s2": (lambda: L.Conv2D(4, 3, strides=2, padding="same",
                                        activation="relu"), (7, 7, 3)),
    "conv2d_valid_dil": (lambda: L.Conv2D(3, 3, dilation_rate=2), (8, 8, 2)),
    "conv2d_rect_s": (lambda: L.Conv2D(3, (2, 3), strides=(1, 2),
                                       padding="same"), (6, 7, 2)),
    "conv2d_big_depth": (lambda: L.Conv2D(4, 3, padding="same"), (5, 5, 16)),
    # Stride 1 with patches deeper than 128: the shifted-window contraction.
    "conv2d_shifted_valid_dil": (lambda: L.Conv2D(3, 3, dilation_rate=2),
                                 (8, 7, 16)),
    "conv2d_shifted_same_even": (lambda: L.Conv2D(
        3, (2, 4), dilation_rate=(2, 1), padding="same"), (6, 7, 17)),
    "conv1d_shifted_causal": (lambda: L.Conv1D(4, 3, padding="causal",
                                               dilation_rate=2), (9, 48)),
    "conv1d_shifted_same": (lambda: L.Conv1D(4, 4, padding="same"), (9, 33)),
    "conv2d_1x1_s2": (lambda: L.Conv2D(4, 1, strides=2), (6, 6, 3)),
    "conv2d_groups": (lambda: L.Conv2D(4, 3, groups=2), (6, 6, 4)),
    "conv1d_same": (lambda: L.Conv1D(4, 3, strides=2, padding="same"), (9, 3)),
    "conv1d_causal_dil": (lambda: L.Conv1D(4, 3, padding="causal",
                                           dilation_rate=2), (9, 3)),
    "depthwise": (lambda: L.DepthwiseConv2D(3, depth_multiplier=2,
                                            padding="same"), (6, 6, 3)),
    "depthwise_s2_valid": (lambda: L.DepthwiseConv2D(3, strides=2), (7, 7, 2)),
    "einsum_2d": (lambda: L.EinsumDense("ab,bc->ac", output_shape=4,
                                        bias_axes="c"), (6,)),
    "einsum_seq": (lambda: L.EinsumDense("abc,cd->abd", output_shape=(3, 4),
                                         bias_axes="d"), (3, 5)),
    "einsum_heads": (lambda: L.EinsumDense("abc,cde->abde",
                                           output_shape=(3, 2, 4),
                                           bias_axes="de"), (3, 5)),
    "einsum_ellipsis": (lambda: L.EinsumDense("...b,bc->...c", output_shape=4,
                                              bias_axes="c"), (3, 5)),
    "layer_norm": (lambda: L.LayerNormalization(), (3, 5)),
    "layer_norm_2axes": (lambda: L.LayerNormalization(axis=[1, 2]), (3, 5)),
    "group_norm": (lambda: L.GroupNormalization(2), (4, 4, 6)),
}


def _loop_reference(model, x, y, m):
  """Per-microbatch gradients by one plain backward pass per microbatch."""
  k = B // m
  out = []
  for j in range(m):
    with tf.GradientTape() as tape:
      loss = tf.reduce_mean(_LOSS(y[j * k:(j + 1) * k],
                                  model(x[j * k:(j + 1) * k], training=True)))
    out.append(tape.gradient(loss, model.trainable_variables))
  return [tf.stack(g) for g in zip(*out)]


# TF's pfor jacobian is wrong for grouped convolutions on CPU (they run as an
# XLA-compiled function there; measured: errors of order 1 on TF 2.21), so
# grouped convs are checked against one backward pass per microbatch.
_JACOBIAN_BROKEN = {"conv2d_groups"}


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("m", [pytest.param(B, marks=pytest.mark.slow), B // 2])
def test_layer_matches_jacobian(name, m):
  layer_fn, shape = LAYERS[name]
  tf.keras.utils.set_random_seed(1)
  model = pe.tap_model(_model(layer_fn, shape))
  x, y = _data(shape)
  # TF 2.21's pfor jacobian of a grouped conv is wrong on some CPUs and
  # fails outright (Conv2DBackpropFilter filter_size) on others: the
  # reference there is one backward pass per microbatch.
  broken = name in _JACOBIAN_BROKEN
  fast, slow = _both(model, x, y, m, jacobian=not broken)
  if broken:
    slow = _loop_reference(model, x, y, m)
  _assert_close(fast, slow)


def test_embedding_matches_jacobian():
  tf.keras.utils.set_random_seed(2)
  model = pe.tap_model(_model(lambda: L.Embedding(7, 3), (5,), int_input=True))
  x, y = _data((5,), int_input=True)
  for m in (B, 2):
    _assert_close(*_both(model, x, y, m))


@pytest.mark.parametrize("name", [
    "conv2d_same_s2", "group_norm", "conv2d_shifted_same_even",
    pytest.param("depthwise", marks=pytest.mark.slow),
    pytest.param("einsum_seq", marks=pytest.mark.slow)])
def test_xla_matches_jacobian(name):
  layer_fn, shape = LAYERS[name]
  tf.keras.utils.set_random_seed(3)
  model = pe.tap_model(_model(layer_fn, shape))
  x, y = _data(shape)
  _assert_close(*_both(model, x, y, B // 2, jit=True))


@pytest.mark.parametrize("name,patches", [
    ("conv2d_shifted_valid_dil", False), ("conv2d_shifted_same_even", False),
    ("conv1d_shifted_causal", False), ("conv2d_same_s2", True),
    ("conv2d_big_depth", False)])
def test_which_conv_contraction_runs(name, patches):
  """Stride 1 with patches deeper than 128 builds no patches op (the
  shifted-window contraction, checked against the jacobian above); strided
  convolutions keep the patches."""
  layer_fn, shape = LAYERS[name]
  model = pe.tap_model(_model(layer_fn, shape))
  x, y = _data(shape)

  @tf.function
  def f():
    with tf.GradientTape() as tape:
      loss = _LOSS(y, model(x, training=True))
    return pe.per_example_gradients(loss, model.trainable_variables, tape, 2)
  graph = f.get_concrete_function().graph
  ops = {op.type for op in graph.get_operations()}
  # The one-hot patch convolution is a Conv2D whose filter is an identity.
  eye = [op for op in graph.get_operations() if op.type == "Conv2D"
         and len(op.inputs[1].shape) == 4
         and op.inputs[1].shape[2] != op.inputs[1].shape[3]
         and op.inputs[1].shape[3] == np.prod(op.inputs[1].shape[:3])]
  assert (("ExtractImagePatches" in ops) or bool(eye)) == patches, sorted(ops)


def test_the_fast_path_really_differs_from_a_wrong_rule():
  """Power check: summing over the whole batch (no per-example split) is
  detected by the comparison used above."""
  tf.keras.utils.set_random_seed(4)
  shape = LAYERS["conv2d_same_s2"][1]
  model = pe.tap_model(_model(LAYERS["conv2d_same_s2"][0], shape))
  x, y = _data(shape)
  fast, slow = _both(model, x, y, B)
  wrong = [tf.broadcast_to(tf.reduce_mean(f, 0, keepdims=True), f.shape)
           for f in fast]
  with pytest.raises(AssertionError):
    _assert_close(wrong, slow)


def test_chunked_equals_unchunked():
  layer_fn, shape = LAYERS["conv2d_same_s2"]
  tf.keras.utils.set_random_seed(5)
  model = pe.tap_model(_model(layer_fn, shape))
  x, y = _data(shape)
  whole, slow = _both(model, x, y, B)
  chunked, _ = _both(model, x, y, B, chunk_size=2)
  _assert_close(chunked, whole, tol=1e-6)
  _assert_close(chunked, slow)
  with pytest.raises(ValueError, match="chunk_size"):
    _both(model, x, y, 2, chunk_size=3)


class _Scale(L.Layer):
  """A layer with no per-example rule (forces the jacobian fallback)."""

  def build(self, input_shape):
    self.w = self.add_weight("w", shape=input_shape[-1:], initializer="ones")

  def call(self, x):
    return x * self.w


def _mixed_model():
  inp = tf.keras.Input((6,))
  x = L.Dense(5, activation="tanh", name="d1")(inp)
  x = _Scale(name="custom_scale")(x)
  out = L.Dense(3, name="head")(x)
  return pe.tap_model(tf.keras.Model(inp, out))


def test_fallback_for_untapped_variables_only(caplog):
  tf.keras.utils.set_random_seed(6)
  model = _mixed_model()
  x, y = _data((6,))
  calls = []

  def fallback(loss, var_list, tape, m):
    calls.append([v.name for v in var_list])
    return pe.jacobian_gradients(loss, var_list, tape, m)

  @tf.function
  def f():
    with tf.GradientTape(persistent=True) as tape:
      loss = _LOSS(y, model(x, training=True))
    fast = pe.per_example_gradients(loss, model.trainable_variables, tape, 2,
                                    fallback)
    return fast, pe.jacobian_gradients(loss, model.trainable_variables, tape, 2)

  with caplog.at_level(logging.WARNING):
    fast, slow = f()
  _assert_close(fast, slow)
  assert calls == [["custom_scale/w:0"]]
  lines = [r.getMessage() for r in caplog.records if "fallback" in r.getMessage()]
  assert len(lines) == 1 and "custom_scale" in lines[0]


def test_non_persistent_tape_with_fallback_takes_the_jacobian_for_all(caplog):
  tf.keras.utils.set_random_seed(7)
  model = _mixed_model()
  x, y = _data((6,))

  @tf.function
  def f():
    with tf.GradientTape() as tape:
      loss = _LOSS(y, model(x, training=True))
    return pe.per_example_gradients(loss, model.trainable_variables, tape, B)

  @tf.function
  def ref():
    with tf.GradientTape() as tape:
      loss = _LOSS(y, model(x, training=True))
    return pe.jacobian_gradients(loss, model.trainable_variables, tape, B)

  with caplog.at_level(logging.WARNING):
    fast = f()
  _assert_close(fast, ref())
  assert any("ALL variables" in r.getMessage() for r in caplog.records)


def test_shared_layer_called_twice_falls_back(caplog):
  tf.keras.utils.set_random_seed(8)
  shared = pe.TappedLayer(L.Dense(6, activation="tanh"))
  inp = tf.keras.Input((6,))
  out = L.Dense(3)(shared(shared(inp)))
  model = tf.keras.Model(inp, out)
  x, y = _data((6,))
  with caplog.at_level(logging.WARNING):
    fast, slow = _both(model, x, y, B)
  _assert_close(fast, slow)
  assert any("called 2 times" in r.getMessage() for r in caplog.records)


def test_unconnected_tapped_layer_gives_zeros():
  tf.keras.utils.set_random_seed(9)
  inp = tf.keras.Input((6,))
  side = pe.TappedLayer(L.Dense(2, name="side"))
  _ = side(inp)  # built, not on the loss path of `model`
  out = pe.TappedLayer(L.Dense(3))(inp)
  model = tf.keras.Model(inp, out)
  x, y = _data((6,))
  variables = model.trainable_variables + side.trainable_variables

  @tf.function
  def f():
    with tf.GradientTape(persistent=True) as tape:
      loss = _LOSS(y, model(x, training=True))
    return pe.per_example_gradients(loss, variables, tape, B)

  grads = f()
  assert float(tf.reduce_max(tf.abs(grads[-1]))) == 0.0


def _reference_clipped_sum(grads, clip):
  sq = tf.add_n([tf.reduce_sum(tf.reshape(g, [tf.shape(g)[0], -1]) ** 2, 1)
                 for g in grads])
  norm = tf.sqrt(sq)
  scale = clip * tf.minimum(1.0 / norm, 1.0 / clip)
  return [tf.tensordot(scale, g, 1) for g in grads], norm


def _clip_model(kind):
  inp = tf.keras.Input((6, 6, 2))
  if kind == "conv2d":   # ghost conv (T=4 < K*O), materialized conv, GN
    h = L.Conv2D(3, 3, strides=2, activation="relu")(inp)
    h = L.GroupNormalization(3)(h)
    h = L.Conv2D(2, 1)(h)          # T^2=16 >= K*O=6: materialized
  else:                  # Conv1D and Dense over a sequence (T=6)
    h = L.Reshape((6, 12))(inp)
    h = L.Conv1D(4, 3, padding="causal", activation="relu")(h)
    h = L.Dense(7, activation="relu")(h)
  h = L.Flatten()(h)
  h = L.Dense(5, activation="tanh")(h)
  h = _Scale()(h)   # untapped: jacobian fallback (persistent tape)
  out = L.Dense(3)(h)
  return pe.tap_model(tf.keras.Model(inp, out))


@pytest.mark.parametrize("m", [None, pytest.param(B, marks=pytest.mark.slow), B // 2])
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("kind", ["conv2d", "sequence"])
def test_clipped_sum_equals_clipping_materialized_gradients(m, dynamic, kind):
  tf.keras.utils.set_random_seed(10)
  model = _clip_model(kind)
  x, y = _data((6, 6, 2))
  variables = model.trainable_variables
  spec = [tf.TensorSpec([None if dynamic else B, 6, 6, 2]),
          tf.TensorSpec([None if dynamic else B], tf.int32)]

  @tf.function(input_signature=spec)
  def f(x, y):
    with tf.GradientTape(persistent=True) as tape:
      loss = _LOSS(y, model(x, training=True))
    mm = m
    if dynamic and m is not None:
      mm = tf.shape(loss)[0] // (B // m)
    taps = pe.collect(loss, variables, tape, mm)
    clip = tf.constant(0.3)
    return taps.clipped_sum(clip), _reference_clipped_sum(
        taps.per_example_gradients(), clip)

  (sums, norms), (ref_sums, ref_norms) = f(x, y)
  np.testing.assert_allclose(norms.numpy(), ref_norms.numpy(), rtol=1e-5)
  assert float(tf.reduce_min(ref_norms)) > 0.3   # clipping is active
  for a, b in zip(sums, ref_sums):
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6, rtol=1e-5)
  total = tf.sqrt(tf.add_n([tf.reduce_sum(s ** 2) for s in sums]))
  assert float(total) <= 0.3 * (m or B) * (1 + 1e-5)


@pytest.mark.parametrize("cin,k,stride,one_hot", [
    (16, 3, 2, True), (16, 4, 2, True), (32, 3, 2, False)])
def test_bf16_patches_are_exact_copies(cin, k, stride, one_hot):
  """bf16 patches up to depth 256 come from the one-hot convolution (128
  in float32), bit for bit what extract_patches copies, huge, tiny and
  negative values included."""
  from dpquant_tf.perexample import _rules
  rng = np.random.default_rng(cin + k)
  x = rng.normal(size=(3, 9, 9, cin)) * 2.0 ** rng.integers(-100, 100, (3, 9, 9, cin))
  x = tf.cast(tf.constant(x, tf.float32), tf.bfloat16)
  args = ((k, k), (stride, stride), (1, 1), "VALID")
  f = tf.function(lambda x: _rules._patches(x, *args))  # pylint: disable=protected-access
  ops = {op.type for op in f.get_concrete_function(x).graph.get_operations()}
  assert ("ExtractImagePatches" not in ops) == one_hot, sorted(ops)
  want = tf.image.extract_patches(x, [1, k, k, 1], [1, stride, stride, 1],
                                  [1, 1, 1, 1], "VALID")
  np.testing.assert_array_equal(tf.bitcast(f(x), tf.int16),
                                tf.bitcast(want, tf.int16))
  xf = tf.cast(x, tf.float32)   # float32 above depth 128: extract_patches
  ops32 = {op.type for op in tf.function(lambda x: _rules._patches(x, *args))  # pylint: disable=protected-access
           .get_concrete_function(xf).graph.get_operations()}
  assert ("ExtractImagePatches" in ops32) == (k * k * cin > 128)

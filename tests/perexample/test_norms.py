"""Fused GroupNormalization (perexample._norms) computes what Keras' layer does.

The tapped layer's forward, its gradients (input, gamma, beta) and the
per-example rule are compared with Keras' own, untapped ``GroupNormalization``
on the XLA path (static shapes), the plain-ops path (a dynamic batch) and
under an outer ``jit_compile``.
"""

import numpy as np
import pytest

import dpquant_tf  # noqa: F401  (Keras 2 first)
import tensorflow as tf

from dpquant_tf import perexample as pe
from dpquant_tf.perexample import _norms

L = tf.keras.layers
_LOSS = tf.keras.losses.SparseCategoricalCrossentropy(
    from_logits=True, reduction=tf.keras.losses.Reduction.NONE)


def _keras_gn(shape, groups, seed, **kwargs):
  layer = L.GroupNormalization(groups, **kwargs)
  layer.build((None,) + tuple(shape))
  rng = np.random.default_rng(seed)
  for v in layer.weights:   # non-trivial scale and offset
    v.assign(rng.normal(size=v.shape).astype(np.float32))
  return layer


def _one_by_one(plain, x, y):
  """Per-example gradients of ``plain``: one backward pass per example."""
  ref = []
  for i in range(x.shape[0]):
    with tf.GradientTape() as tape:
      loss = tf.reduce_mean(_LOSS(y[i:i + 1], plain(x[i:i + 1])))
    ref.append(tape.gradient(loss, plain.trainable_variables))
  return [tf.stack(g) for g in zip(*ref)]


def _close(a, b, tol=2e-5):
  scale = max(float(tf.reduce_max(tf.abs(b))), 1e-6)
  np.testing.assert_allclose(np.asarray(a) / scale, np.asarray(b) / scale,
                             atol=tol)


CASES = {
    "image": ((5, 6, 8), 4, {}),
    "sequence": ((7, 6), 3, {}),
    "no_scale": ((4, 4, 6), 2, {"scale": False}),
    "no_center": ((4, 4, 6), 2, {"center": False}),
    "one_group": ((3, 3, 4), 1, {}),
    "instance": ((3, 3, 4), 4, {"epsilon": 1e-2}),
}


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_and_gradients_match_keras(name, dynamic):
  shape, groups, kwargs = CASES[name]
  layer = _keras_gn(shape, groups, seed=1, **kwargs)
  rng = np.random.default_rng(2)
  x = tf.constant(3.0 * rng.normal(size=(6,) + shape) + 1.5, tf.float32)
  dy = tf.constant(rng.normal(size=(6,) + shape), tf.float32)
  gamma = layer.gamma if layer.scale else None
  beta = layer.beta if layer.center else None

  def both(x):
    with tf.GradientTape(persistent=True) as tape:
      tape.watch(x)
      ref = layer(x)
      fused = _norms.group_norm(x, gamma, beta, groups=groups,
                                epsilon=layer.epsilon)
    wrt = [x] + list(layer.trainable_weights)
    return (ref, fused, tape.gradient(ref, wrt, output_gradients=dy),
            tape.gradient(fused, wrt, output_gradients=dy))

  spec = tf.TensorSpec((None,) + shape, tf.float32) if dynamic else (
      tf.TensorSpec(x.shape, tf.float32))
  ref, fused, g_ref, g_fused = tf.function(both, input_signature=[spec])(x)
  assert fused.shape == ref.shape
  _close(fused, ref)
  assert len(g_fused) == len(g_ref) == 1 + len(layer.trainable_weights)
  for a, b in zip(g_fused, g_ref):
    assert a is not None and a.shape == b.shape
    _close(a, b)


@pytest.mark.parametrize("batch", [0, 1, 16, 17])
def test_dynamic_batches_at_bucket_edges(batch):
  """Padding to a multiple of 16 is exact at the edges (empty, full, one
  over); one trace serves every batch size."""
  layer = _keras_gn((3, 3, 4), 2, seed=5)
  dy = tf.random.stateless_normal((batch, 3, 3, 4), (1, 2))
  x = tf.random.stateless_normal((batch, 3, 3, 4), (3, 4)) * 2.0

  @tf.function(input_signature=[tf.TensorSpec((None, 3, 3, 4))] * 2)
  def both(x, dy):
    with tf.GradientTape(persistent=True) as tape:
      tape.watch(x)
      ref = layer(x)
      fused = _norms.group_norm(x, layer.gamma, layer.beta, groups=2,
                                epsilon=layer.epsilon)
    wrt = [x, layer.gamma, layer.beta]
    sums = _norms.group_norm_param_sums(x, dy, groups=2, epsilon=layer.epsilon)
    return (ref, fused, tape.gradient(ref, wrt, output_gradients=dy),
            tape.gradient(fused, wrt, output_gradients=dy), sums)

  ref, fused, g_ref, g_fused, (gg, gb) = both(x, dy)
  assert fused.shape == ref.shape == (batch, 3, 3, 4)
  assert gg.shape == gb.shape == (batch, 4)
  if batch:
    _close(fused, ref)
    for a, b in zip(g_fused, g_ref):
      _close(a, b)
    _close(tf.reduce_sum(gg, 0), g_ref[1])
    _close(tf.reduce_sum(gb, 0), g_ref[2])


def test_a_wrong_statistic_is_detected():
  """Power check: the comparison above sees a variance off by one count."""
  shape, groups, _ = CASES["image"]
  layer = _keras_gn(shape, groups, seed=1)
  x = tf.random.stateless_normal((6,) + shape, (3, 4)) * 3.0
  wrong = _norms.group_norm(x, layer.gamma, layer.beta, groups=groups,
                            epsilon=layer.epsilon) * (1.0 + 1.0 / 240)
  with pytest.raises(AssertionError):
    _close(wrong, layer(x), tol=1e-4)


def _model():
  inp = tf.keras.Input((6, 6, 2))
  h = L.Conv2D(6, 3, padding="same", name="conv")(inp)
  h = L.GroupNormalization(3, name="gn")(h)
  h = L.ReLU()(h)
  h = L.Flatten()(h)
  return tf.keras.Model(inp, L.Dense(3, name="head")(h))


@pytest.mark.parametrize("jit,dynamic", [(False, False), (True, False),
                                         (False, True)])
def test_per_example_gradients_match_the_untapped_model(jit, dynamic):
  """Per-example gradients of the tapped model (fused forward, backward and
  rule) equal one backward pass per example through Keras' own layers; with
  a dynamic batch the fused programs see it padded to 16 examples."""
  tf.keras.utils.set_random_seed(3)
  plain = _model()
  for v in plain.get_layer("gn").weights:
    v.assign(tf.random.normal(v.shape))
  tapped = pe.tap_model(plain)
  rng = np.random.default_rng(4)
  x = tf.constant(rng.normal(size=(4, 6, 6, 2)), tf.float32)
  y = tf.constant(rng.integers(0, 3, size=4), tf.int32)

  spec = [tf.TensorSpec((None if dynamic else 4, 6, 6, 2), tf.float32),
          tf.TensorSpec((None if dynamic else 4,), tf.int32)]

  @tf.function(jit_compile=jit, input_signature=spec)
  def fast(x, y):
    with tf.GradientTape() as tape:
      loss = _LOSS(y, tapped(x, training=True))
    return pe.per_example_gradients(loss, tapped.trainable_variables, tape,
                                    tf.shape(x)[0] if dynamic else 4)

  ref = _one_by_one(plain, x, y)
  got = fast(x, y)
  names = [v.name for v in tapped.trainable_variables]
  assert any("gn" in n and "gamma" in n for n in names), names
  for a, b in zip(got, ref):
    _close(a, b)


def test_only_channels_last_float32_without_a_mask_is_fused():
  x4 = tf.zeros((2, 4, 4, 6))
  gn = L.GroupNormalization(3)
  assert _norms.fusable(gn, x4)
  assert not _norms.fusable(gn, x4, mask=tf.ones((2, 4, 4, 6)))
  assert not _norms.fusable(L.GroupNormalization(3, axis=1), x4)
  assert not _norms.fusable(L.LayerNormalization(), x4)
  assert not _norms.fusable(gn, tf.zeros((2, 4, 4, 6), tf.float64))


def test_channels_first_group_norm_still_matches_keras():
  """A layer that is not fused runs Keras' call inside the tapped model."""
  tf.keras.utils.set_random_seed(5)
  inp = tf.keras.Input((6, 4, 4))
  out = L.Dense(2)(L.Flatten()(L.GroupNormalization(3, axis=1)(inp)))
  plain = tf.keras.Model(inp, out)
  tapped = pe.tap_model(plain)
  x = tf.random.normal((3, 6, 4, 4))
  _close(tapped(x), plain(x), tol=1e-6)


def test_the_tapped_step_runs_the_fused_programs():
  """The traced tapped model calls an XLA-compiled program for the
  GroupNorm (static shapes), and Keras' masked moments are gone."""
  tapped = pe.tap_model(_model())
  x = tf.zeros((2, 6, 6, 2))

  @tf.function
  def f():
    with tf.GradientTape() as tape:
      tape.watch(x)
      out = tapped(x, training=True)
    return tape.gradient(out, x)
  graph = f.get_concrete_function().graph
  compiled = [op for op in graph.get_operations()
              if op.type in ("PartitionedCall", "StatefulPartitionedCall")
              and op.get_attr("_XlaMustCompile")]
  assert len(compiled) >= 2, [op.type for op in graph.get_operations()]
  assert not [op for op in graph.get_operations()
              if "weighted_moments" in op.name]


@tf.keras.utils.register_keras_serializable("test_norms")
class _Scale(L.Layer):
  """No per-example rule: its gradients take the jacobian (pfor) fallback,
  whose backward pass runs through the fused GroupNorm's gradient."""

  def build(self, input_shape):
    self.w = self.add_weight("w", shape=input_shape[-1:], initializer="ones")

  def call(self, x):
    return x * self.w


def test_jacobian_fallback_through_the_fused_group_norm_and_reload(tmp_path):
  tf.keras.utils.set_random_seed(6)
  inp = tf.keras.Input((6, 6, 2))
  h = _Scale(name="scale")(L.Conv2D(6, 3, padding="same")(inp))
  h = L.GroupNormalization(3, name="gn")(h)
  plain = tf.keras.Model(inp, L.Dense(3)(L.Flatten()(h)))
  for v in plain.get_layer("gn").weights:
    v.assign(tf.random.normal(v.shape))
  tapped = pe.tap_model(plain)
  x = tf.random.normal((4, 6, 6, 2))
  y = tf.constant([0, 1, 2, 1])

  @tf.function
  def fast():
    with tf.GradientTape(persistent=True) as tape:
      loss = _LOSS(y, tapped(x, training=True))
    return pe.per_example_gradients(loss, tapped.trainable_variables, tape, 4)

  for a, b in zip(fast(), _one_by_one(plain, x, y)):
    _close(a, b)
  path = str(tmp_path / "tapped.keras")
  tapped.save(path)
  _close(tf.keras.models.load_model(path)(x), plain(x), tol=1e-6)


def _gn_model(**kwargs):
  inp = tf.keras.Input((5, 5, 2))
  h = L.Conv2D(6, 3, padding="same", name="conv")(inp)
  h = L.GroupNormalization(3, name="gn", **kwargs)(h)
  h = L.Flatten()(L.ReLU()(h))
  return tf.keras.Model(inp, L.Dense(3, name="head")(h))


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("kwargs", [{}, {"scale": False}, {"center": False},
                                    {"scale": False, "center": False}],
                         ids=["both", "no_scale", "no_center", "neither"])
def test_expanded_parameter_taps_give_each_examples_gradient(kwargs, dynamic,
                                                             monkeypatch):
  """The fused GroupNorm's parameters enter as per-example copies, so the
  gradient there is each example's: it matches a backward pass per example
  and the rule that recomputes the normalization (the switch off); the
  clipped sum agrees too. Padding a dynamic batch pads the copies."""
  from dpquant_tf.perexample import _registry
  from dpquant_tf.perexample import _taps
  tf.keras.utils.set_random_seed(8)
  plain = _gn_model(**kwargs)
  for v in plain.get_layer("gn").weights:
    v.assign(tf.random.normal(v.shape))
  rng = np.random.default_rng(9)
  x = tf.constant(rng.normal(size=(5, 5, 5, 2)) + 0.5, tf.float32)
  y = tf.constant(rng.integers(0, 3, size=5), tf.int32)
  spec = [tf.TensorSpec((None if dynamic else 5, 5, 5, 2), tf.float32),
          tf.TensorSpec((None if dynamic else 5,), tf.int32)]

  def run(tapped):
    expanded = []

    @tf.function(input_signature=spec)
    def fast(x, y):
      with tf.GradientTape() as tape:
        loss = _LOSS(y, tapped(x, training=True))
      expanded.append(_registry.current_tap(tapped.get_layer("tap_gn")).expanded)
      taps = pe.collect(loss, tapped.trainable_variables, tape)
      return taps.per_example_gradients(), taps.clipped_sum(0.5)[0]
    out = fast(x, y)
    return out, expanded[0]

  (grads, sums), expanded = run(pe.tap_model(plain))
  assert expanded == bool(kwargs.get("scale", True) or kwargs.get("center", True))
  monkeypatch.setattr(_taps, "expand_norm_params", lambda layer: False)
  (grads_off, sums_off), expanded_off = run(pe.tap_model(plain))
  assert not expanded_off
  ref = _one_by_one(plain, x, y)
  assert len(grads) == len(ref) == len(plain.trainable_variables)
  for a, b, c in zip(grads, grads_off, ref):
    _close(a, c)
    _close(b, c)
  for a, b in zip(sums, sums_off):
    _close(a, b)


def test_expanded_tap_shape_is_checked_by_its_rule():
  """The rule refuses a tap whose width is not the layer's parameters."""
  from dpquant_tf.perexample import _rules
  layer = _keras_gn((4, 4, 6), 3, seed=0)
  got = _rules.expanded_param_grads(layer, None, tf.ones((2, 12)), 2)
  np.testing.assert_array_equal(got["gamma"], np.ones((2, 6)))
  with pytest.raises(_rules.UnsupportedLayerError, match="11 values for 12"):
    _rules.expanded_param_grads(layer, None, tf.ones((2, 11)), 2)

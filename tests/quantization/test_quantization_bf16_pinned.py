"""Issue 21: pinned bf16 layers (``QuantizedLayer(switchable=False)``).

A pinned layer runs its bf16 op whenever it trains, with no on/off switch
in the graph, and its taps are the bf16 tensors themselves. The DP step must
add exactly what the switchable layer (switched on) adds, every contribution
must stay within C in the arithmetic executed, inference stays float32, and
nothing can switch the layer off behind the plan's back.
"""

import dpquant_tf  # noqa: F401  (Keras 2 before TensorFlow)
import numpy as np
import pytest
import tensorflow as tf

from dpquant_tf import perexample as pe
from dpquant_tf import quantization as dq
from dpquant_tf import training
from dpquant_tf.optimizers import DPQuantOptimizer
from tests.quantization import _helpers
from dpquant_tf.perexample import _registry

L = tf.keras.layers
BF16 = dq.LayerQuantConfig(fwd_bits=0, bwd_bits=0, precision="bf16")
B = 6
C = 1.0
NORM = 8.0
_LOSS = tf.keras.losses.MeanSquaredError(reduction="none")


def _base():
  """A conv without bias (tap output bf16), a GroupNorm, a sequence Dense
  and a head with bias (tap output float32)."""
  tf.keras.utils.set_random_seed(0)
  inp = tf.keras.Input((6, 6, 3))
  h = L.Conv2D(8, 3, padding="same", use_bias=False, name="conv")(inp)
  h = L.GroupNormalization(2, name="gn")(h)
  h = L.ReLU()(h)
  h = L.Reshape((36, 8))(h)
  h = L.Dense(8, name="seq", use_bias=False)(h)
  h = L.GlobalAveragePooling1D()(h)
  return tf.keras.Model(inp, L.Dense(2, name="head")(h))


def _model(switchable, base=None):
  base = base or _base()
  model = dq.quantize_model(base, config=BF16, rounding="nearest", seed=0,
                            fixed_structure=True, switchable=switchable)
  return pe.tap_model(model)


def _dp_sum_step(model, spec, jit=False):
  """tf.function: the optimizer's clipped sum (noise 0) times NORM."""
  return _helpers.dp_sum_step(model, spec, clip=C, norm=NORM, jit=jit)


def _x(seed=1, batch=B):
  return np.random.default_rng(seed).normal(size=(batch, 6, 6, 3)).astype(
      np.float32)


def _ops(fn, *args):
  graph_def = fn.get_concrete_function(*args).graph.as_graph_def()
  nodes = list(graph_def.node)
  for f in graph_def.library.function:
    nodes.extend(f.node_def)
  return nodes


def test_pinned_layers_have_no_switch_and_tap_bf16_tensors():
  model = _model(switchable=False)
  taps = {}

  @tf.function
  def forward(x):
    with tf.GradientTape() as tape:
      out = model(x, training=True)
    for layer in dq.quantized_layers(model):
      tap = _registry.current_tap(layer)
      taps[layer.layer.name] = (tap.tap_input.dtype, tap.tap_output.dtype)
    # The GroupNorm after the conv reads the conv's bf16 output.
    gn = _registry.current_tap(model.get_layer("tap_gn"))
    taps["gn"] = gn.tap_input.dtype
    return tape.gradient(out, model.trainable_variables)

  ops = [n.op for n in _ops(forward, tf.constant(_x()))]
  assert not {"If", "StatelessIf"} & set(ops), sorted(set(ops))
  assert taps.pop("gn") == tf.bfloat16
  assert taps == {"conv": (tf.bfloat16, tf.bfloat16),
                  "seq": (tf.bfloat16, tf.bfloat16),
                  "head": (tf.bfloat16, tf.float32)}   # the bias: float32
  switchable = _model(switchable=True)
  ops = [n.op for n in _ops(tf.function(lambda x: switchable(x, training=True)),
                            tf.constant(_x()))]
  assert {"If", "StatelessIf"} & set(ops)


@pytest.mark.parametrize("jit,dynamic", [
    (False, False), (False, True),
    pytest.param(True, False, marks=pytest.mark.slow)])
def test_pinned_step_adds_what_the_switchable_step_adds(jit, dynamic):
  """Same weights, same data: the clipped sums (noise 0) agree to float32
  rounding (the same bf16 operands; only where the casts happen moves)."""
  base = _base()
  pinned, switchable = _model(False, base), _model(True, base)
  spec = tf.TensorSpec((None if dynamic else B, 6, 6, 3))
  x = tf.constant(_x())
  got = [t.numpy() for t in _dp_sum_step(pinned, spec, jit)(x)]
  want = [t.numpy() for t in _dp_sum_step(switchable, spec, jit)(x)]
  assert len(got) == len(want) == len(base.trainable_variables)
  # Under XLA the two graphs round differently: XLA may keep float32 where
  # the graph rounds to bf16 (excess precision), in one graph and not the
  # other; then they agree to bf16 rounding only.
  tol = 1e-2 if jit else 1e-5
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=0, atol=tol * np.abs(b).max() + 1e-7)
  assert all(np.abs(a).max() > 0 for a in got)


@pytest.mark.parametrize("base", ["plain", "bf16_epilogue"])
def test_pinned_step_keeps_each_contribution_within_c(base):
  """An example built to cancel (huge opposite rows) moves the clipped sum
  by at most C; a benign one moves it. Also with bf16 bias and activation
  (bf16 taps with a bias, a bf16 output gradient)."""
  model = _model(False, _base() if base == "plain" else _base_epilogue())
  step = _dp_sum_step(model, tf.TensorSpec((None, 6, 6, 3)))

  def run(x):
    return [t.numpy().astype(np.float64) for t in step(tf.constant(x))]

  def contribution(x, i):
    with_i, without = run(x), run(np.delete(x, i, axis=0))
    assert all(np.isfinite(a).all() for a in with_i)
    return np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(with_i, without)))

  x = _x(2)
  x[0] = 0
  x[0, 0, 0, 0], x[0, 0, 1, 0], x[0, 0, 1, 1] = 2.0 ** 30, -2.0 ** 30, 2.0 ** 17
  assert contribution(x, 0) <= C * (1 + 1e-6)
  assert contribution(_x(3), 1) > 0.0


def test_pinned_inference_runs_the_float32_op():
  base = _base()
  model, plain = _model(False, base), pe.tap_model(base)
  x = tf.constant(_x(4))
  # The tapped model's fused GroupNorm rounds in another order than Keras'.
  np.testing.assert_array_equal(model(x, training=False), plain(x))
  np.testing.assert_allclose(model(x, training=False), base(x), rtol=1e-5)
  trained = model(x, training=True)   # bf16: close, not equal
  assert not np.allclose(trained, plain(x), rtol=1e-5, atol=0)
  np.testing.assert_allclose(trained, plain(x), atol=0.05)


def test_a_training_tensor_takes_the_switch_with_the_same_values():
  model = _model(switchable=False)
  x = tf.constant(_x(5))
  pinned = tf.function(lambda x: model(x, training=True))(x)
  as_tensor = tf.function(lambda x, t: model(x, training=t))(x, tf.constant(True))
  np.testing.assert_array_equal(pinned, as_tensor)
  off = tf.function(lambda x, t: model(x, training=t))(x, tf.constant(False))
  np.testing.assert_array_equal(off, model(x, training=False))
  # A variable written False (a restore) does not switch it off either.
  for layer in dq.quantized_layers(model):
    layer.enabled.assign(False)
  again = tf.function(lambda x, t: model(x, training=t))(x, tf.constant(True))
  np.testing.assert_array_equal(pinned, again)


def test_a_pinned_layer_cannot_be_switched_off_or_built_wrongly():
  model = _model(switchable=False)
  layer = [l for l in dq.quantized_layers(model) if l.layer.name == "conv"][0]
  assert layer.current_config() == BF16
  assert layer.execution()["precision"] == "bfloat16"
  for l in dq.quantized_layers(model):   # distinct, so changes would show
    l.fwd_bits.assign(0)
  before = [l.current_config() for l in dq.quantized_layers(model)]
  with pytest.raises(ValueError, match="pinned"):
    dq.set_plan(model, {"conv": BF16.disabled()})
  assert [l.current_config() for l in dq.quantized_layers(model)] == before
  # A plan that leaves a pinned layer out would switch it off: refused too,
  # before any layer changes (the conv's config comes first in the plan).
  with pytest.raises(ValueError, match="pinned"):
    dq.set_plan(model, {"conv": BF16, "seq": BF16})
  assert [l.current_config() for l in dq.quantized_layers(model)] == before
  dq.set_plan(model, {"conv": BF16}, partial=True)   # keeping it on is fine
  dq.set_plan(model, {"conv": BF16, "seq": BF16, "head": BF16})
  # Its variable, if a restore wrote False into it, does not change what
  # runs, and the layer reports what runs.
  layer.enabled.assign(False)
  assert layer.current_config().enabled
  assert layer.execution()["precision"] == "bfloat16"
  # Only a pure, fixed bf16 structure can be pinned.
  dense = lambda: L.Dense(2)
  for kwargs, what in (
      ({"fixed_structure": False, "precision": "bf16", "fwd_bits": 0,
        "bwd_bits": 0}, "fixed_structure=False"),
      ({"fixed_structure": True, "precision": "float32", "fwd_bits": 0,
        "bwd_bits": 0}, "precision=float32"),
      ({"fixed_structure": True, "precision": "bf16", "fwd_bits": 4,
        "bwd_bits": 0}, "forward quantization on"),
      ({"fixed_structure": True, "precision": "bf16", "fwd_bits": 0,
        "bwd_bits": 0, "enabled": False}, "enabled=False")):
    with pytest.raises(ValueError, match="switchable") as err:
      dq.QuantizedLayer(dense(), switchable=False, **kwargs)
    assert what in str(err.value)
  with pytest.raises(TypeError, match="switchable"):
    dq.QuantizedLayer(dense(), switchable="no")
  with pytest.raises(TypeError, match="switchable"):
    dq.quantize_model(_base(), config=BF16, fixed_structure=True,
                      switchable=0)


def test_pinned_layers_survive_save_and_reload(tmp_path):
  model = _model(switchable=False)
  x = tf.constant(_x(6))
  path = str(tmp_path / "pinned.keras")
  model.save(path)
  loaded = tf.keras.models.load_model(path)
  layers = dq.quantized_layers(loaded)
  assert layers and all(not l.switchable for l in layers)
  np.testing.assert_array_equal(loaded(x, training=True),
                                model(x, training=True))
  np.testing.assert_array_equal(loaded(x, training=False),
                                model(x, training=False))


def test_pinned_model_trains_with_the_owned_step():
  """fit with the library's own DP step (Poisson batches, trimmed padding):
  finite loss, every weight moves, the ledger counts the steps."""
  model = _model(switchable=False)
  x = _x(7, batch=64)
  y = np.ones((64, 2), np.float32)
  opt = DPQuantOptimizer(C, 1.0, learning_rate=0.05, seed=0)
  model.compile(optimizer=opt, loss=_LOSS)
  training.install_dp_train_step(model)
  before = [w.numpy().copy() for w in model.trainable_variables]
  history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
  assert np.isfinite(history.history["loss"]).all()
  assert all(not np.array_equal(a, b.numpy())
             for a, b in zip(before, model.trainable_variables))


def test_a_group_norm_reading_bf16_matches_the_cast_also_with_two_consumers(
    monkeypatch):
  """The fused GroupNorm reads a pinned conv's bf16 output (no cast pass);
  outputs and clipped sums match the cast's, also when the conv's output
  feeds a second layer (the two gradients then meet in bf16)."""
  from dpquant_tf.perexample import _taps
  tf.keras.utils.set_random_seed(1)
  inp = tf.keras.Input((6, 6, 3))
  h = L.Conv2D(8, 3, padding="same", use_bias=False, name="conv")(inp)
  a = L.ReLU()(L.GroupNormalization(2, name="gn")(h))
  b = L.Conv2D(8, 1, use_bias=False, name="side")(h)   # second consumer
  h = L.GlobalAveragePooling2D()(L.Add()([a, b]))
  base = tf.keras.Model(inp, L.Dense(2, name="head")(h))
  spec = tf.TensorSpec((None, 6, 6, 3))
  x = tf.constant(_x(8))
  got = [t.numpy() for t in _dp_sum_step(_model(False, base), spec)(x)]
  monkeypatch.setattr(_taps, "bf16_source", lambda t: None)
  model = _model(False, base)
  want = [t.numpy() for t in _dp_sum_step(model, spec)(x)]
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-2 * np.abs(b).max())


def _base_epilogue():
  """Layers with a bias and a bf16 activation (ReLU conv, GELU Dense), one
  with an activation kept float32 (softmax) and a head without one."""
  tf.keras.utils.set_random_seed(2)
  inp = tf.keras.Input((6, 6, 3))
  h = L.Conv2D(8, 3, strides=2, padding="same", activation="relu",
               name="conv")(inp)
  h = L.Flatten()(h)
  h = L.Dense(8, activation="gelu", name="mid")(h)
  h = L.Dense(8, activation="softmax", name="soft")(h)
  return tf.keras.Model(inp, L.Dense(2, name="head")(h))


def test_pinned_bias_and_activation_run_in_bf16_where_they_can():
  """A bias followed by a bf16 activation is added in bf16 (the tap output
  is the bf16 sum, its gradient bf16) and the activation's output is cast
  once; other layers keep the float32 epilogue. Fails if the bias is added
  after the output's cast."""
  model = _model(False, _base_epilogue())
  taps = {}

  @tf.function
  def forward(x):
    out = model(x, training=True)
    for layer in dq.quantized_layers(model):
      tap = _registry.current_tap(layer)
      taps[layer.layer.name] = (tap.tap_input.dtype, tap.tap_output.dtype)
    return out

  nodes = _ops(forward, tf.constant(_x()))
  assert taps == {"conv": (tf.bfloat16, tf.bfloat16),
                  "mid": (tf.bfloat16, tf.bfloat16),
                  "soft": (tf.bfloat16, tf.float32),
                  "head": (tf.bfloat16, tf.float32)}
  bias_dtypes = sorted(tf.as_dtype(n.attr["T"].type).name for n in nodes
                       if n.op == "BiasAdd")
  assert bias_dtypes == ["bfloat16", "bfloat16", "float32", "float32"]
  assert any(n.op == "Relu" and n.attr["T"].type == tf.bfloat16.as_datatype_enum
             for n in nodes)
  # A training tensor takes the switchable path (float32 epilogue): the
  # same values to bf16 rounding.
  x = tf.constant(_x())
  as_tensor = tf.function(lambda x, t: model(x, training=t))(x, tf.constant(True))
  pinned = forward(x).numpy()
  np.testing.assert_allclose(as_tensor, pinned, rtol=0,
                             atol=2e-2 * np.abs(pinned).max())


@pytest.mark.parametrize("jit,dynamic", [
    (False, False), (False, True),
    pytest.param(True, True, marks=pytest.mark.slow)])
def test_pinned_bf16_epilogue_step_is_the_switchable_one_to_bf16_rounding(
    jit, dynamic):
  """The only difference from the switchable layers is one more bf16
  rounding (the sum after the bias): the clipped sums agree to it (also
  under XLA)."""
  base = _base_epilogue()
  spec = tf.TensorSpec((None if dynamic else B, 6, 6, 3))
  x = tf.constant(_x(9))
  got = [t.numpy() for t in _dp_sum_step(_model(False, base), spec, jit)(x)]
  want = [t.numpy() for t in _dp_sum_step(_model(True, base), spec, jit)(x)]
  assert len(got) == len(base.trainable_variables)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-2 * np.abs(b).max())
  assert all(np.abs(a).max() > 0 for a in got)


def test_pinned_rules_without_a_bf16_contraction_run_in_float32():
  """Depthwise and grouped convolutions with a bias and a ReLU tap bf16
  tensors; their per-example rules (and bias sums over positions) see them
  cast to float32, exactly what the rule computes from float32 copies.
  Fails if the rules run on the bf16 taps (bf16 sums and results). Chunked
  (``chunk_size``) gives the same."""
  from dpquant_tf.perexample import _gradients
  tf.keras.utils.set_random_seed(3)
  inp = tf.keras.Input((6, 6, 4))
  h = L.DepthwiseConv2D(3, padding="same", activation="relu", name="dw")(inp)
  h = L.Conv2D(4, 3, groups=2, activation="relu", name="grouped")(h)
  base = tf.keras.Model(inp, L.Dense(2, name="head")(L.Flatten()(h)))
  model = _model(False, base)
  layers = {l.layer.name: l for l in dq.quantized_layers(model)}

  @tf.function
  def run(x):
    with tf.GradientTape(persistent=True) as tape:
      out = model(x, training=True)
      loss = _LOSS(tf.ones_like(out), out)
    got = pe.per_example_gradients(loss, model.trainable_variables, tape)
    chunked = pe.per_example_gradients(loss, model.trainable_variables, tape,
                                       chunk_size=2)
    want = {}
    for name in ("dw", "grouped"):
      tap = _registry.current_tap(layers[name])
      dtypes[name] = (tap.tap_input.dtype, tap.tap_output.dtype)
      g = tape.gradient(loss, tap.tap_output)
      rule = _gradients._RULES[_registry.kind_of(layers[name].layer)]  # pylint: disable=protected-access
      want[name] = rule(layers[name].layer, tf.cast(tap.tap_input, tf.float32),
                        tf.cast(g, tf.float32), B)
    return got, chunked, want

  x = np.random.default_rng(3).normal(size=(B, 6, 6, 4)).astype(np.float32)
  dtypes = {}
  got, chunked, want = run(tf.constant(x))
  assert dtypes == {"dw": (tf.bfloat16, tf.bfloat16),
                    "grouped": (tf.bfloat16, tf.bfloat16)}
  by_var = dict(zip([v.ref() for v in model.trainable_variables],
                    zip(got, chunked)))
  for name in ("dw", "grouped"):
    inner = layers[name].layer
    kernel = inner.depthwise_kernel if name == "dw" else inner.kernel
    for role, var in (("kernel", kernel), ("bias", inner.bias)):
      g, c = by_var[var.ref()]
      w = tf.reshape(want[name][role], g.shape)
      np.testing.assert_array_equal(g, w)
      np.testing.assert_allclose(c, w, rtol=1e-6, atol=1e-7)
      assert np.abs(w).max() > 0

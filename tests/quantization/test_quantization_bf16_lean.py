"""Lean bf16 step (issue 21): cheap unbiased rounding bits, one branch per layer."""

import dpquant_tf  # noqa: F401  (Keras 2 before TensorFlow)
import numpy as np
import pytest
import tensorflow as tf

from dpquant_tf import quantization as dq
from dpquant_tf.quantization import _precision

L = tf.keras.layers


def _dense_model(config, rounding="stochastic", shape=(8,)):
  inp = tf.keras.Input(shape)
  base = tf.keras.Model(inp, L.Dense(5, name="d")(inp))
  return dq.quantize_model(base, config=config, rounding=rounding,
                           bf16_rounding=rounding, seed=4)


def _all_ops(concrete):
  graph_def = concrete.graph.as_graph_def()
  nodes = list(graph_def.node)
  for fn in graph_def.library.function:
    nodes.extend(fn.node_def)
  return [n.op for n in nodes]


def test_rounding_bits_are_16_bit_and_uniform_per_element_over_keys():
  keys = tf.constant(np.random.RandomState(0).randint(
      0, 2**32, 20000, dtype=np.uint64).astype(np.uint32))
  bits = tf.vectorized_map(lambda k: _precision.rounding_bits([3, 5], k),
                          keys).numpy().reshape(20000, 15)
  assert bits.max() < 2**16 and bits.dtype == np.uint32
  # Each element's bits over random keys: uniform on [0, 2**16): mean and
  # the share below 2**15 within 5 sigma.
  n = bits.shape[0]
  mean_sd = (2**16 / np.sqrt(12)) / np.sqrt(n)
  assert np.all(np.abs(bits.mean(0) - (2**16 - 1) / 2) < 5 * mean_sd)
  assert np.all(np.abs((bits < 2**15).mean(0) - 0.5) < 5 * 0.5 / np.sqrt(n))
  # Different elements of one tensor get different bits (not one shared draw).
  assert len(np.unique(bits[0])) == 15


def test_stochastic_bf16_is_unbiased_within_one_step_and_draws_one_key():
  gen = tf.random.Generator.from_seed(7)
  x = tf.constant([1.0 + 2.0**-10, -3.0 - 2.0**-9, 0.1, 1e-30], tf.float32)
  draws = np.stack([tf.cast(dq.to_bfloat16(x, rounding="stochastic",
                                           generator=gen), tf.float32).numpy()
                    for _ in range(1200)])
  for i, v in enumerate(x.numpy()):
    lo = np.float32(tf.cast(tf.cast(v, tf.bfloat16), tf.float32))
    ulp = 2.0**(np.floor(np.log2(abs(v))) - 7)
    assert set(np.unique(draws[:, i])) <= {lo, lo + ulp, lo - ulp}
    assert abs(draws[:, i].mean() - v) < 5 * ulp / (2 * np.sqrt(1200))

  # The generator advances by the same amount for 4 or 40000 elements: one
  # key per tensor, not 32 random bits per element.
  def advance(n):
    before = gen.state.numpy().copy()
    dq.to_bfloat16(tf.ones([n]), rounding="stochastic", generator=gen)
    return int(gen.state.numpy()[0] - before[0])
  assert advance(4) == advance(40000)


def test_disabled_layer_has_one_branch_and_runs_no_quantization_ops():
  model = _dense_model(dq.LayerQuantConfig(enabled=False, precision="bf16"))
  (layer,) = dq.quantized_layers(model)
  x = tf.ones([4, 8])
  fn = tf.function(lambda t: model(t, training=True))
  # The layer's own graph: exactly one branch (enabled) and no switch_case;
  # the quantizers (with their format switch) live inside that branch.
  graph = fn.get_concrete_function(x).graph
  top = [op.type for op in graph.get_operations()]
  assert not {"Case", "StatelessCase"} & set(top), top
  assert sum(t in ("If", "StatelessIf") for t in top) == 1, top
  assert "Bitcast" in _all_ops(fn.get_concrete_function(x))  # bf16 inside
  # Disabled: the rounding generator never advances and the output is the
  # plain float32 layer; enabled bf16: it advances (stochastic input cast).
  state = layer.generator.state.numpy().copy()
  out = fn(x).numpy()
  np.testing.assert_array_equal(layer.generator.state.numpy(), state)
  ref = (x @ layer.layer.kernel + layer.layer.bias).numpy()
  np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
  layer.enabled.assign(True)
  fn(x)
  assert not np.array_equal(layer.generator.state.numpy(), state)


def test_bf16_kernel_cast_is_nearest_and_input_cast_stochastic():
  model = _dense_model(dq.LayerQuantConfig(fwd_bits=0, bwd_bits=0,
                                           precision="bf16"))
  (layer,) = dq.quantized_layers(model)
  rs = np.random.RandomState(0)
  layer.layer.kernel.assign(rs.standard_normal((8, 5)).astype(np.float32))
  kb = tf.cast(tf.cast(layer.layer.kernel, tf.bfloat16), tf.float32)
  # An input that is already bf16-exact is not changed by stochastic
  # rounding, so with a nearest-rounded kernel the output is deterministic.
  x = tf.cast(tf.cast(rs.standard_normal((64, 8)), tf.bfloat16), tf.float32)
  outs = np.stack([model(x, training=True).numpy() for _ in range(5)])
  assert np.all(outs == outs[0])
  want = (x @ kb + layer.layer.bias).numpy()
  np.testing.assert_allclose(outs[0], want, rtol=0, atol=0.01 * np.abs(want).max())
  # A general input is rounded stochastically: outputs vary between calls.
  x = tf.constant(rs.standard_normal((64, 8)).astype(np.float32))
  outs = np.stack([model(x, training=True).numpy() for _ in range(5)])
  assert outs.std(0).max() > 0


def test_bf16_input_cast_is_nearest_by_default_and_config_round_trips():
  inp = tf.keras.Input((8,))
  base = tf.keras.Model(inp, L.Dense(5, name="d")(inp))
  bf16 = dq.LayerQuantConfig(fwd_bits=0, bwd_bits=0, precision="bf16")
  model = dq.quantize_model(base, config=bf16, seed=4)
  (layer,) = dq.quantized_layers(model)
  assert layer.rounding == dq.Rounding.STOCHASTIC      # the formats'
  assert layer.bf16_rounding == dq.Rounding.NEAREST
  x = tf.constant(np.random.RandomState(1).standard_normal((64, 8)),
                  tf.float32)
  outs = np.stack([model(x, training=True).numpy() for _ in range(3)])
  assert np.all(outs == outs[0])
  xb = tf.cast(tf.cast(x, tf.bfloat16), tf.float32)
  kb = tf.cast(tf.cast(layer.layer.kernel, tf.bfloat16), tf.float32)
  want = (xb @ kb + layer.layer.bias).numpy()
  np.testing.assert_allclose(outs[0], want, rtol=0,
                             atol=0.01 * np.abs(want).max())
  config = layer.get_config()
  assert config["bf16_rounding"] == "nearest"
  again = dq.QuantizedLayer.from_config(
      {**config, "bf16_rounding": "stochastic"})
  assert again.bf16_rounding == dq.Rounding.STOCHASTIC
  with pytest.raises(ValueError, match="bf16_rounding='up'"):
    dq.quantize_model(base, config=bf16, bf16_rounding="up")


@pytest.mark.slow  # 20-60 s on a quiet 2-core machine (XLA compile)
def test_bf16_dp_step_traces_and_compiles_under_xla_on_a_small_convnet():
  from dpquant_tf import optimizers  # pylint: disable=g-import-not-at-top
  inp = tf.keras.Input((8, 8, 1))
  h = L.Conv2D(4, 3, activation="relu", name="c1")(inp)
  h = L.Conv2D(4, 3, activation="relu", name="c2")(h)
  out = L.Dense(3, name="d1")(L.Flatten()(h))
  model = dq.quantize_model(tf.keras.Model(inp, out), config=dq.LayerQuantConfig(
      fwd_bits=0, bwd_bits=0, precision="bf16"), seed=1)
  model.compile(optimizer=optimizers.DPQuantOptimizer(
      l2_norm_clip=1.0, noise_multiplier=0.5, learning_rate=0.1, seed=0),
                loss=tf.keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True, reduction="none"), jit_compile=True)
  model.optimizer.install_train_step(model)   # the owned DP step
  rs = np.random.RandomState(0)
  x = rs.standard_normal((8, 8, 8, 1)).astype(np.float32)
  y = rs.randint(0, 3, 8).astype(np.int32)
  hist = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
  assert np.isfinite(hist.history["loss"][0])

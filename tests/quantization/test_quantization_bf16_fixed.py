"""Issue 21: fixed-structure QuantizedLayers and the bf16 per-example contraction.

A layer built with ``fixed_structure=True`` carries only the plain op and its
initial config's structure (what XLA has to compile); a bf16 Dense layer's
per-example kernel gradients are contracted in bfloat16 and clipped by the
materialized bound of exactly those tensors.
"""

import dpquant_tf  # noqa: F401  (Keras 2 before TensorFlow)
import numpy as np
import pytest
import tensorflow as tf

from dpquant_tf import perexample as pe
from dpquant_tf import quantization as dq
from tests.quantization import _helpers

L = tf.keras.layers
BF16 = dq.LayerQuantConfig(fwd_bits=0, bwd_bits=0, precision="bf16")


def _ops(concrete):
  """Op types of a concrete function, its branch functions included."""
  graph_def = concrete.graph.as_graph_def()
  nodes = list(graph_def.node)
  for fn in graph_def.library.function:
    nodes.extend(fn.node_def)
  return [n.op for n in nodes]


def _dense(config, fixed, rounding="stochastic", shape=(8,), units=5):
  inp = tf.keras.Input(shape)
  base = tf.keras.Model(inp, L.Dense(units, name="d")(inp))
  return dq.quantize_model(base, config=config, rounding=rounding,
                           bf16_rounding=rounding, seed=4,
                           fixed_structure=fixed)


def _train_ops(model, x):
  fn = tf.function(lambda t: tf.gradients(tf.reduce_sum(
      model(t, training=True)), model.trainable_variables))
  return _ops(fn.get_concrete_function(x))


def test_fixed_bf16_layer_builds_no_fake_quantization_and_no_fp8():
  x = tf.ones([4, 8])
  dynamic = _train_ops(_dense(BF16, False), x)
  fixed = _train_ops(_dense(BF16, True), x)
  # Dynamic: every precision's branch (fake quantizers, their format
  # switches). Fixed bf16: one If, no quantizer ops.
  # Fixed bf16: one If in the forward pass, one for its gradient.
  assert dynamic.count("If") + dynamic.count("StatelessIf") > 4
  assert fixed.count("If") + fixed.count("StatelessIf") == 2, fixed
  assert "Floor" in dynamic and "Floor" not in fixed
  assert len(fixed) < len(dynamic) / 2, (len(fixed), len(dynamic))


def test_fixed_float32_layer_without_quantization_has_no_branch():
  plain = dq.LayerQuantConfig(fwd_bits=0, bwd_bits=0)
  ops = _train_ops(_dense(plain, True), tf.ones([4, 8]))
  assert not {"If", "StatelessIf", "Case", "StatelessCase"} & set(ops), ops


def test_fixed_layers_compute_what_dynamic_layers_compute():
  rs = np.random.RandomState(0)
  # bf16-exact inputs: the stochastic input cast leaves them unchanged.
  x = tf.cast(tf.cast(rs.standard_normal((16, 8)), tf.bfloat16), tf.float32)
  for config in (BF16, dq.LayerQuantConfig(),
                 dq.LayerQuantConfig(fwd_bits=0, bwd_bits=8, bwd_format="int")):
    outs = []
    for fixed in (False, True):
      model = _dense(config, fixed, rounding="nearest")
      model.set_weights([np.arange(40, dtype=np.float32).reshape(8, 5) / 40,
                         np.ones(5, np.float32)] + model.get_weights()[2:])
      with tf.GradientTape() as tape:
        out = model(x, training=True)
        loss = tf.reduce_sum(out * out)
      outs.append([out.numpy()] + [g.numpy() for g in tape.gradient(
          loss, model.trainable_variables)])
      (layer,) = dq.quantized_layers(model)
      layer.enabled.assign(False)
      outs[-1].append(model(x, training=True).numpy())
    for a, b in zip(*outs):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_fixed_layer_refuses_an_enabled_config_of_another_structure():
  model = _dense(BF16, True)
  (layer,) = dq.quantized_layers(model)
  before = layer.current_config()
  for other in (dq.LayerQuantConfig(),                      # fake quant, fp32
                dq.LayerQuantConfig(fwd_bits=0, bwd_bits=0),  # float32
                dq.LayerQuantConfig(fwd_bits=0, bwd_bits=0, precision="fp8")):
    with pytest.raises(ValueError, match="fixed_structure=True: precision="
                       "bfloat16, forward quantization off"):
      dq.set_plan(model, {"d": other})
    assert layer.current_config() == before   # nothing assigned
  # Switching on and off, and disabled configs, stay allowed.
  dq.set_plan(model, {"d": BF16.disabled()})
  assert not layer.current_config().enabled
  dq.set_plan(model, {"d": BF16})
  assert layer.current_config().enabled
  # The flag survives serialization.
  clone = dq.QuantizedLayer.from_config(layer.get_config())
  assert clone.fixed_structure and clone.bf16_taps
  with pytest.raises(TypeError, match="fixed_structure"):
    _dense(BF16, "yes")


# ---------------------------------------------- bf16 per-example contraction
B, T, K, O = 4, 6, 8, 16
C = 1.0
NORM = 8.0


def _seq_model(fixed):
  tf.keras.utils.set_random_seed(0)
  inp = tf.keras.Input((T, K))
  h = L.Dense(O, name="seq_dense")(inp)
  out = L.Dense(2, name="head")(L.GlobalAveragePooling1D()(h))
  model = dq.quantize_model(tf.keras.Model(inp, out), config=BF16,
                            rounding="nearest", seed=0, fixed_structure=fixed)
  return pe.tap_model(model)


def _dp_sum_step(model, spec, jit=False):
  """tf.function: the optimizer's clipped sum (noise 0) times NORM."""
  return _helpers.dp_sum_step(model, spec, clip=C, norm=NORM, jit=jit)


def _clipped_sum_fn(model, jit=False):
  fn = _dp_sum_step(model, tf.TensorSpec((None, T, K)), jit)
  return lambda x: [t.numpy().astype(np.float64) for t in fn(tf.constant(x))]


def _contribution(run, x, i):
  with_i, without = run(x), run(np.delete(x, i, axis=0))
  assert all(np.isfinite(a).all() for a in with_i)
  return np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(with_i, without)))


def _cancelling(v, e):
  """Example 0: rows V*e0 and -V*e0 + E*e1 (they cancel in the sum over T)."""
  x = np.random.default_rng(0).normal(size=(B, T, K)).astype(np.float32)
  x[0] = 0
  x[0, 0, 0], x[0, 1, 0], x[0, 1, 1] = v, -v, e
  return x


@pytest.mark.parametrize("jit", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_bf16_contraction_keeps_each_contribution_within_c(jit):
  model = _seq_model(fixed=True)
  run = _clipped_sum_fn(model, jit)
  for v, e in ((2.0 ** 30, 2.0 ** 17),):
    ratio = _contribution(run, _cancelling(v, e), 0) / C
    assert ratio <= 1 + 1e-6, (v, e, ratio)
  benign = np.random.default_rng(1).normal(size=(B, T, K)).astype(np.float32)
  assert _contribution(run, benign, 1) > 0.0


def test_bf16_contraction_runs_in_bfloat16_only_while_the_layer_is_on():
  model = _seq_model(fixed=True)
  layer = [l for l in dq.quantized_layers(model)
           if l.layer.name == "seq_dense"][0]
  step = _dp_sum_step(model, tf.TensorSpec((None, T, K)))
  x = tf.constant(np.random.default_rng(2).normal(size=(B, T, K)), tf.float32)
  graph_def = step.get_concrete_function().graph.as_graph_def()
  # The per-example contraction of the bf16 layer: a bf16 batched matmul
  # [B, K, T] x [B, T, O] in the clip (the optimizer's scope).
  bf16 = tf.bfloat16.as_datatype_enum
  found = [n.name for f in graph_def.library.function for n in f.node_def
           if n.op.startswith("BatchMatMul") and n.attr["T"].type == bf16]
  assert found, "no bf16 per-example contraction"
  _assert_bf16_close_to_float32(step, layer, x)


def _assert_bf16_close_to_float32(step, layer, x):
  """Same weights: the bf16 step (bf16 forward, bf16 per-example gradients)
  is close to the float32 one (the layer switched off), not equal."""
  on = step(x)
  layer.enabled.assign(False)
  off = step(x)
  for a, b in zip(on, off):
    a, b = a.numpy(), b.numpy()
    np.testing.assert_allclose(a, b, rtol=0, atol=0.03 * np.abs(b).max())
  assert any(not np.array_equal(a.numpy(), b.numpy()) for a, b in zip(on, off))


# Convolutions of bf16 layers contract their per-example gradients in bf16:
# "wide" is one whose ghost norm pays (T = 16 positions, K*O = 73728: in
# float32 DP its ghost bound runs float64 Grams and a float64 contraction);
# "patches" a narrow strided one (one-hot patches), "shifted" a narrow
# stride-1 one with patches deeper than 128 (shifted windows).
CONVS = {"wide": (4, 64, 128, 1), "patches": (6, 2, 4, 2),
         "shifted": (6, 16, 8, 1)}


def _conv_model(name):
  hw, cin, cout, stride = CONVS[name]
  tf.keras.utils.set_random_seed(0)
  inp = tf.keras.Input((hw, hw, cin))
  h = L.Conv2D(cout, 3, strides=stride, padding="same", name="conv")(inp)
  out = L.Dense(2, name="head")(L.GlobalAveragePooling2D()(h))
  model = dq.quantize_model(tf.keras.Model(inp, out), config=BF16,
                            layers=["conv"], rounding="nearest", seed=0,
                            fixed_structure=True)
  return pe.tap_model(model)


def _conv_step(model, batch=B):
  # A static batch: the head's single-position ghost then needs no Gram
  # matrices either (with a dynamic batch it takes the general T path).
  return _dp_sum_step(model, tf.TensorSpec((batch,) + model.input_shape[1:]))


def _conv_input(model, seed):
  return np.random.default_rng(seed).normal(
      size=(B,) + model.input_shape[1:]).astype(np.float32)


@pytest.mark.parametrize("name", sorted(CONVS))
def test_bf16_conv_contracts_in_bf16_not_in_float64(name):
  from dpquant_tf.perexample import _ghost  # pylint: disable=g-import-not-at-top
  model = _conv_model(name)
  (layer,) = dq.quantized_layers(model)
  if name == "wide":
    g = tf.zeros((B, 4, 4, 128))
    assert _ghost.conv_ghost_positions(pe.LayerKind.CONV2D, layer.layer,
                                       g) == 16
  step = _conv_step(model)
  graph_def = step.get_concrete_function().graph.as_graph_def()
  nodes = [n for f in graph_def.library.function for n in f.node_def]
  nodes += list(graph_def.node)
  matmuls = {n.attr["T"].type for n in nodes if n.op.startswith("BatchMatMul")}
  assert tf.bfloat16.as_datatype_enum in matmuls
  assert tf.float64.as_datatype_enum not in matmuls   # no ghost Gram matrices
  _assert_bf16_close_to_float32(step, layer, tf.constant(_conv_input(model, 3)))


@pytest.mark.parametrize("name", sorted(CONVS))
def test_bf16_conv_keeps_each_contribution_within_c(name):
  model = _conv_model(name)
  step = _conv_step(model)

  def run(x):
    return [t.numpy().astype(np.float64) for t in step(tf.constant(x))]
  x = _conv_input(model, 4)
  x[0] = 0
  x[0, 0, 0, 0], x[0, 0, 1, 0], x[0, 1, 1, 1] = 2.0 ** 30, -2.0 ** 30, 2.0 ** 17
  for i in (0, 1):
    with_i = run(x)
    without = [t.numpy().astype(np.float64) for t in
               _conv_step(model, B - 1)(tf.constant(np.delete(x, i, axis=0)))]
    assert all(np.isfinite(a).all() for a in with_i)
    contribution = np.sqrt(sum(np.sum((a - b) ** 2)
                               for a, b in zip(with_i, without)))
    assert 0.0 < contribution <= C * (1 + 1e-6), (i, contribution)


def test_a_refused_plan_changes_no_layer():
  """set_plan checks every layer's config before assigning any."""
  inp = tf.keras.Input((8,))
  out = L.Dense(2, name="b")(L.Dense(4, name="a")(inp))
  model = dq.quantize_model(tf.keras.Model(inp, out), config=BF16,
                            fixed_structure=True)
  dq.set_plan(model, {"a": BF16.disabled(), "b": BF16.disabled()})
  before = dq.get_plan(model)
  with pytest.raises(ValueError, match="fixed_structure=True"):
    dq.set_plan(model, {"a": BF16, "b": dq.LayerQuantConfig()})
  assert dq.get_plan(model) == before

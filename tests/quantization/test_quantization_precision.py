"""Execution precision of QuantizedLayer: bfloat16 really runs, switches without retrace."""

import logging

import dpquant_tf  # noqa: F401  (Keras 2 before TensorFlow)
import numpy as np
import pytest
import tensorflow as tf

from dpquant_tf import optimizers
from dpquant_tf import perexample
from dpquant_tf import privacy
from dpquant_tf import quantization as dq

L = tf.keras.layers
P = dq.Precision

KINDS = [
    ("dense", lambda: L.Dense(6, activation="tanh"), (5,), "MatMul"),
    ("conv2d", lambda: L.Conv2D(4, 3, padding="same"), (6, 6, 2), "Conv2D"),
    ("depthwise", lambda: L.DepthwiseConv2D(3, depth_multiplier=2), (5, 5, 2),
     "DepthwiseConv2dNative"),
]


def _model(make, shape, precision, rounding="nearest", seed=0):
  inp = tf.keras.Input(shape)
  base = tf.keras.Model(inp, L.Flatten()(make()(inp)))
  rs = np.random.RandomState(seed)
  base.set_weights([rs.standard_normal(w.shape).astype(np.float32) * 0.5
                    for w in base.get_weights()])
  config = dq.LayerQuantConfig(fwd_bits=0, bwd_bits=0, precision=precision)
  return dq.quantize_model(base, config=config, rounding=rounding, seed=3)


def _x(shape, batch=4):
  return tf.constant(np.random.RandomState(1).standard_normal(
      (batch,) + shape).astype(np.float32))


def _ops_with_dtype(concrete, dtype_enum):
  """(op type) of every node, in the graph and its function library, with T=dtype."""
  graph_def = concrete.graph.as_graph_def()
  nodes = list(graph_def.node)
  for fn in graph_def.library.function:
    nodes.extend(fn.node_def)
  return {n.op for n in nodes if "T" in n.attr and n.attr["T"].type == dtype_enum}


@pytest.mark.parametrize("name,make,shape,op", KINDS, ids=[k[0] for k in KINDS])
def test_bfloat16_close_to_float32_and_runs_in_bfloat16(name, make, shape, op):
  del name
  model = _model(make, shape, P.BFLOAT16)
  x = _x(shape)
  low = model(x).numpy()
  dq.set_plan(model, dq.QuantPlan({n: dq.LayerQuantConfig(fwd_bits=0, bwd_bits=0)
                                   for n in dq.get_plan(model)}))
  full = model(x).numpy()
  assert low.dtype == np.float32
  # bfloat16 keeps 8 significant bits: relative error ~2**-8 per product.
  scale = np.abs(full).max()
  np.testing.assert_allclose(low, full, atol=0.03 * scale)
  assert np.abs(low - full).max() > 0  # it did run in lower precision
  fn = tf.function(lambda t: model(t, training=True))
  ops = _ops_with_dtype(fn.get_concrete_function(x), tf.bfloat16.as_datatype_enum)
  assert op in ops, ops


def test_bfloat16_backward_runs_in_bfloat16():
  model = _model(KINDS[1][1], KINDS[1][2], P.BFLOAT16)
  x = _x(KINDS[1][2])

  @tf.function
  def grads(t):
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(model(t, training=True) ** 2)
    return tape.gradient(loss, model.trainable_variables)

  concrete = grads.get_concrete_function(x)
  ops = _ops_with_dtype(concrete, tf.bfloat16.as_datatype_enum)
  assert {"Conv2DBackpropInput", "Conv2DBackpropFilter"} & ops, ops
  assert all(g.dtype == tf.float32 for g in grads(x))


@pytest.mark.parametrize("jit", [False, True])
def test_switching_precision_does_not_retrace(jit):
  model = _model(KINDS[0][1], KINDS[0][2], P.FLOAT32)
  (layer,) = dq.quantized_layers(model)
  x = _x(KINDS[0][2])
  traces = []

  @tf.function(jit_compile=jit)
  def run(t):
    traces.append(1)
    return model(t, training=True)

  outs = {}
  for p in (P.FLOAT32, P.BFLOAT16, P.FP8_E4M3, P.FLOAT32):
    layer.precision.assign(p.id)
    outs.setdefault(p, []).append(run(x).numpy())
  assert len(traces) == 1
  np.testing.assert_array_equal(outs[P.FLOAT32][0], outs[P.FLOAT32][1])
  assert np.abs(outs[P.BFLOAT16][0] - outs[P.FLOAT32][0]).max() > 0
  assert np.abs(outs[P.FP8_E4M3][0] - outs[P.FLOAT32][0]).max() > 0
  eager = model(x).numpy()
  np.testing.assert_allclose(eager, outs[P.FLOAT32][0], rtol=1e-5, atol=1e-6)


def test_disabled_layer_runs_float32():
  model = _model(KINDS[0][1], KINDS[0][2], P.BFLOAT16)
  (layer,) = dq.quantized_layers(model)
  x = _x(KINDS[0][2])
  low = model(x).numpy()
  layer.enabled.assign(False)
  off = model(x).numpy()
  ref = tf.tanh(x @ layer.layer.kernel + layer.layer.bias).numpy()
  np.testing.assert_allclose(off, ref, rtol=1e-6, atol=1e-6)
  assert np.abs(low - off).max() > 0
  assert dq.execution_report(model)[layer.layer.name]["precision"] == "float32"


def test_stochastic_bfloat16_rounding_unbiased_exact_support():
  x = tf.constant([1.0 + 2.0**-10, -3.0 - 2.0**-9, 0.1], tf.float32)
  gen = tf.random.Generator.from_seed(5)
  draws = tf.stack([tf.cast(dq.to_bfloat16(x, rounding="stochastic",
                                           generator=gen), tf.float32)
                    for _ in range(2000)]).numpy()
  for i, v in enumerate(x.numpy()):
    lo = float(tf.cast(tf.cast(v, tf.bfloat16), tf.float32))
    ulp = 2.0**(np.floor(np.log2(abs(v))) - 7)
    support = {lo, lo + ulp, lo - ulp}
    assert set(np.unique(draws[:, i])) <= support
    assert len(np.unique(draws[:, i])) == 2
    # Standard error of the mean <= ulp / (2 sqrt(n)); 5 sigma.
    assert abs(draws[:, i].mean() - v) < 5 * ulp / (2 * np.sqrt(2000))
  with pytest.raises(ValueError, match="Expected generator="):
    dq.to_bfloat16(x, rounding="stochastic")


def test_precision_in_plan_and_config_round_trip():
  cfg = dq.LayerQuantConfig(fwd_bits=0, bwd_bits=0, precision="bf16")
  assert cfg.precision is P.BFLOAT16 and cfg.quantizes
  assert dq.LayerQuantConfig.from_dict(cfg.to_dict()) == cfg
  assert not dq.LayerQuantConfig(fwd_bits=0, bwd_bits=0).quantizes
  with pytest.raises(ValueError, match="Expected precision="):
    dq.LayerQuantConfig(precision="fp16")
  model = _model(KINDS[0][1], KINDS[0][2], P.BFLOAT16)
  plan = dq.get_plan(model)
  assert all(c.precision is P.BFLOAT16 for c in plan.layers.values())
  (layer,) = dq.quantized_layers(model)
  clone = dq.QuantizedLayer.from_config(layer.get_config())
  assert clone.get_config()["precision"] == "bfloat16"
  report = dq.execution_report(model)[layer.layer.name]
  assert report["precision"] == "bfloat16" and report["native"]
  assert report["simulated_formats"] == []
  dq.set_plan(model, {layer.layer.name: dq.LayerQuantConfig(precision="fp8_e4m3")})
  report = dq.execution_report(model)[layer.layer.name]
  assert report["precision"] == "fp8_e4m3" and not report["native"]
  assert report["simulated_formats"] == ["fwd:int4_sawb", "bwd:luq_fp4"]


def _digits(n=32, seed=0):
  rs = np.random.RandomState(seed)
  y = rs.randint(0, 4, n)
  x = rs.standard_normal((n, 6, 6, 1)).astype(np.float32) * 0.3
  x[np.arange(n), y, y, 0] += 3.0
  return x, y.astype(np.int32)


def _cnn(precision):
  inp = tf.keras.Input((6, 6, 1))
  h = L.Conv2D(4, 3, activation="relu", name="c1")(inp)
  out = L.Dense(4, name="d1")(L.Flatten()(h))
  base = tf.keras.Model(inp, out)
  return dq.quantize_model(base, config=dq.LayerQuantConfig(
      fwd_bits=0, bwd_bits=0, precision=precision), seed=1)


def test_per_example_gradients_fast_path_float32_and_clipped():
  model = _cnn(P.BFLOAT16)
  x, y = _digits(8)
  loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(
      from_logits=True, reduction="none")

  def no_fallback(*args):
    raise AssertionError(f"jacobian fallback used: {args[1]}")

  with tf.GradientTape(persistent=True) as tape:
    loss = loss_fn(y, model(x, training=True))
    total = tf.reduce_sum(loss)
  grads = perexample.per_example_gradients(
      loss, model.trainable_variables, tape, fallback=no_fallback)
  assert all(g.dtype == tf.float32 and g.shape[0] == 8 for g in grads)
  for layer in dq.quantized_layers(model):
    assert layer.tap_input.dtype == tf.float32
    assert layer.tap_output.dtype == tf.float32
  clip = 0.1
  clipped = privacy.clip_per_example(grads, tf.constant(clip))
  norms = np.sqrt(sum(np.sum(np.reshape(g.numpy() ** 2, (8, -1)), axis=1)
                      for g in clipped))
  raw = np.sqrt(sum(np.sum(np.reshape(g.numpy() ** 2, (8, -1)), axis=1)
                    for g in grads))
  assert raw.min() > clip  # the bound is active
  assert np.all(norms <= clip * (1 + 1e-6))
  # Per-example sums equal the batch gradient of the same bf16 forward.
  batch = tape.gradient(total, model.trainable_variables)
  for g, b in zip(grads, batch):
    # The batch gradient of the bf16 layer is accumulated in bfloat16.
    np.testing.assert_allclose(tf.reduce_sum(g, 0), b, rtol=0,
                               atol=0.03 * float(tf.reduce_max(tf.abs(b))))


class _FallbackLog(logging.Handler):

  def __init__(self):
    super().__init__()
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


@pytest.mark.parametrize("jit", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_dp_training_with_bfloat16_layers_trains_on_fast_path(jit):
  tf.keras.utils.set_random_seed(0)
  model = _cnn(P.BFLOAT16)
  x, y = _digits(32)
  opt = optimizers.DPQuantOptimizer(l2_norm_clip=1.0, noise_multiplier=0.1,
                                    learning_rate=0.5, seed=2)
  model.compile(optimizer=opt, loss=tf.keras.losses.SparseCategoricalCrossentropy(
      from_logits=True, reduction="none"), jit_compile=jit)
  dpquant_tf.install_dp_train_step(model)
  handler = _FallbackLog()
  logging.getLogger("absl").addHandler(handler)
  try:
    hist = model.fit(x, y, batch_size=16, epochs=6, verbose=0, shuffle=False)
  finally:
    logging.getLogger("absl").removeHandler(handler)
  assert not [m for m in handler.messages if "jacobian fallback" in m]
  losses = hist.history["loss"]
  assert losses[-1] < 0.7 * losses[0], losses
  report = dq.execution_report(model)
  assert {r["precision"] for r in report.values()} == {"bfloat16"}

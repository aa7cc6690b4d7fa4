"""QuantizedLayer: every wrapped layer type passes the same tests."""

import os
import subprocess
import sys

import dpquant_tf  # noqa: F401  (Keras 2 before TensorFlow)
import numpy as np
import pytest
import tensorflow as tf

from dpquant_tf import quantization as dq

L = tf.keras.layers
F = dq.QuantFormat

# (name, layer factory, input shape without batch)
KINDS = [
    ("dense", lambda: L.Dense(6, activation="tanh"), (5,)),
    ("dense_rank3", lambda: L.Dense(4), (3, 5)),
    ("conv1d_causal", lambda: L.Conv1D(4, 3, padding="causal", activation="relu"), (7, 3)),
    ("conv2d", lambda: L.Conv2D(4, 3, strides=2, padding="same"), (6, 6, 2)),
    ("depthwise", lambda: L.DepthwiseConv2D(3, depth_multiplier=2), (5, 5, 2)),
    ("einsum", lambda: L.EinsumDense("abc,cd->abd", output_shape=(3, 4),
                                     bias_axes="d"), (3, 5)),
]
IDS = [k[0] for k in KINDS]


def _model(make, shape):
  inp = tf.keras.Input(shape)
  out = make()(inp)
  model = tf.keras.Model(inp, L.Flatten()(out))
  rs = np.random.RandomState(0)
  model.set_weights([rs.standard_normal(w.shape).astype(np.float32) * 0.5
                     for w in model.get_weights()])
  return model


def _data(shape, batch=4, seed=1):
  return np.random.RandomState(seed).standard_normal((batch,) + shape).astype(np.float32)


def _grads(model, x, upstream, fn=None):
  def step(x):
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = model(x)
      loss = tf.reduce_sum(y * upstream)
    return [y] + tape.gradient(loss, [x] + model.trainable_variables)
  fn = fn or step
  return [t.numpy() for t in fn(tf.constant(x))]


@pytest.mark.parametrize("name,make,shape", KINDS, ids=IDS)
def test_disabled_wrapping_is_exactly_the_plain_model(name, make, shape):
  model = _model(make, shape)
  qmodel = dq.quantize_model(model, config=dq.LayerQuantConfig(enabled=False))
  x = _data(shape)
  up = np.random.RandomState(2).standard_normal(model(x).shape).astype(np.float32)
  for graph in (False, True):
    wrap = tf.function if graph else (lambda f: f)
    ref = _grads(model, x, up, wrap(lambda x: _step(model, x, up)))
    got = _grads(qmodel, x, up, wrap(lambda x: _step(qmodel, x, up)))
    for a, b in zip(ref, got):
      # The wrapper and the plain layer run different op graphs: oneDNN picks
      # kernels (and fusions such as Conv2DBackpropFilter + BiasAddGrad) by
      # CPU feature and graph shape, so on AVX-512 / AMX CPUs the same float32
      # products are summed in another order. Tolerance from float32
      # rounding: a few units of roundoff (u = 6e-8) on O(1) values; a real
      # difference (quantization on, below) is orders of magnitude larger.
      # Bitwise equality holds with oneDNN off (the slow test below).
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  # ... and quantization on does change things (the test has power).
  dq.set_plan(qmodel, {n.name: dq.LayerQuantConfig(fwd_format="int", fwd_bits=2)
                       for n in dq.quantizable_layers(qmodel)})
  got = _grads(qmodel, x, up, lambda x: _step(qmodel, x, up))
  assert not np.array_equal(ref[0], got[0])


_ONEDNN = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1") != "0"


@pytest.mark.slow
def test_disabled_wrapping_is_exact_in_graph_mode_without_onednn_fusions():
  code = ("import sys; sys.path.insert(0, '.');"
          "import tests.quantization.test_quantization_layers as t;"
          "[t.test_disabled_wrapping_is_exactly_the_plain_model(*k) for k in t.KINDS];"
          "assert not t._ONEDNN; print('EXACT')")
  env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0", TF_CPP_MIN_LOG_LEVEL="2")
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env,
                       capture_output=True, text=True, timeout=300, check=False)
  assert "EXACT" in out.stdout, out.stderr[-3000:]


def _step(model, x, up):
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = model(x)
    loss = tf.reduce_sum(y * up)
  return [y] + tape.gradient(loss, [x] + model.trainable_variables)


def _wrapped(make, shape, seed=3, **kwargs):
  layer = dq.QuantizedLayer(make(), seed=seed, **kwargs)
  layer(tf.zeros((1,) + shape))
  rs = np.random.RandomState(0)
  for w in layer.layer.weights:
    w.assign(rs.standard_normal(w.shape).astype(np.float32) * 0.5)
  return layer


def _run_layer(layer, x, up, seed):
  layer.generator.reset_from_seed(seed)
  x = tf.constant(x)
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = layer(x)
    loss = tf.reduce_sum(y * up)
  gz, gx = tape.gradient(loss, [layer.tap_output, x])
  return y.numpy(), gz.numpy(), gx.numpy()


@pytest.mark.parametrize("name,make,shape", KINDS, ids=IDS)
@pytest.mark.parametrize("fwd,bwd", [(("int4_sawb", 4), ("luq_fp4", 4)),
                                     (("fp8_e4m3", 8), ("fp8_e5m2", 8)),
                                     (("fp4_e2m1", 4), ("int", 3))])
def test_example_i_is_independent_of_the_other_examples(name, make, shape, fwd, bwd):
  layer = _wrapped(make, shape, fwd_format=fwd[0], fwd_bits=fwd[1],
                   bwd_format=bwd[0], bwd_bits=bwd[1])
  x = _data(shape)
  up_shape = layer(x).shape
  up = np.random.RandomState(4).standard_normal(up_shape).astype(np.float32)
  x2, up2 = x.copy(), up.copy()
  x2[1:] *= 100.0
  up2[1:] *= -50.0
  a = _run_layer(layer, x, up, seed=9)
  b = _run_layer(layer, x2, up2, seed=9)
  for ta, tb in zip(a, b):
    np.testing.assert_array_equal(ta[0], tb[0])
  # With other noise, example 0 changes (the rounding is really stochastic).
  c = _run_layer(layer, x, up, seed=10)
  assert not np.array_equal(a[1][0], c[1][0])


@pytest.mark.parametrize("name,make,shape", KINDS, ids=IDS)
def test_forward_and_backward_compute_what_the_contract_says(name, make, shape):
  layer = _wrapped(make, shape, rounding="nearest", fwd_format="int", fwd_bits=3,
                   bwd_format="luq_fp4", bwd_bits=4)
  inner = layer.layer
  activation = inner.activation
  x = _data(shape)
  y = layer(x)
  up = np.random.RandomState(5).standard_normal(y.shape).astype(np.float32)
  with tf.GradientTape() as tape:
    out = layer(tf.constant(x))
    loss = tf.reduce_sum(out * up)
  gz, gk = tape.gradient(loss, [layer.tap_output, dq._layers.kernel_of(inner)])
  # forward: z = op(q(x), q(W)) + b, tap_input = q(x)
  qx = dq.quantize(layer.tap_input if name == "conv1d_causal" else x, "int", 3,
                   rounding="nearest", scale_axes=dq.example_axes(layer.tap_input))
  np.testing.assert_array_equal(layer.tap_input.numpy(), qx.numpy())
  kernel = dq._layers.kernel_of(inner)
  axes = [i for i in range(kernel.shape.rank)
          if i not in dq._layers.kernel_output_axes(inner)]
  qk = dq.quantize(kernel, "int", 3, rounding="nearest", scale_axes=axes)
  inner.activation = None
  try:
    saved = kernel.numpy()
    kernel.assign(qk)
    plain = type(inner).call(inner, qx if name != "conv1d_causal" else tf.constant(x))
  finally:
    kernel.assign(saved)
    inner.activation = activation
  if name == "conv1d_causal":  # the plain call pads and quantizes nothing: compare z only
    plain = layer.tap_output
  np.testing.assert_allclose(layer.tap_output.numpy(), plain.numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out.numpy(), activation(layer.tap_output).numpy())
  # backward: gradient at z is the per-example quantized incoming gradient
  with tf.GradientTape() as t2:
    z = tf.constant(layer.tap_output)
    t2.watch(z)
    loss2 = tf.reduce_sum(activation(z) * up)
  dz = t2.gradient(loss2, z)
  expect = dq.quantize(dz, "luq_fp4", 4, rounding="nearest", scale_axes=dq.example_axes(dz))
  np.testing.assert_array_equal(gz.numpy(), expect.numpy())
  if name == "dense":  # dW = q(x)^T q(dz)
    np.testing.assert_allclose(gk.numpy(), (qx.numpy().T @ expect.numpy()), rtol=1e-5)


def test_bits_zero_switches_one_direction_off():
  layer = _wrapped(KINDS[0][1], (5,), rounding="nearest", fwd_bits=0)
  x = _data((5,))
  y = layer(x)
  np.testing.assert_array_equal(layer.tap_input.numpy(), x)
  layer.fwd_bits.assign(4)
  layer(x)
  assert not np.array_equal(layer.tap_input.numpy(), x)
  del y


def test_config_round_trip_and_registration():
  layer = dq.QuantizedLayer(L.Conv2D(3, 2, name="c"), enabled=False,
                            fwd_format="fp8_e4m3", fwd_bits=8, bwd_format="int",
                            bwd_bits=6, rounding="nearest", weight_scale="per_tensor",
                            seed=5)
  config = layer.get_config()
  clone = dq.QuantizedLayer.from_config(config)
  assert clone.get_config() == config
  ser = tf.keras.utils.serialize_keras_object(layer)
  assert tf.keras.utils.get_registered_name(dq.QuantizedLayer) == (
      "dpquant_tf>QuantizedLayer")
  assert ser.get("registered_name", ser["class_name"]) == "dpquant_tf>QuantizedLayer"
  again = tf.keras.utils.deserialize_keras_object(ser)
  assert isinstance(again, dq.QuantizedLayer) and again.get_config() == config


def test_rejects_unsupported_layers_and_bad_settings():
  with pytest.raises(TypeError, match="Expected layer=.* to be a Dense, Conv1D"):
    dq.QuantizedLayer(L.LSTM(3))
  with pytest.raises(TypeError, match="Expected layer=.* to be a Dense"):
    dq.QuantizedLayer(L.Conv2DTranspose(3, 2))
  with pytest.raises(ValueError, match=r"Expected fwd_bits=9 to be 0 \(off\) or in \[2, 5\]"):
    dq.QuantizedLayer(L.Dense(3), fwd_bits=9)
  with pytest.raises(ValueError, match=r"Expected bwd_format='fp16' to be one of"):
    dq.QuantizedLayer(L.Dense(3), bwd_format="fp16")


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_savedmodel_round_trip(tmp_path, rounding):
  model = _model(KINDS[3][1], KINDS[3][2])
  qmodel = dq.quantize_model(model, rounding=rounding, seed=1)
  plan = dq.QuantPlan.select([i.name for i in dq.quantizable_layers(qmodel)], ["conv2d"],
                             config=dq.LayerQuantConfig(fwd_format="fp4_e2m1"))
  dq.set_plan(qmodel, plan)
  x = _data(KINDS[3][2])
  path = os.path.join(tmp_path, "m")
  qmodel.save(path, save_format="tf")
  loaded = tf.keras.models.load_model(path)
  assert dq.get_plan(loaded) == plan
  on = qmodel(x).numpy()
  if rounding == "nearest":  # deterministic: identical with quantization on
    np.testing.assert_array_equal(loaded(x).numpy(), on)
  # Inference (training=False) never runs the training plan (issue 23).
  plain = model(x).numpy()
  np.testing.assert_array_equal(loaded(x, training=False).numpy(),
                                qmodel(x, training=False).numpy())
  # the bare SavedModel (no Keras) serves the plain layers, deterministically
  bare = tf.saved_model.load(path)
  served = bare(tf.constant(x)).numpy()
  assert served.shape == on.shape
  np.testing.assert_array_equal(served, bare(tf.constant(x)).numpy())
  # Different op graphs (wrapper vs plain layer; see the test above): float32
  # rounding tolerance.
  np.testing.assert_allclose(served, plain, rtol=1e-6, atol=1e-6)
  dq.set_plan(loaded, {})
  dq.set_plan(qmodel, {})
  np.testing.assert_array_equal(loaded(x).numpy(), qmodel(x).numpy())
  np.testing.assert_allclose(loaded(x).numpy(), plain, rtol=1e-6, atol=1e-6)

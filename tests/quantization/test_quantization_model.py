"""Model API: quantize_model, quantizable_layers, plans, retrace-free switching."""

import dataclasses

import dpquant_tf  # noqa: F401  (Keras 2 before TensorFlow)
import numpy as np
import pytest
import tensorflow as tf

from dpquant_tf import quantization as dq

L = tf.keras.layers


def _cnn():
  inp = tf.keras.Input((8, 8, 1))
  h = L.Conv2D(4, 3, activation="relu", name="c1")(inp)
  h = L.DepthwiseConv2D(3, padding="same", name="dw")(h)
  h = L.Flatten()(h)
  h = L.Dense(10, name="d1")(h)
  return tf.keras.Model(inp, h)


def test_quantizable_layers_order_kinds_and_macs():
  model = _cnn()
  infos = dq.quantizable_layers(model)
  assert [i.name for i in infos] == ["c1", "dw", "d1"]
  assert [i.index for i in infos] == [0, 1, 2]
  assert [i.kind for i in infos] == [dq.LayerKind.CONV2D, dq.LayerKind.DEPTHWISE_CONV2D,
                                     dq.LayerKind.DENSE]
  # conv: 6*6 outputs * 4 filters * 3*3*1; depthwise: 6*6*4 * 3*3; dense: 144*10
  assert [i.fwd_macs for i in infos] == [1296, 1296, 1440]
  assert [i.bwd_macs for i in infos] == [2592, 2592, 2880]
  qmodel = dq.quantize_model(model)
  assert dq.quantizable_layers(qmodel) == infos
  partial = dq.quantize_model(model, layers=["dw"])
  assert [i.name for i in dq.quantizable_layers(partial)] == ["dw"]


def test_quantize_model_keeps_weights_and_handles_nested_models():
  inner = tf.keras.Sequential([tf.keras.Input((5,)), L.Dense(4, name="a"),
                               L.Dense(3, name="b")], name="inner")
  inp = tf.keras.Input((5,))
  out = L.Dense(2, name="head")(inner(inp))
  model = tf.keras.Model(inp, out)
  qmodel = dq.quantize_model(model, config=dq.LayerQuantConfig(enabled=False))
  assert [i.name for i in dq.quantizable_layers(qmodel)] == ["a", "b", "head"]
  x = np.random.RandomState(0).standard_normal((3, 5)).astype(np.float32)
  # Different op graphs (disabled wrapper vs plain Dense): oneDNN may sum in
  # another order on AVX-512/AMX CPUs; a few float32 roundoffs on O(1) values.
  np.testing.assert_allclose(qmodel(x).numpy(), model(x).numpy(),
                             rtol=1e-6, atol=1e-6)
  assert all(isinstance(l, dq.QuantizedLayer) for l in dq.quantized_layers(qmodel))


def test_model_errors_name_what_is_supported():
  class Sub(tf.keras.Model):
    def __init__(self):
      super().__init__()
      self.d = L.Dense(2)

    def call(self, x):
      return self.d(x)

  sub = Sub()
  sub(tf.zeros((1, 3)))
  with pytest.raises(ValueError, match="supports Sequential and Functional .* subclassed model"):
    dq.quantize_model(sub)
  with pytest.raises(ValueError, match="unbuilt Sequential"):
    dq.quantize_model(tf.keras.Sequential([L.Dense(2)]))
  with pytest.raises(ValueError, match=r"Expected layers='nope' to be one of the model's layers"):
    dq.quantize_model(_cnn(), layers=["nope"])
  cnn = _cnn()
  with pytest.raises(ValueError, match=r"Expected layers='flatten.*' to be a Dense"):
    dq.quantize_model(cnn, layers=[l.name for l in cnn.layers if "flatten" in l.name])
  with pytest.raises(ValueError, match="call dpquant_tf.quantization.quantize_model"):
    dq.get_plan(_cnn())


def test_plans_round_trip_and_validate():
  qmodel = dq.quantize_model(_cnn())
  names = [i.name for i in dq.quantizable_layers(qmodel)]
  cfg = dq.LayerQuantConfig(fwd_format="fp8_e5m2", fwd_bits=8, bwd_format="int", bwd_bits=8)
  plan = dq.QuantPlan.select(names, ["dw"], config=cfg)
  dq.set_plan(qmodel, plan)
  assert dq.get_plan(qmodel) == plan
  assert dq.get_plan(qmodel).enabled_layers() == ["dw"]
  assert dq.QuantPlan.from_dict(plan.to_dict()) == plan
  # missing layers are disabled unless partial=True
  dq.set_plan(qmodel, {"c1": cfg})
  assert dq.get_plan(qmodel).enabled_layers() == ["c1"]
  dq.set_plan(qmodel, {"d1": cfg}, partial=True)
  assert dq.get_plan(qmodel).enabled_layers() == ["c1", "d1"]
  with pytest.raises(ValueError, match=r"Expected plan=\['zz'\] to be names of quantized"):
    dq.set_plan(qmodel, {"zz": cfg})
  with pytest.raises(ValueError, match=r"Expected fwd_bits=6 to be 0 \(off\) or in \[8, 8\]"):
    dq.LayerQuantConfig(fwd_format="fp8_e4m3", fwd_bits=6)
  with pytest.raises(ValueError, match=r"Expected enabled=\['x'\] to be a subset"):
    dq.QuantPlan.select(names, ["x"])
  assert dataclasses.replace(cfg, enabled=False) == cfg.disabled()


class _PlanSwitcher(tf.keras.callbacks.Callback):
  """Quantizes on odd batches, not on even ones; records running losses."""

  def __init__(self, names, calls):
    super().__init__()
    self.calls = calls
    self.traces = []
    self.on = dq.QuantPlan.select(names, names, config=dq.LayerQuantConfig(
        fwd_format="int", fwd_bits=2, bwd_format="int", bwd_bits=2))
    self.off = dq.QuantPlan.select(names, [])
    self.means = []

  def on_train_batch_begin(self, batch, logs=None):
    dq.set_plan(self.model, self.on if batch % 2 else self.off)

  def on_train_batch_end(self, batch, logs=None):
    self.means.append(float(logs["loss"]))
    self.traces.append((len(self.calls),
                        self.model.train_function.experimental_get_tracing_count()))


@pytest.mark.parametrize("jit_compile", [False, True])
def test_switching_the_plan_inside_fit_changes_the_next_batch_without_retrace(
    jit_compile, monkeypatch):
  calls = []
  original = dq.QuantizedLayer.call

  def counting_call(self, *args, **kwargs):
    calls.append(self.name)
    return original(self, *args, **kwargs)

  monkeypatch.setattr(dq.QuantizedLayer, "call", counting_call)
  base = tf.keras.Sequential([tf.keras.Input((6,)), L.Dense(8, activation="relu"),
                              L.Dense(3)])
  qmodel = dq.quantize_model(base, rounding="nearest")
  names = [i.name for i in dq.quantizable_layers(qmodel)]
  qmodel.compile(optimizer=tf.keras.optimizers.legacy.SGD(0.0), loss="mse",
                 jit_compile=jit_compile)
  rs = np.random.RandomState(0)
  x = rs.standard_normal((16, 6)).astype(np.float32)
  y = rs.standard_normal((16, 3)).astype(np.float32)
  switcher = _PlanSwitcher(names, calls)
  calls.clear()
  qmodel.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0,
             callbacks=[switcher])
  # No retrace after the first batch: neither the wrapped layers' Python
  # call nor the train function's trace count moves (the first call may trace
  # twice while the optimizer creates its variables).
  assert calls and len(switcher.traces) == 4
  assert all(t == switcher.traces[0] for t in switcher.traces), switcher.traces
  assert len(calls) == switcher.traces[-1][0]
  m = np.array(switcher.means)
  per_batch = m * np.arange(1, 5) - np.concatenate([[0.0], m[:-1] * np.arange(1, 4)])
  expected = []
  for b in range(4):
    dq.set_plan(qmodel, switcher.on if b % 2 else switcher.off)
    pred = qmodel(x[4 * b:4 * b + 4])
    expected.append(float(tf.reduce_mean(tf.square(pred - y[4 * b:4 * b + 4]))))
  np.testing.assert_allclose(per_batch, expected, rtol=1e-4)
  # and the quantized batches really differ from unquantized ones
  dq.set_plan(qmodel, switcher.off)
  plain = [float(tf.reduce_mean(tf.square(qmodel(x[4 * b:4 * b + 4]) - y[4 * b:4 * b + 4])))
           for b in (1, 3)]
  assert all(abs(p - e) > 1e-3 for p, e in zip(plain, [expected[1], expected[3]]))


def test_stochastic_rounding_trains_under_xla():
  base = tf.keras.Sequential([tf.keras.Input((6,)), L.Dense(8, activation="relu"),
                              L.Dense(3)])
  qmodel = dq.quantize_model(base)
  qmodel.compile(optimizer=tf.keras.optimizers.legacy.SGD(0.05), loss="mse",
                 jit_compile=True)
  rs = np.random.RandomState(0)
  x = rs.standard_normal((32, 6)).astype(np.float32)
  y = x[:, :3] * 0.5
  hist = qmodel.fit(x, y, batch_size=8, epochs=3, verbose=0)
  assert np.all(np.isfinite(hist.history["loss"]))
  assert qmodel.train_function.experimental_get_tracing_count() <= 2

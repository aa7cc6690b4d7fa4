"""The BERT-like encoder: fast per-example gradients, masks, quantization, export."""

import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import dpquant_tf  # noqa: F401  (Keras 2 first)
import tensorflow as tf

from dpquant_tf import models
from dpquant_tf import optimizers
from dpquant_tf import perexample as pe
from dpquant_tf import quantization

B, T, V, C = 4, 8, 20, 3
_LOSS = tf.keras.losses.SparseCategoricalCrossentropy(
    from_logits=True, reduction=tf.keras.losses.Reduction.NONE)


def _tiny(**kw):
  kw.setdefault("num_layers", 1)
  kw.setdefault("hidden", 8)
  kw.setdefault("num_heads", 2)
  kw.setdefault("ff_dim", 16)
  return models.transformer_classifier((T,), C, vocab_size=V, **kw)


def _wrapped(model, seed=0, enabled=False):
  """As examples/train_lib does: quantizable layers wrapped, the rest tapped.

  ``enabled=False`` switches every QuantizedLayer off (the fp32 run): the
  backward quantizers round stochastically, so two backward passes (fast
  path and reference) would otherwise differ by their rounding noise.
  """
  model = pe.tap_model(quantization.quantize_model(model, seed=seed))
  if not enabled:
    names = [l.name for l in quantization.quantizable_layers(model)]
    quantization.set_plan(model, quantization.QuantPlan.select(names, []))
  return model


def _data(seed=0, pad=True):
  rng = np.random.default_rng(seed)
  x = rng.integers(1, V, size=(B, T)).astype(np.int32)
  if pad:   # ragged lengths: example b keeps T - b tokens
    for b in range(B):
      x[b, T - b:] = 0
  y = rng.integers(0, C, size=(B,)).astype(np.int32)
  return tf.constant(x), tf.constant(y)


def _fast(model, x, y, jit=None):
  """Fast per-example gradients (eager, or in a tf.function with ``jit``)."""
  def f():
    with tf.GradientTape(persistent=True) as tape:
      loss = _LOSS(y, model(x, training=True))
    return pe.per_example_gradients(loss, model.trainable_variables, tape), (
        pe.jacobian_gradients(loss, model.trainable_variables, tape)
        if jit is not None else None)
  return tf.function(f, jit_compile=jit)() if jit is not None else f()


def _loop_reference(model, x, y):
  """Per-example gradients by one backward pass per example (the definition)."""
  rows = []
  for b in range(x.shape[0]):
    with tf.GradientTape() as tape:
      loss = _LOSS(y[b:b + 1], model(x[b:b + 1], training=True))[0]
    grads = tape.gradient(loss, model.trainable_variables,
                          unconnected_gradients=tf.UnconnectedGradients.ZERO)
    rows.append([tf.convert_to_tensor(g) for g in grads])
  return [tf.stack(r) for r in zip(*rows)]


def _assert_close(model, fast, slow):
  assert len(fast) == len(model.trainable_variables)
  for var, a, b in zip(model.trainable_variables, fast, slow):
    assert a.shape == (B,) + tuple(var.shape), var.name
    scale = max(float(tf.reduce_max(tf.abs(b))), 1e-6)
    np.testing.assert_allclose(a.numpy() / scale, b.numpy() / scale,
                               atol=2e-5, err_msg=var.name)


def _kind_names(model):
  out = set()
  for layer in model.layers:
    inner = getattr(layer, "layer", layer)
    if inner.weights:
      out.add(type(inner).__name__)
  return out


def test_every_layer_kind_matches_per_example_backward_passes(caplog):
  model = _wrapped(_tiny())
  assert _kind_names(model) == {"Dense", "Embedding", "LayerNormalization"}
  x, y = _data()
  with caplog.at_level(logging.WARNING):
    fast, _ = _fast(model, x, y)
  assert "jacobian fallback" not in caplog.text
  _assert_close(model, fast, _loop_reference(model, x, y))


@pytest.mark.slow
@pytest.mark.parametrize("jit", [False, True])
def test_every_layer_kind_matches_jacobian(jit, caplog):
  model = _wrapped(_tiny())
  x, y = _data()
  with caplog.at_level(logging.WARNING):
    fast, slow = _fast(model, x, y, jit=jit)
  assert "jacobian fallback" not in caplog.text
  _assert_close(model, fast, slow)


@pytest.mark.slow
def test_dp_fit_takes_fast_path_for_every_variable(caplog):
  model = _wrapped(_tiny(preset="tiny", num_layers=2, hidden=16))
  opt = optimizers.DPQuantOptimizer(l2_norm_clip=1.0, noise_multiplier=0.5,
                                    learning_rate=0.1, seed=1)
  model.compile(optimizer=opt, loss=_LOSS)
  x, y = _data()
  with caplog.at_level(logging.WARNING):
    model.fit(x, y, batch_size=B, epochs=1, verbose=0)
  assert "jacobian fallback" not in caplog.text
  # Every trainable variable is owned by a tapped layer.
  slots = pe._registry.registered_slots()  # pylint: disable=protected-access
  missing = [v.name for v in model.trainable_variables if v.ref() not in slots]
  assert not missing


def test_padding_mask_does_not_couple_examples():
  model = _tiny()
  x, y = _data()
  base = _LOSS(y, model(x)).numpy()
  # Perturb example j: other tokens, other length (pads included).
  j = 1
  x2 = x.numpy().copy()
  x2[j] = np.random.default_rng(5).integers(1, V, size=T)
  x2[j, 2:] = 0
  other = _LOSS(y, model(tf.constant(x2))).numpy()
  assert other[j] != pytest.approx(base[j])
  keep = [i for i in range(B) if i != j]
  np.testing.assert_array_equal(other[keep], base[keep])


def test_padding_positions_are_ignored():
  # An example's output does not depend on what sits at its padded positions
  # (the key mask and the pooling mask are applied per example).
  model = _tiny()
  x = np.full((2, T), 0, np.int32)
  x[:, :3] = [[3, 4, 5], [3, 4, 5]]
  logits = model(tf.constant(x)).numpy()
  np.testing.assert_allclose(logits[0], logits[1], rtol=1e-6)
  # An example whose padding is replaced by ids changes (sanity).
  x[1, 3:] = 7
  logits2 = model(tf.constant(x)).numpy()
  assert not np.allclose(logits2[0], logits2[1])


def test_every_projection_is_quantizable():
  per_block = ["query", "key", "value", "attn_out", "ffn_in", "ffn_out"]
  names = [l.name for l in quantization.quantizable_layers(_tiny(num_layers=2))]
  assert sorted(names) == sorted(
      [f"b{i}_{p}" for i in (1, 2) for p in per_block] + ["pooler", "logits"])
  expected = [f"b1_{p}" for p in per_block] + ["pooler", "logits"]
  q = quantization.quantize_model(_tiny(num_layers=1))
  assert sorted(l.layer.name for l in quantization.quantized_layers(q)) == sorted(
      expected)
  # Projections see [B, T, D]: MACs count every position.
  infos = {l.name: l for l in quantization.quantizable_layers(q)}
  assert infos["b1_query"].fwd_macs == T * 8 * 8
  assert infos["logits"].fwd_macs == 8 * C


def test_presets_and_build_model():
  mini = models.build_model("transformer_mini", (16,), 4, vocab_size=50)
  ln = [l for l in mini.layers if l.name.endswith("_ffn_ln")]
  assert len(ln) == 4
  assert mini.get_layer("b1_query").kernel.shape == (256, 256)
  assert mini.get_layer("b1_ffn_in").kernel.shape == (256, 1024)
  tiny = models.build_model("transformer", (16,), 4, vocab_size=50)
  assert tiny.get_layer("b1_query").kernel.shape == (64, 64)
  with pytest.raises(ValueError, match="vocab_size"):
    models.build_model("transformer", (16,), 4)
  with pytest.raises(ValueError, match="vocab_size"):
    models.build_model("cnn", (28, 28, 1), 10, vocab_size=5)
  with pytest.raises(ValueError, match="hidden"):
    models.transformer_classifier((8,), 2, vocab_size=9, hidden=10, num_heads=4)
  with pytest.raises(ValueError, match="preset"):
    models.transformer_classifier((8,), 2, vocab_size=9, preset="huge")


def test_schedule_picks_among_the_encoder_projections():
  from dpquant_tf import schedule  # pylint: disable=g-import-not-at-top
  layers = quantization.quantizable_layers(_tiny(num_layers=2))
  names = [l.name for l in layers]
  rng = np.random.default_rng(0)
  rotation = schedule.RotationPolicy(ratio=0.5)
  seen = set()
  for epoch in range(12):
    chosen = rotation.decide(epoch, layers, schedule.Releases(), rng).quantized
    assert len(chosen) == schedule._base.num_quantized(0.5, len(names))  # pylint: disable=protected-access
    assert set(chosen) <= set(names)
    seen |= set(chosen)
  assert seen == set(names)   # every projection of every block is drawn
  # Loss-aware: a released sensitivity steers the choice away from a layer.
  estimates = {n: 0.0 for n in names}
  estimates["b2_value"] = 10.0
  released = schedule.Releases(
      sensitivities=[schedule.SensitivityRelease(0, estimates)])
  aware = schedule.LossAwarePolicy(ratio=0.75, beta=50.0)
  for epoch in range(3):
    chosen = aware.decide(epoch, layers, released, rng).quantized
    assert len(chosen) == schedule._base.num_quantized(0.75, len(names))  # pylint: disable=protected-access
    assert "b2_value" not in chosen


def test_cost_model_counts_attention_products():
  from dpquant_tf import costmodel  # pylint: disable=g-import-not-at-top
  d = 8
  model = _tiny(num_layers=2, hidden=d)
  att = costmodel.attention_costs(model)
  assert [c.name for c in att] == ["b1_attention", "b2_attention"]
  assert att[0].fwd_macs == 2 * T * T * d     # Q K^T and A V
  assert att[0].bwd_macs == 2 * att[0].fwd_macs
  costs = costmodel.model_layer_costs(model)
  assert [c.name for c in costs[-2:]] == ["b1_attention", "b2_attention"]
  proj = [c for c in costs if c.name not in ("b1_attention", "b2_attention")]
  # Quantizing every projection leaves the attention products in fp32.
  all_on = {c.name: "fp4" for c in proj}
  cost = costmodel.epoch_cost(costs, all_on)
  total = sum(c.total for c in costs)
  assert cost.quantized_fraction == pytest.approx(
      sum(c.total for c in proj) / total)
  assert costmodel.attention_costs(models.tutorial_cnn()) == []


_SERVE = textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow as tf
    fn = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
    ids = np.load(sys.argv[2])
    probs = fn(token_ids=tf.constant(ids))["probabilities"].numpy()
    assert "dpquant_tf" not in sys.modules
    np.save(sys.argv[3], probs)
""")


@pytest.mark.slow
def test_export_serves_token_ids_without_dpquant_tf(tmp_path):
  from examples import serve_lib  # pylint: disable=g-import-not-at-top
  model = _wrapped(_tiny(num_layers=1))
  x, _ = _data()
  expected = tf.nn.softmax(model(x)).numpy()
  serve_lib.export_for_serving(model, str(tmp_path / "export"))
  np.save(tmp_path / "ids.npy", x.numpy())
  script = tmp_path / "serve.py"
  script.write_text(_SERVE)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  subprocess.run([sys.executable, str(script), str(tmp_path / "export"),
                  str(tmp_path / "ids.npy"), str(tmp_path / "probs.npy")],
                 check=True, env=env, cwd=str(tmp_path), timeout=300)
  np.testing.assert_allclose(np.load(tmp_path / "probs.npy"), expected,
                             rtol=1e-5, atol=1e-6)

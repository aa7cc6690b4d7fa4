"""dpquant_tf.export_for_serving and inference without the training plan.

Issue 23 item 1: after `quantize_model` + fit the last plan stayed switched
on, so `model.predict` differed by about 0.21 between two calls on the same
input and `tf.saved_model.save(model)` served stochastic INT4. Inference
(`training=False`) now runs the plain layers; the library export is atomic and
loadable by a process that never imports dpquant_tf.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

import dpquant_tf
from dpquant_tf import quantization

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _quantized_cnn():
  """A small conv net, every layer quantized (INT4/LUQ-FP4, stochastic)."""
  inputs = tf.keras.Input((8, 8, 1))
  h = tf.keras.layers.Conv2D(4, 3, activation="relu")(inputs)
  h = tf.keras.layers.Flatten()(h)
  h = tf.keras.layers.Dense(16, activation="relu")(h)
  model = quantization.quantize_model(
      tf.keras.Model(inputs, tf.keras.layers.Dense(10)(h)))
  x = np.random.default_rng(0).random((8, 8, 8, 1)).astype(np.float32)
  model(x)
  return model, x


def _tiny_model():
  inputs = tf.keras.Input((3,))
  return tf.keras.Model(inputs, tf.keras.layers.Dense(2)(inputs))


def _plain_logits(model, x):
  names = [i.name for i in quantization.quantizable_layers(model)]
  saved = quantization.get_plan(model)
  quantization.set_plan(model, quantization.QuantPlan.select(names, []))
  out = model(x, training=True).numpy()
  quantization.set_plan(model, saved)
  return out


def test_predict_is_deterministic_and_full_precision_with_a_plan_on():
  model, x = _quantized_cnn()
  first, second = model.predict(x, verbose=0), model.predict(x, verbose=0)
  # Was 0.21 apart on 7fbe6b6 (stochastic INT4 in predict).
  np.testing.assert_array_equal(first, second)
  np.testing.assert_allclose(first, _plain_logits(model, x), atol=1e-5)
  assert quantization.get_plan(model).enabled_layers  # the plan stays set
  # Training calls still run the plan (stochastic rounding: two calls differ).
  assert np.abs(model(x, training=True) - model(x, training=True)).max() > 1e-3


@pytest.mark.slow  # tf.saved_model.save of a Keras model traces a lot
def test_keras_saved_model_serves_without_the_plan(tmp_path):
  model, x = _quantized_cnn()
  tf.saved_model.save(model, str(tmp_path / "sm"))
  serve = tf.saved_model.load(str(tmp_path / "sm")).signatures["serving_default"]
  outs = [list(serve(tf.constant(x)).values())[0].numpy() for _ in range(2)]
  np.testing.assert_array_equal(outs[0], outs[1])  # 0.23 apart on 7fbe6b6
  np.testing.assert_allclose(outs[0], _plain_logits(model, x), atol=1e-5)


@pytest.mark.slow  # a second Python process imports TensorFlow
def test_export_loads_and_serves_in_a_process_without_dpquant_tf(tmp_path):
  model, x = _quantized_cnn()
  path = dpquant_tf.export_for_serving(model, str(tmp_path / "export"),
                                       output="probabilities")
  assert sorted(os.listdir(tmp_path)) == ["export"]  # no temporary left
  np.save(tmp_path / "x.npy", x)
  script = textwrap.dedent(f"""
      import sys, numpy as np, tensorflow as tf
      f = tf.saved_model.load({path!r}).signatures["serving_default"]
      x = np.load({str(tmp_path / "x.npy")!r})
      a = f(inputs=tf.constant(x))["probabilities"].numpy()
      b = f(inputs=tf.constant(x))["probabilities"].numpy()
      assert "dpquant_tf" not in sys.modules
      np.save({str(tmp_path / "out.npy")!r}, np.stack([a, b]))
      """)
  env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
  env["PYTHONPATH"] = ""
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True,
                        text=True, timeout=120, env=env, cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  a, b = np.load(tmp_path / "out.npy")
  np.testing.assert_array_equal(a, b)
  expected = tf.nn.softmax(_plain_logits(model, x)).numpy()
  np.testing.assert_allclose(a, expected, atol=1e-6)


def test_bfloat16_export_stores_bfloat16_weights_and_is_close(tmp_path):
  model, x = _quantized_cnn()
  path = dpquant_tf.export_for_serving(model, str(tmp_path / "bf16"),
                                       precision="bfloat16")
  names = tf.train.list_variables(os.path.join(path, "variables", "variables"))
  reader = tf.train.load_checkpoint(os.path.join(path, "variables", "variables"))
  dtypes = {reader.get_variable_to_dtype_map()[n] for n, _ in names
            if n != "_CHECKPOINTABLE_OBJECT_GRAPH"}
  assert dtypes == {tf.bfloat16}
  serve = tf.saved_model.load(path).signatures["serving_default"]
  got = serve(inputs=tf.constant(x))["logits"]
  assert got.dtype == tf.float32
  # bfloat16 keeps 8 significant bits: relative error of a few 2^-8.
  ref = _plain_logits(model, x)
  np.testing.assert_allclose(got.numpy(), ref, atol=0.05 * np.abs(ref).max())


class _FailsInGraph(tf.keras.layers.Layer):
  """Raises when traced once armed (after the model is built)."""

  armed = False

  def call(self, inputs):
    if self.armed and not tf.executing_eagerly():
      raise RuntimeError("this layer cannot be traced")
    return inputs


def test_failed_export_removes_its_partial_directory(tmp_path):
  inputs = tf.keras.Input((3,))
  model = tf.keras.Model(inputs, tf.keras.layers.Dense(2)(_FailsInGraph()(inputs)))
  _FailsInGraph.armed = True
  with pytest.raises(OSError, match=r"(?s)writing the SavedModel to .*out.* "
                     r"failed \(RuntimeError: .*this layer cannot be traced.*\); "
                     r"the partial export was removed"):
    dpquant_tf.export_for_serving(model, str(tmp_path / "out"))
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("make, match", [
    (lambda p: p.write_text("x"), "to be a directory, but it is an existing file"),
    (lambda p: (p.mkdir(), (p / "f").write_text("x")),
     "to be an empty or absent directory"),
])
def test_bad_path_refused_before_any_work(tmp_path, make, match):
  model = _tiny_model()
  target = tmp_path / "target"
  make(target)
  before = sorted(os.listdir(tmp_path))
  with pytest.raises(ValueError, match=match):
    dpquant_tf.export_for_serving(model, str(target))
  assert sorted(os.listdir(tmp_path)) == before


def test_parent_is_a_file_refused(tmp_path):
  model = _tiny_model()
  (tmp_path / "file").write_text("x")
  with pytest.raises(ValueError, match="is a file"):
    dpquant_tf.export_for_serving(model, str(tmp_path / "file" / "sub"))


def test_overwrite_replaces_an_export_and_empty_dir_is_accepted(tmp_path):
  model, x = _quantized_cnn()
  target = tmp_path / "t"
  target.mkdir()
  dpquant_tf.export_for_serving(model, str(target))
  dpquant_tf.export_for_serving(model, str(target), overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["t"]
  serve = tf.saved_model.load(str(target)).signatures["serving_default"]
  np.testing.assert_allclose(serve(inputs=tf.constant(x))["logits"].numpy(),
                             _plain_logits(model, x), atol=1e-5)


def test_bad_arguments_name_the_argument(tmp_path):
  model = _tiny_model()
  with pytest.raises(ValueError, match="Expected precision='int4' to be one of"):
    dpquant_tf.export_for_serving(model, str(tmp_path / "a"), precision="int4")
  with pytest.raises(TypeError, match="Expected model=.* tf.keras.Model"):
    dpquant_tf.export_for_serving(object(), str(tmp_path / "a"))
  assert os.listdir(tmp_path) == []


def test_tapped_groupnorm_model_exports_with_activation(tmp_path):
  from dpquant_tf import perexample  # pylint: disable=import-outside-toplevel
  inputs = tf.keras.Input((4,))
  h = tf.keras.layers.Dense(6, activation="relu")(inputs)
  out = tf.keras.layers.GroupNormalization(groups=2)(h)
  plain = tf.keras.Model(inputs, tf.keras.layers.Dense(3, activation="tanh")(out))
  tapped = perexample.tap_model(plain)
  x = np.random.default_rng(2).normal(size=(5, 4)).astype(np.float32)
  path = dpquant_tf.export_for_serving(tapped, str(tmp_path / "e"))
  serve = tf.saved_model.load(path).signatures["serving_default"]
  np.testing.assert_allclose(serve(inputs=tf.constant(x))["logits"].numpy(),
                             plain(x, training=False).numpy(), atol=1e-6)


def test_readme_export_section_runs_as_written(tmp_path):
  import pathlib  # pylint: disable=import-outside-toplevel
  import re  # pylint: disable=import-outside-toplevel
  text = (pathlib.Path(REPO) / "README.md").read_text()
  section = text[text.index("## Export for serving"):]
  section = section[:section.index("\n## ", 1)]
  blocks = re.findall(r"```python\n(.*?)```", section, re.S)
  assert len(blocks) == 2, blocks
  inputs = tf.keras.Input((28, 28, 1))
  model = quantization.quantize_model(tf.keras.Model(
      inputs, tf.keras.layers.Dense(10)(tf.keras.layers.Flatten()(inputs))))
  namespace = {"dpquant_tf": dpquant_tf, "model": model}
  for block in blocks:
    code = block.replace("/tmp/dpquant_export", str(tmp_path / "export"))
    exec(compile(code, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  probs = namespace["probs"].numpy()
  assert probs.shape == (1, 10)
  np.testing.assert_allclose(probs.sum(), 1.0, atol=1e-5)

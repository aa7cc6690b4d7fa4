"""Issue 23: the first hour of a practitioner (train.py, data, warnings).

Every test here reproduces one problem of the issue through the public API;
each failed on 7fbe6b6 (see the report of branch wt/firsthour): output paths
checked only after training, the metrics JSON written last, silent labels /
ratio=0 / batch clamp / noise 0 / budget stop / all-NaN data, Keras 3 objects
not named, `import tensorflow_privacy` empty after `import dpquant_tf`.
"""

import glob
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import dpquant_tf
from dpquant_tf import data as dp_data
from dpquant_tf import privacy
from examples import train_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(REPO, "examples", "train.py")
SERVE = os.path.join(REPO, "examples", "serve.py")
TINY = dict(dataset="digits", max_train=64, max_test=16, batch_size=16,
            epochs=1, verbose=0, seed=0)
TINY_FLAGS = [f"--{k}={v}" for k, v in TINY.items()]


def _run(script, args, timeout=300):
  return subprocess.run([sys.executable, script] + list(args), cwd=REPO,
                        capture_output=True, text=True, timeout=timeout,
                        check=False)


def _user_lines(stderr):
  return [l for l in stderr.splitlines()
          if l.strip() and not re.match(r"[IWEF]\d{4} ", l)
          and "absl::" not in l and "rebuild TensorFlow" not in l]


# -- item 2: nothing lost ------------------------------------------------------

@pytest.mark.parametrize("field, make, expected", [
    ("export_dir", lambda p: p.write_text("x"), "is an existing file"),
    ("export_dir", lambda p: (p.mkdir(), (p / "saved_model.pb").write_text("")),
     "an empty or absent directory"),
    ("metrics_json", lambda p: p.mkdir(), "a file path, not a directory"),
    ("tensorboard_dir", lambda p: p.write_text("x"), "is an existing file"),
])
def test_bad_output_path_refused_at_validation(tmp_path, field, make, expected):
  target = tmp_path / "out"
  make(target)
  with pytest.raises(ValueError, match=f"Expected {field}=.*{expected}"):
    train_lib.TrainConfig(**{field: str(target)}).validate()


@pytest.mark.parametrize("field", ["export_dir", "metrics_json",
                                   "tensorboard_dir"])
def test_output_path_under_a_file_refused_at_validation(tmp_path, field):
  (tmp_path / "file").write_text("x")
  with pytest.raises(ValueError, match=f"Expected {field}=.*is a file"):
    train_lib.TrainConfig(**{field: str(tmp_path / "file" / "x")}).validate()
  assert os.listdir(tmp_path) == ["file"]


def test_bad_export_dir_refused_before_training(tmp_path):
  (tmp_path / "export").write_text("not a directory")
  metrics = tmp_path / "m.json"
  proc = _run(TRAIN, TINY_FLAGS + [f"--export_dir={tmp_path / 'export'}",
                                   f"--metrics_json={metrics}"])
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  assert _user_lines(proc.stderr) == [
      f"train.py: flag --export_dir: Expected export_dir="
      f"'{tmp_path / 'export'}' to be a directory, but it is an existing file."]
  assert "Data:" not in proc.stdout and "Test accuracy" not in proc.stdout
  assert not metrics.exists()


def _npz(path, x_train, y_train, x_test=None, y_test=None):
  x_test = x_train[:4] if x_test is None else x_test
  y_test = y_train[:4] if y_test is None else y_test
  np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test,
           y_test=y_test)
  return f"npz:{path}"


def test_metrics_json_written_first_and_all_nan_data_refused(tmp_path):
  x = np.full((32, 28, 28, 1), np.nan, np.float32)
  spec = _npz(tmp_path / "nan.npz", x, np.arange(32) % 4,
              x_test=np.zeros((4, 28, 28, 1), np.float32))
  metrics = tmp_path / "m.json"
  cfg = train_lib.TrainConfig(dataset=spec, epochs=1, batch_size=8,
                              verbose=0, metrics_json=str(metrics),
                              policy="none")
  with pytest.raises(ValueError, match=r"Expected dataset='npz:.*' to be "
                     r"training data with finite values \(all 32 training "
                     r"examples hold NaN or inf\)"):
    train_lib.train(cfg)
  record = json.loads(metrics.read_text())
  assert record["status"] == "started"
  assert record["config"]["dataset"] == spec
  assert sorted(os.listdir(tmp_path)) == ["m.json", "nan.npz"]  # no temp file


# -- item 4: say it once, clearly -----------------------------------------------

def test_labels_with_a_stray_value_are_refused(tmp_path):
  y = np.concatenate([np.arange(1, 11).repeat(3), [57]])
  spec = _npz(tmp_path / "y.npz", np.zeros((31, 8, 8, 1), np.float32), y)
  with pytest.raises(ValueError, match=r"Expected labels='11 distinct values "
                     r"in \[1, 57\]' to be the contiguous classes 0..K-1 \(47 "
                     r"of 0..57 never occur: 0, 11, 12, 13, 14, ...\)"):
    dp_data.load_dataset(spec)
  ok = _npz(tmp_path / "ok.npz", np.zeros((30, 8, 8, 1), np.float32),
            np.arange(30) % 10)
  assert dp_data.load_dataset(ok).num_classes == 10


def test_noise_zero_with_dp_is_refused():
  with pytest.raises(ValueError, match=r"Expected noise_multiplier=0.0 to be "
                     r"> 0 when dp=True \(noise 0 is NOT private"):
    train_lib.TrainConfig(target_epsilon=None, noise_multiplier=0.0).validate()


@pytest.mark.slow  # a DP training run with the tutorial CNN
def test_ratio_zero_spends_nothing_on_analyses_and_batch_clamp_warns(capsys):
  result = train_lib.train(train_lib.TrainConfig(
      **dict(TINY, batch_size=100), policy="loss_aware", ratio=0.0,
      target_epsilon=8.0))
  out, err = capsys.readouterr()
  assert "ratio=0: no layer is quantized, so no schedule and no " \
         "loss-sensitivity analysis run" in out
  assert ("WARNING: batch_size=100 is larger than the 64 training examples: "
          "using 64") in err
  assert result.metrics["analysis_share"] == 0.0  # > 0 on 7fbe6b6
  assert all(p["analysis"] is None for p in result.metrics["plan_per_epoch"])


def test_budget_stop_says_why(capsys):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 6)).astype("float32")
  y = rng.integers(0, 3, size=64)
  ledger = privacy.PrivacyLedger()
  opt = dpquant_tf.DPQuantOptimizer(1.0, 2.0, ledger=ledger, dataset_size=64)
  model = tf.keras.Sequential([tf.keras.layers.Dense(3, input_shape=(6,))])
  model.compile(optimizer=opt, loss=tf.keras.losses.SparseCategoricalCrossentropy(
      from_logits=True, reduction="none"))
  one = privacy.PrivacyLedger()
  one.record(privacy.gaussian_event(2.0), kind="train")  # one step's worth
  cb = privacy.PrivacyCallback(ledger, 1e-5,
                               budget_epsilon=one.epsilon(1e-5) * 1.01)
  model.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[cb])
  assert cb.stopped_for_budget
  err = capsys.readouterr().err
  assert err.count("PrivacyCallback: stopping training: the next") == 1, err
  assert "would take epsilon past budget_epsilon=" in err


def test_keras3_objects_are_named_with_the_fix():
  import keras  # pylint: disable=import-outside-toplevel
  model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
  for call in (lambda: dpquant_tf.quantize_model(model),
               lambda: dpquant_tf.export_for_serving(model, "/nonexistent/x")):
    with pytest.raises(TypeError, match=r"It is a Keras 3 object \(keras\..*"
                       r"Sequential\); dpquant_tf needs Keras 2 \(tf-keras\): "
                       r"import dpquant_tf first and build it with tf.keras"):
      call()


def test_tensorflow_privacy_import_after_dpquant_tf_has_its_names():
  import tensorflow_privacy  # pylint: disable=import-outside-toplevel
  assert "GaussianSumQuery" in dir(tensorflow_privacy)
  from tensorflow_privacy.privacy.dp_query import gaussian_query  # pylint: disable=import-outside-toplevel
  assert tensorflow_privacy.GaussianSumQuery is gaussian_query.GaussianSumQuery
  assert callable(tensorflow_privacy.compute_dp_sgd_privacy_statement)
  assert callable(tensorflow_privacy.DPKerasSGDOptimizer)
  with pytest.raises(AttributeError, match="DNNClassifier is unavailable in "
                     "this environment"):
    getattr(tensorflow_privacy, "DNNClassifier")


# -- TensorBoard, and the new-user walk-through -----------------------------------

@pytest.mark.slow  # a training run with the tutorial CNN
def test_tensorboard_dir_end_to_end(tmp_path):
  tb = tmp_path / "tb"
  train_lib.train(train_lib.TrainConfig(**TINY, policy="none",
                                        tensorboard_dir=str(tb)))
  events = glob.glob(str(tb / "**" / "events.out.tfevents.*"), recursive=True)
  assert events, os.listdir(tb)
  tags = set()
  for path in events:
    for record in tf.compat.v1.train.summary_iterator(path):
      tags.update(v.tag for v in record.summary.value)
  assert {"epoch_loss", "epoch_epsilon"} <= tags, tags


@pytest.mark.slow
def test_new_user_walk_through(tmp_path):
  """README only: train with export and metrics, serve, reload elsewhere."""
  export, metrics = tmp_path / "export", tmp_path / "metrics.json"
  # A bad --export_dir is refused before training (exit 2, one line).
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "f").write_text("x")
  proc = _run(TRAIN, TINY_FLAGS + [f"--export_dir={tmp_path / 'busy'}"])
  assert proc.returncode == 2 and "Data:" not in proc.stdout, proc.stderr[-2000:]
  proc = _run(TRAIN, TINY_FLAGS + ["--policy=static", "--ratio=0.5",
                                   f"--export_dir={export}",
                                   f"--metrics_json={metrics}",
                                   f"--tensorboard_dir={tmp_path / 'tb'}"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  record = json.loads(metrics.read_text())
  assert record["status"] == "finished" and record["export_dir"] == str(export)
  proc = _run(SERVE, [f"--export_dir={export}", "--dataset=digits",
                      "--max_test=16", "--num_examples=2"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  # Deterministic serving, loaded by a process that never imports dpquant_tf.
  script = (
      "import sys, numpy as np, tensorflow as tf\n"
      f"f = tf.saved_model.load({str(export)!r}).signatures['serving_default']\n"
      "x = tf.constant(np.random.default_rng(0).random((4, 28, 28, 1)), tf.float32)\n"
      "a, b = (f(images=x)['probabilities'].numpy() for _ in range(2))\n"
      "assert 'dpquant_tf' not in sys.modules\n"
      "assert (a == b).all(), abs(a - b).max()\n"
      "print('deterministic', a.shape)\n")
  env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True,
                        text=True, timeout=300, env=dict(env, PYTHONPATH=""),
                        cwd=str(tmp_path), check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "deterministic (4, 10)" in proc.stdout

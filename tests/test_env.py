"""Tests of the environment checks that `import dpquant_tf` runs (dpquant_tf/_env.py).

Keras and TF-Privacy behaviour is fixed when TensorFlow is first imported, so
every situation runs in a fresh Python subprocess with a controlled
environment (this test process itself already imported dpquant_tf).
"""

import os
import subprocess
import sys
import textwrap

import dpquant_tf
from dpquant_tf import _env
import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(dpquant_tf.__file__)))
_KERAS3_MESSAGE = "TensorFlow was already imported with Keras 3 active"


def _run(code, *, env_updates=None, tmp_path):
  """Runs `code` in a fresh interpreter with TF_USE_LEGACY_KERAS unset."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("TF_USE_LEGACY_KERAS", "KERAS_BACKEND")}
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  env.update(env_updates or {})
  return subprocess.run(
      [sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=tmp_path,
      stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240,
      check=False)


def test_fresh_process_gets_keras_2_without_any_environment(tmp_path):
  result = _run("""
      import os
      import dpquant_tf
      import tensorflow as tf
      import tf_keras
      print("module", tf.keras.__name__)
      print("version", tf_keras.__version__)
      print("env", os.environ["TF_USE_LEGACY_KERAS"])
      # TF-Privacy's optimizers subclass these legacy Keras 2 classes.
      print("legacy", tf.keras.optimizers.legacy.SGD.__module__)
      """, tmp_path=tmp_path)
  assert result.returncode == 0, result.stderr
  lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
  assert lines["module"].startswith("tf_keras"), lines
  assert lines["version"].startswith("2."), lines
  assert lines["env"] == "1"
  assert lines["legacy"].startswith("tf_keras"), lines


def test_keras_3_already_active_gets_a_clear_message(tmp_path):
  result = _run("""
      import tensorflow as tf
      print("before", tf.keras.__name__)   # binds tf.keras to Keras 3
      try:
        import dpquant_tf
      except ImportError as e:
        print("error", type(e).__name__, e, flush=True)
      else:
        print("imported ok", flush=True)
      import dpquant_tf   # again, uncaught: the process must fail
      """, tmp_path=tmp_path)
  lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
  # The control: without dpquant_tf first, tf.keras really is Keras 3 here.
  assert not lines["before"].startswith("tf_keras"), lines
  assert "imported" not in lines
  assert lines["error"].startswith("EnvironmentError_ "), lines
  assert _KERAS3_MESSAGE in lines["error"]
  assert "Import dpquant_tf before tensorflow" in lines["error"]
  assert result.returncode != 0
  assert "dpquant_tf._env.EnvironmentError_" in result.stderr
  assert _KERAS3_MESSAGE in result.stderr


def test_tensorflow_imported_but_keras_untouched_still_gets_keras_2(tmp_path):
  # tf.keras is a lazy loader that reads TF_USE_LEGACY_KERAS on first access,
  # so importing TensorFlow first is fine as long as nothing touched tf.keras.
  result = _run("""
      import tensorflow as tf
      import dpquant_tf
      print(tf.keras.__name__)
      """, tmp_path=tmp_path)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip().startswith("tf_keras")


@pytest.mark.parametrize("value", ["0", "false", "keras3"])
def test_legacy_keras_switched_off_by_the_user_is_refused(tmp_path, value):
  result = _run("""
      try:
        import dpquant_tf
      except ImportError as e:
        print(type(e).__name__, e)
      """, env_updates={"TF_USE_LEGACY_KERAS": value}, tmp_path=tmp_path)
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("EnvironmentError_ "), result.stdout
  assert f"TF_USE_LEGACY_KERAS={value!r}" in result.stdout
  assert "set TF_USE_LEGACY_KERAS=1" in result.stdout


def test_tensorflow_privacy_submodules_import_and_build_an_optimizer(tmp_path):
  result = _run("""
      import dpquant_tf
      import tensorflow as tf
      from tensorflow_privacy.privacy.analysis import compute_dp_sgd_privacy_lib
      from tensorflow_privacy.privacy.dp_query import gaussian_query
      from tensorflow_privacy.privacy.optimizers import dp_optimizer_keras
      opt = dp_optimizer_keras.DPKerasSGDOptimizer(
          l2_norm_clip=1.0, noise_multiplier=1.1, num_microbatches=1,
          learning_rate=0.1)
      print("optimizer", isinstance(opt, tf.keras.optimizers.legacy.SGD))
      print("query", type(gaussian_query.GaussianSumQuery(1.0, 1.0)).__name__)
      print("lib", hasattr(compute_dp_sgd_privacy_lib,
                           "compute_dp_sgd_privacy_statement"))
      """, tmp_path=tmp_path)
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == [
      "optimizer", "True", "query", "GaussianSumQuery", "lib", "True"]


def test_top_level_tensorflow_privacy_import_fails_without_the_switch(tmp_path):
  # The control for the test above: TF-Privacy's own __init__ is broken on
  # TF 2.21, which is why dpquant_tf sets sys.skip_tf_privacy_import.
  result = _run("""
      try:
        import tensorflow_privacy
      except ImportError as e:
        print("broken")
      else:
        print("fine")
      """, env_updates={"TF_USE_LEGACY_KERAS": "1"}, tmp_path=tmp_path)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "broken"
  assert getattr(sys, "skip_tf_privacy_import", False) is True


@pytest.mark.parametrize("version", [(3, 10, 12), (3, 12, 1)])
def test_wrong_python_is_refused(monkeypatch, version):
  monkeypatch.setattr(sys, "version_info", version)
  with pytest.raises(_env.EnvironmentError_, match=r"needs Python 3\.11"):
    _env.setup()


def test_setup_is_idempotent_in_a_keras_2_process():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  _env.setup()
  _env.setup()
  assert tf.keras.__name__.startswith("tf_keras")
  assert os.environ["TF_USE_LEGACY_KERAS"] == "1"

"""examples/train.py --model=transformer: defaults, a short DP run, export."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from examples import train_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_transformer_defaults_are_valid_configs():
  for model, defaults in train_lib.MODEL_DEFAULTS.items():
    cfg = train_lib.TrainConfig(model=model, **defaults).validate()
    assert cfg.dataset == "synthetic_text" and cfg.optimizer == "sgd"
  with pytest.raises(ValueError, match="weight_decay"):
    train_lib.TrainConfig(weight_decay=-0.1).validate()


_SERVE = textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow as tf
    fn = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
    ids = np.zeros((3, int(sys.argv[2])), np.int32)
    ids[:, :5] = [[2, 5, 20, 21, 22], [5, 20, 21, 22, 23], [13, 2, 20, 21, 0]]
    probs = fn(token_ids=tf.constant(ids))["probabilities"].numpy()
    assert probs.shape == (3, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)
    # Raw strings (the synthetic task's public words) serve the same ids.
    texts = tf.saved_model.load(sys.argv[1]).signatures["serve_texts"]
    words = ["not excellent a movie film", "Excellent a movie, film plot!",
             "poor not a movie"]
    by_text = texts(texts=tf.constant(words))["probabilities"].numpy()
    assert np.array_equal(by_text, probs), (by_text, probs)
    assert "dpquant_tf" not in sys.modules
    print("served", probs.argmax(1))
""")


@pytest.mark.slow
def test_train_binary_transformer_dp_run_exports_servable_model(tmp_path):
  metrics = tmp_path / "metrics.json"
  export = tmp_path / "export"
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "examples", "train.py"),
       "--model=transformer", "--max_train=1024", "--max_test=256",
       "--epochs=2", "--batch_size=128", "--verbose=0",
       f"--metrics_json={metrics}", f"--export_dir={export}"],
      capture_output=True, text=True, timeout=1800, cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "jacobian fallback for" not in proc.stderr + proc.stdout
  assert ("fast path for every trainable variable (no jacobian fallback)"
          in proc.stdout)
  assert "Test accuracy:" in proc.stdout and "SYNTHETIC" in proc.stdout
  m = json.loads(metrics.read_text())
  assert m["jacobian_fallback"] == []
  assert m["epsilon"] <= 8.0 + 1e-9 and m["config"]["optimizer"] == "sgd"
  assert any(l["name"] == "b1_attention" for l in m["layers"])
  script = tmp_path / "serve.py"
  script.write_text(_SERVE)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  served = subprocess.run([sys.executable, str(script), str(export), "24"],
                          capture_output=True, text=True, timeout=600,
                          env=env, cwd=str(tmp_path))
  assert served.returncode == 0, served.stderr[-3000:]
  assert "served" in served.stdout

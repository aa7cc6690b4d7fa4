"""Raw-string serving of text models (issue 22 item 5).

A token-id model exported with a public tokenizer (one that learned nothing
from private texts: the synthetic task's made-up words, or hashing) serves raw
strings through a ``serve_texts`` signature, in a process that never imports
dpquant_tf, with the same outputs as its token-id signature.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

import dpquant_tf
from dpquant_tf import data
from dpquant_tf import export


def _text_model(t=24):
  tf.keras.utils.set_random_seed(0)
  ids = tf.keras.Input((t,), dtype=tf.int32)
  h = tf.keras.layers.Embedding(data.SYNTHETIC_TEXT_WORDS.__len__() + 2, 8)(ids)
  h = tf.keras.layers.GlobalAveragePooling1D()(h)
  return tf.keras.Model(ids, tf.keras.layers.Dense(2)(h))


def test_synthetic_words_round_trip_through_the_public_tokenizer():
  ids, _ = data.synthetic_negation_task(50, seed=4)
  tok = data.public_tokenizer("synthetic_text", vocab_size=64, max_length=24)
  np.testing.assert_array_equal(tok(np.array(data.synthetic_texts(ids))).numpy(), ids)
  # Unknown words are id 1 (out of vocabulary), never a real word's id.
  assert tok(np.array(["zebra good"])).numpy()[0, :2].tolist() == [1, 3]
  assert data.public_tokenizer("npz:/x.npz", vocab_size=10, max_length=4) is None
  assert isinstance(data.public_tokenizer("tfds:imdb_reviews", vocab_size=100,
                                          max_length=8), data.HashingTokenizer)


def test_public_tokenizer_and_synthetic_texts_reject_bad_arguments():
  with pytest.raises(ValueError, match="vocab_size"):
    data.public_tokenizer("synthetic_text", vocab_size=100, max_length=24)
  with pytest.raises(ValueError, match="max_length"):
    data.public_tokenizer("synthetic_text", vocab_size=64, max_length=0)
  with pytest.raises(ValueError, match="ids"):
    data.synthetic_texts(np.array([[1, 2]]))   # 1 is no word
  with pytest.raises(ValueError, match="ids"):
    data.synthetic_texts(np.array([2, 3]))     # not 2-D


def test_export_rejects_a_tokenizer_that_does_not_fit_the_model(tmp_path):
  model = _text_model(t=24)
  wrong_length = data.public_tokenizer("synthetic_text", vocab_size=64, max_length=12)
  with pytest.raises(ValueError, match=r"tokenizer.*\[B, 24\]"):
    dpquant_tf.export_for_serving(model, str(tmp_path / "a"), tokenizer=wrong_length)
  with pytest.raises(TypeError, match="tokenizer"):
    dpquant_tf.export_for_serving(model, str(tmp_path / "b"), tokenizer="words")
  images = tf.keras.Model(i := tf.keras.Input((3,)), tf.keras.layers.Dense(2)(i))
  with pytest.raises(ValueError, match="not token ids"):
    dpquant_tf.export_for_serving(
        images, str(tmp_path / "c"),
        tokenizer=data.public_tokenizer("synthetic_text", vocab_size=64, max_length=24))
  assert not os.listdir(tmp_path)   # nothing written before the checks


@pytest.mark.slow   # a second Python process imports TensorFlow
def test_raw_strings_serve_like_their_ids_without_dpquant_tf(tmp_path):
  model = _text_model()
  tok = data.public_tokenizer("synthetic_text", vocab_size=64, max_length=24)
  path = dpquant_tf.export_for_serving(model, str(tmp_path / "export"),
                                       input_name="token_ids",
                                       output="probabilities", tokenizer=tok)
  ids, _ = data.synthetic_negation_task(6, seed=7)
  texts = data.synthetic_texts(ids)
  np.save(tmp_path / "ids.npy", ids)
  script = textwrap.dedent(f"""
      import sys, numpy as np, tensorflow as tf
      m = tf.saved_model.load({path!r})
      ids = np.load({str(tmp_path / "ids.npy")!r})
      by_ids = m.signatures["serving_default"](token_ids=tf.constant(ids))
      by_text = m.signatures[{export.TEXT_SIGNATURE_KEY!r}](
          texts=tf.constant({texts!r}))
      assert "dpquant_tf" not in sys.modules
      np.save({str(tmp_path / "out.npy")!r},
              np.stack([by_ids["probabilities"].numpy(),
                        by_text["probabilities"].numpy()]))
      """)
  env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
  env["PYTHONPATH"] = ""
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True,
                        text=True, timeout=300, env=env, cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  by_ids, by_text = np.load(tmp_path / "out.npy")
  np.testing.assert_array_equal(by_ids, by_text)
  expected = tf.nn.softmax(model(ids, training=False)).numpy()
  np.testing.assert_allclose(by_ids, expected, atol=1e-6)

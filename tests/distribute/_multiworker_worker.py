"""One worker of the loopback MultiWorkerMirroredStrategy test.

Run by `test_distribute_multiworker.py` through
`dpquant_tf.distribute.run_local_cluster` (TF_CONFIG set per process). Prints
one line `RESULT <json>`: the weights after a noise-free fit and the noise
measured in a noise-only step.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from dpquant_tf import distribute  # noqa: E402  (Keras 2 before TF)

distribute.install_watchdog()

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tests.distribute import _factories  # noqa: E402
from tests.distribute import _helpers  # noqa: E402


def main(kind):
  strategy = distribute.make_strategy("multiworker")
  x, y = _helpers.data(n=8)
  weights = _helpers.one_step_update(
      strategy, _factories.optimizer(kind, noise_multiplier=0.0), x, y,
      units=3, steps=2)
  zeros_x = np.zeros((8, 4), np.float32)
  zeros_y = np.zeros((8, 400), np.float32)
  (noise_delta,) = _helpers.one_step_update(
      strategy, _factories.optimizer(kind, noise_multiplier=_factories.SIGMA,
                                     seed=None),
      zeros_x, zeros_y, units=400, use_bias=False)
  result = {
      "task": json.loads(os.environ["TF_CONFIG"])["task"]["index"],
      "replicas": strategy.num_replicas_in_sync,
      "deltas": [w.tolist() for w in weights],
      "noise_std": float((-noise_delta * 8).std()),
      "noise_first": float(noise_delta.ravel()[0]),
      "noise_size": int(noise_delta.size),
  }
  print("RESULT " + json.dumps(result), flush=True)
  # Let the peers finish their collectives before this process exits.
  tf.keras.backend.clear_session()


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "prototype")

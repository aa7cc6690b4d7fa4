"""Runs the mechanism audit under MirroredStrategy on 2 logical CPUs.

A separate process: TensorFlow fixes its devices when it initializes.
Prints one JSON line: {variant: result}.
"""

import json
import sys

import dpquant_tf
from dpquant_tf import audit
from dpquant_tf import distribute


def main(trials: int, variants: str) -> None:
  distribute.configure_cpu_devices(2)
  # pylint: disable=g-import-not-at-top
  import tensorflow as tf
  from tests.audit import _broken
  classes = {"ok": dpquant_tf.DPQuantOptimizer,
             "nonoise": _broken.NoNoiseOptimizer}
  strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
  out = {}
  for variant in variants.split(","):
    result = audit.audit_mechanism(trials=trials, noise_multiplier=4.0,
                                   strategy=strategy,
                                   optimizer_cls=classes[variant])
    out[variant] = {
        "replicas": strategy.num_replicas_in_sync,
        "epsilon_lower_bound": result.epsilon_lower_bound,
        "claimed_epsilon": result.claimed_epsilon,
        "false_positives": result.test.false_positives,
        "false_negatives": result.test.false_negatives}
  print(json.dumps(out))


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2])

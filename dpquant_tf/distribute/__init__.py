"""DPQuant under `tf.distribute`: one global noise draw, global normalization.

See docs/DISTRIBUTED.md. Public names:

* strategies: `StrategyKind`, `make_strategy`, `configure_cpu_devices`,
  `is_multi_worker`, `check_scheduler`, `local_variable`;
* replica-context arithmetic used by the DP optimizers: `num_replicas_in_sync`,
  `replica_noise_stddev`, `add_replica_noise`, `check_generator_strategy`,
  `global_example_count`, `global_normalizer`,
  `update_quantization_guard`;
* Poisson-sampled input with per-worker shards: `poisson_input`,
  `sharded_poisson_dataset_fn`.

The library ships no test harness or research code: the loopback cluster
(`tests/distribute/_cluster.py`), the reference optimizer
(`tests/distribute/_prototype.py`), the traffic model and the packed code-sum
all-reduce (`tools/traffic_lib.py`, `tools/code_sum_packing_lib.py`) live
beside the tests and tools that use them.
"""

from dpquant_tf.distribute._data import poisson_input
from dpquant_tf.distribute._data import sharded_poisson_dataset_fn
from dpquant_tf.distribute._replica import add_replica_noise
from dpquant_tf.distribute._replica import check_generator_strategy
from dpquant_tf.distribute._replica import global_example_count
from dpquant_tf.distribute._replica import global_normalizer
from dpquant_tf.distribute._replica import num_replicas_in_sync
from dpquant_tf.distribute._replica import replica_noise_stddev
from dpquant_tf.distribute._replica import update_quantization_guard
from dpquant_tf.distribute._strategy import check_scheduler
from dpquant_tf.distribute._strategy import configure_cpu_devices
from dpquant_tf.distribute._strategy import is_multi_worker
from dpquant_tf.distribute._strategy import local_variable
from dpquant_tf.distribute._strategy import make_strategy
from dpquant_tf.distribute._strategy import StrategyKind

__all__ = [
    "StrategyKind",
    "add_replica_noise",
    "check_generator_strategy",
    "check_scheduler",
    "configure_cpu_devices",
    "global_example_count",
    "global_normalizer",
    "is_multi_worker",
    "local_variable",
    "make_strategy",
    "num_replicas_in_sync",
    "poisson_input",
    "replica_noise_stddev",
    "sharded_poisson_dataset_fn",
    "update_quantization_guard",
]

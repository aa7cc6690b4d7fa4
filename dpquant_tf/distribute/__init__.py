"""DPQuant under `tf.distribute`: one global noise draw, global normalization.

See docs/DISTRIBUTED.md. Public names:

* strategies: `StrategyKind`, `make_strategy`, `configure_cpu_devices`,
  `is_multi_worker`, `check_scheduler`, `local_variable`;
* replica-context arithmetic used by the DP optimizers: `num_replicas_in_sync`,
  `replica_noise_stddev`, `add_replica_noise`, `check_generator_strategy`,
  `global_example_count`, `global_normalizer`,
  `update_quantization_guard`;
* Poisson-sampled input with per-worker shards: `poisson_input`,
  `sharded_poisson_dataset_fn`;
* a loopback cluster for `MultiWorkerMirroredStrategy`: `run_local_cluster`,
  `free_ports`, `local_tf_config`, `install_watchdog`, `WorkerResult`;
* bytes per step on the wire: `Transport`, `step_traffic`, `TrafficRow`,
  `code_sum_bits`, `ring_factor`; exact all-reduce of b-bit code sums packed
  into int64 words: `pack_layout`, `PackLayout`, `all_reduce_code_sums`;
* the design's reference optimizer `PrototypeDPSGDOptimizer`.
"""

from dpquant_tf.distribute._cluster import free_ports
from dpquant_tf.distribute._cluster import install_watchdog
from dpquant_tf.distribute._cluster import local_tf_config
from dpquant_tf.distribute._cluster import run_local_cluster
from dpquant_tf.distribute._cluster import WorkerResult
from dpquant_tf.distribute._data import poisson_input
from dpquant_tf.distribute._data import sharded_poisson_dataset_fn
from dpquant_tf.distribute._packing import all_reduce_code_sums
from dpquant_tf.distribute._packing import pack_layout
from dpquant_tf.distribute._packing import PackLayout
from dpquant_tf.distribute._prototype import PrototypeDPSGDOptimizer
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
from dpquant_tf.distribute._traffic import code_sum_bits
from dpquant_tf.distribute._traffic import ring_factor
from dpquant_tf.distribute._traffic import step_traffic
from dpquant_tf.distribute._traffic import TrafficRow
from dpquant_tf.distribute._traffic import Transport

__all__ = [
    "PackLayout",
    "PrototypeDPSGDOptimizer",
    "StrategyKind",
    "TrafficRow",
    "Transport",
    "WorkerResult",
    "add_replica_noise",
    "all_reduce_code_sums",
    "check_generator_strategy",
    "check_scheduler",
    "code_sum_bits",
    "configure_cpu_devices",
    "free_ports",
    "global_example_count",
    "global_normalizer",
    "install_watchdog",
    "is_multi_worker",
    "local_tf_config",
    "local_variable",
    "make_strategy",
    "num_replicas_in_sync",
    "pack_layout",
    "poisson_input",
    "replica_noise_stddev",
    "ring_factor",
    "run_local_cluster",
    "sharded_poisson_dataset_fn",
    "step_traffic",
    "update_quantization_guard",
]

"""Bytes per DP step on the wire: float32 vs the schedule's gradient bits.

Logic of tools/benchmark_traffic.py. For a model of dpquant_tf.models and a
bit-ramp schedule (dpquant_tf.schedule.BitRampPolicy), computes for every
epoch the payload one replica sends per step under each
`tools.traffic_lib.Transport`, and the schedule's average. Byte counts
are exact functions of the variable sizes, the bits and the batch; see
tools/traffic_lib.py for the formulas and which transport
dpquant_tf actually runs (float32).
"""

import dataclasses
import json
from typing import Dict, List, Sequence

from dpquant_tf import _validation
from tools import traffic_lib

TRANSPORTS = [t.value for t in traffic_lib.Transport]


@dataclasses.dataclass(frozen=True)
class Settings:
  """What to tabulate."""
  model: str = "cnn"
  input_shape: Sequence[int] = (28, 28, 1)
  num_classes: int = 10
  global_batch: int = 256
  replicas: Sequence[int] = (2, 4)
  b_start: int = 2
  b_end: int = 8
  epochs: int = 7
  ramp: str = "linear"


def model_var_sizes(s: Settings) -> Dict[str, int]:
  """Trainable variable name -> number of coordinates."""
  from dpquant_tf import models  # pylint: disable=g-import-not-at-top
  model = models.build_model(s.model, tuple(s.input_shape), s.num_classes)
  return {v.name: int(v.shape.num_elements())
          for v in model.trainable_variables}


def schedule_bits(s: Settings) -> List[int]:
  """The global gradient bits of every epoch of the ramp."""
  from dpquant_tf import schedule  # pylint: disable=g-import-not-at-top
  policy = schedule.BitRampPolicy(b_start=s.b_start, b_end=s.b_end,
                                  epochs=s.epochs, mode=s.ramp)
  return [int(policy.bits_at(e)) for e in range(s.epochs)]


def run(s: Settings) -> dict:
  """Returns the report: sizes, per-epoch rows and averages per R."""
  _validation.check_int("global_batch", s.global_batch, low=1)
  sizes = model_var_sizes(s)
  d = list(sizes.values())
  bits = schedule_bits(s)
  report = {"model": s.model, "parameters": sum(d),
            "global_batch": s.global_batch, "schedule_bits": bits,
            "by_replicas": []}
  for r in s.replicas:
    rows = []
    for epoch, b in enumerate(bits):
      row = traffic_lib.step_traffic(d, [b] * len(d),
                                    global_batch=s.global_batch,
                                    num_replicas=r)
      rows.append({"epoch": epoch, "bits": b,
                   "payload_bytes": row.payload_bytes,
                   "ratio_vs_float32": row.ratio_vs_float32})
    avg = {t: sum(row["payload_bytes"][t] for row in rows) / len(rows)
           for t in TRANSPORTS}
    report["by_replicas"].append({
        "replicas": r, "ring_factor": traffic_lib.ring_factor(r),
        "per_epoch": rows, "schedule_average_bytes": avg,
        "schedule_average_ratio": {
            t: avg[t] / avg["float32_sum"] for t in TRANSPORTS}})
  return report


def markdown(report: dict) -> str:
  """The report as a Markdown table (bytes per replica per step)."""
  out = [f"Model `{report['model']}` ({report['parameters']:,} parameters), "
         f"global batch {report['global_batch']}, gradient bits per epoch "
         f"{report['schedule_bits']}. Payload bytes one replica sends per "
         "step (ratio to float32).", "",
         "| R | epoch | bits | float32 sum (runs) | b-bit codes per example "
         "+ scale | integer code sum (b-bit transport) | packed int64 code "
         "sum (TF all-reduce) |",
         "|---|---|---|---|---|---|---|"]
  for block in report["by_replicas"]:
    r = block["replicas"]
    for row in block["per_epoch"]:
      p, q = row["payload_bytes"], row["ratio_vs_float32"]
      out.append(
          f"| {r} | {row['epoch']} | {row['bits']} | "
          f"{p['float32_sum']:,} | {p['codes_per_example']:,} "
          f"({q['codes_per_example']:.2f}x) | {p['code_sum']:,} "
          f"({q['code_sum']:.3f}x) | {p['packed_code_sum']:,} "
          f"({q['packed_code_sum']:.3f}x) |")
    a, q = block["schedule_average_bytes"], block["schedule_average_ratio"]
    out.append(
        f"| {r} | average | - | {a['float32_sum']:,.0f} | "
        f"{a['codes_per_example']:,.0f} ({q['codes_per_example']:.2f}x) | "
        f"{a['code_sum']:,.0f} ({q['code_sum']:.3f}x) | "
        f"{a['packed_code_sum']:,.0f} ({q['packed_code_sum']:.3f}x) |")
  return "\n".join(out)


def to_json(report: dict) -> str:
  return json.dumps(report, indent=2, sort_keys=True)

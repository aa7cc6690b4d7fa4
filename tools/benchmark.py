r"""Speed of DP training: plain SGD, TF-Privacy, DPQuantOptimizer (fast path).

  python tools/benchmark.py --json
  python tools/benchmark.py --cases=cnn:64,cnn:256,small_resnet:64 --rounds=7
  python tools/benchmark.py --smoke --cases=cnn:16 --contenders=dp,dp_bf16_100

Native bfloat16 contenders (dp_bf16_50, dp_bf16_75, dp_bf16_100) run the
chosen layers' ops in bfloat16; their speed-up over fp32 DP (``dp``) of the
same run is printed as ``vs dp`` (dp ms / contender ms).

Each case (``model:batch``) runs in worker processes under a resident-memory
watchdog (``--memory_limit_mb``, default 7500, so that no process passes
8 GB): the contenders share one worker while they fit; when a warm-up
crosses the limit, the contenders that fitted are timed in one worker and
the rest in further workers, each beside ``plain`` and ``dp`` (the
references of the ratios; ``worker_groups`` in the JSON). A contender whose
memory, estimated from an earlier case of the same model, would not fit, or
that does not fit beside the references alone, is skipped and listed with
the reason in the case's ``skipped``; ``max_rss_mb_any_worker`` is the
highest resident memory any worker reached. Within a worker every contender
runs on the same model, data and batch, alternating round by round; prints
median ms per step, examples/s, peak
memory and the ratios to plain SGD and to TF-Privacy. With --json it prints one
JSON object whose ``cases`` list holds ``model``, ``batch_size``, ``plain_ms``,
``tfprivacy_ms``, ``dp_ms``, ``dp_quant_ms``, ``skipped``,
``worker_peak_rss_mb``, ``load_average`` and more; ``targets`` says which
of issue 21's bf16 targets (``dp_vs_dp_bf16_100``) are met. The ``encoder``
case is the benchmark's own transformer encoder (tools/benchmark_lib.py,
sequence 128, synthetic tokens): the GEMM-bound case. The logic lives in
tools/benchmark_lib.py; docs/PERFORMANCE.md records results.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dpquant_tf  # noqa: E402,F401  (Keras 2 before TensorFlow)
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from tools import benchmark_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("cases", ["cnn:64", "cnn:256", "small_resnet:64",
                            "small_resnet:256", "encoder:64"],
                  "model:batch pairs; models: cnn, small_resnet, encoder "
                  "(the benchmark's transformer encoder, sequence 128).")
flags.DEFINE_list("contenders", list(benchmark_lib.CONTENDERS),
                  "Subset of plain, tfprivacy, dp, dp_quant, "
                  "dp_bf16_<pct> (native bf16 plan at ratio pct/100).")
flags.DEFINE_integer("rounds", 5, "Timed rounds (median over rounds).")
flags.DEFINE_integer("steps", 3, "Steps per contender per round.")
flags.DEFINE_integer("warmup", 2, "Warm-up steps per contender.")
flags.DEFINE_float("quant_ratio", 0.5, "Share of quantizable layers quantized.")
flags.DEFINE_bool("jit_compile", False, "Compile every train step with XLA.")
flags.DEFINE_enum("bf16_rounding", "nearest", ["nearest", "stochastic"],
                  "Rounding of the bf16 contenders' casts.")
flags.DEFINE_bool("bf16_fixed_structure", True,
                  "Build the bf16 contenders' layers for the bf16 structure "
                  "only (QuantizedLayer fixed_structure); false: every "
                  "precision's branch, as before issue 21's XLA fix.")
flags.DEFINE_bool("bf16_pinned", True,
                  "dp_bf16_100 builds pinned layers (QuantizedLayer "
                  "switchable=False: no on/off switch, bf16 taps); false: "
                  "switchable layers all switched on.")
flags.DEFINE_bool("smoke", False, "Tiny run (1 round, 1 step, 1 warm-up): "
                  "checks that every contender runs; numbers meaningless.")
flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")
flags.DEFINE_integer("seed", 0, "Seed for weights, data order and the plan.")
flags.DEFINE_float("memory_limit_mb", benchmark_lib.MEMORY_LIMIT_MB,
                   "Each case runs in a worker process stopped above this "
                   "resident memory; contenders that cannot fit are skipped "
                   "(reason in the JSON's 'skipped'). 0: one process, no limit.")
flags.DEFINE_string("worker", None, "Internal: run one case (JSON settings) "
                    "and print it as a CASE line.")


def _table(report) -> str:
  rows = ["model         batch contender     ms/step   ex/s     peak MB  vs plain  "
          "TF-Privacy/x  vs dp"]
  for c in report["cases"]:
    for k, why in c.get("skipped", {}).items():
      rows.append(f"{c['model']:<13} {c['batch_size']:>5} {k:<12} skipped: {why}")
    for k in FLAGS.contenders:
      if k + "_ms" not in c:
        continue
      rows.append(
          f"{c['model']:<13} {c['batch_size']:>5} {k:<12} {c[k + '_ms']:>8.1f} "
          f"{c[k + '_examples_per_s']:>8.0f} {str(c[k + '_peak_mb']):>10} "
          f"{str(c.get(k + '_vs_plain', '')):>8} "
          f"{str(c.get('tfprivacy_vs_' + k, '')):>8} "
          f"{str(c.get('dp_vs_' + k, '')):>8}")
  return "\n".join(rows)


def _worker(spec):
  import json  # pylint: disable=g-import-not-at-top
  settings = json.loads(spec)
  model_name, batch = settings.pop("case").split(":")
  settings["contenders"] = tuple(settings["contenders"])
  s = benchmark_lib.Settings(**settings)
  case = benchmark_lib.run_case(model_name, int(batch), s,
                                log=lambda m: print("LOG " + m, flush=True))
  print("CASE " + json.dumps(case), flush=True)


def main(argv):
  del argv
  if FLAGS.worker:
    _worker(FLAGS.worker)
    return
  rounds, steps, warmup = ((1, 1, 1) if FLAGS.smoke else
                           (FLAGS.rounds, FLAGS.steps, FLAGS.warmup))
  for kind in FLAGS.contenders:
    if kind not in benchmark_lib.CONTENDERS:
      benchmark_lib.bf16_ratio(kind)  # raises for an unknown name
  settings = benchmark_lib.Settings(
      rounds=rounds, steps=steps, warmup=warmup,
      bf16_rounding=FLAGS.bf16_rounding,
      bf16_fixed_structure=FLAGS.bf16_fixed_structure,
      bf16_pinned=FLAGS.bf16_pinned,
      quant_ratio=FLAGS.quant_ratio, seed=FLAGS.seed,
      jit_compile=FLAGS.jit_compile, contenders=tuple(FLAGS.contenders))
  report = benchmark_lib.run(FLAGS.cases, settings, log=logging.info,
                             memory_limit_mb=FLAGS.memory_limit_mb or None)
  report["targets"] = (benchmark_lib.check_targets(report)
                       + benchmark_lib.check_bf16_targets(report))
  if FLAGS.json:
    print(benchmark_lib.to_json(report))
  else:
    print(_table(report))
    print(f"bf16 hardware units: {report['bf16_hardware']}; load average "
          f"{report['load_average']}")
    print("\n".join(report["targets"]))


if __name__ == "__main__":
  app.run(main)

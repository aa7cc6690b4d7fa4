r"""The per-example contractions of a DP step alone: float32 vs bfloat16 inputs.

  python tools/benchmark_contraction.py

What a bf16 change in dpquant_tf/perexample would gain (not made there: that
package computes the clip bound). Shapes of the benchmark's cases:

* ``dense_ghost_gram``: ghost norm of a Dense layer on sequences, the Gram
  products ``x x^T`` and ``g g^T`` per example (encoder: b=64, T=128, 256
  wide);
* ``dense_clipped_sum``: the clipped sum ``x^T (s * g)`` over all rows
  (encoder: 8192 rows, 256 x 1024);
* ``conv_per_example``: materialized per-example conv gradients, a batched
  matmul of patches by output gradients (small ResNet stage 1: b=64, 1024
  positions, 144 x 16).

bf16 inputs, products accumulated in float32 by oneDNN / AMX; the result is
returned in bfloat16 by TensorFlow's matmul (cast back to float32 here).
Contenders interleaved over rounds; median ms; the load average is printed.
"""

import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

CASES = {
    "dense_ghost_gram": ((64, 128, 256), (64, 128, 256), True),
    "dense_clipped_sum": ((8192, 256), (8192, 1024), False),
    "conv_per_example": ((64, 1024, 144), (64, 1024, 16), False),
}


def _fn(dtype, gram):
  @tf.function
  def f(a, b):
    a, b = tf.cast(a, dtype), tf.cast(b, dtype)
    if gram:  # per-example Gram matrices of both operands
      out = (tf.matmul(a, a, transpose_b=True), tf.matmul(b, b, transpose_b=True))
    else:
      out = (tf.matmul(a, b, transpose_a=True),)
    return [tf.cast(o, tf.float32) for o in out]
  return f


def main():
  rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 7
  print(f"load average {os.getloadavg()}")
  for name, (sa, sb, gram) in CASES.items():
    a, b = (tf.random.uniform(shape, -1.0, 1.0) for shape in (sa, sb))
    fns = {"float32": _fn(tf.float32, gram), "bfloat16": _fn(tf.bfloat16, gram)}
    for f in fns.values():
      f(a, b)
    times = {k: [] for k in fns}
    for r in range(rounds):
      for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
        t0 = time.perf_counter()
        for _ in range(3):
          out = fns[k](a, b)
        out[0].numpy()
        times[k].append((time.perf_counter() - t0) / 3 * 1e3)
    f32, b16 = (statistics.median(times[k]) for k in ("float32", "bfloat16"))
    print(f"{name:<18} float32 {f32:8.2f} ms  bfloat16 {b16:8.2f} ms  "
          f"speed-up {f32 / b16:5.2f}x  (load {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
  main()

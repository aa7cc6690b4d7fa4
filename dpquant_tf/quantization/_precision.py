"""Execution precision of a quantized layer: what its matmul/convolution runs in.

A quantized layer's *format* (``QuantFormat``) is simulated: values are
rounded to the format's grid and the op still runs in float32. Its *execution
precision* (``Precision``) is the dtype the op itself runs in:

* ``FLOAT32``: the op runs in float32 (the default).
* ``BFLOAT16``: inputs and kernel are cast to ``tf.bfloat16`` (the input
  stochastically rounded when the layer's rounding is stochastic, the kernel
  to nearest: the float32 master weights are what the update changes, so
  their cast needs no unbiasedness), the op and its backward
  pass (autodiff through the casts) run in bfloat16, and the output is cast
  back to float32. This runs natively on every device TensorFlow has bf16
  kernels for; it is *faster* only where the hardware has bf16 units (CPUs
  with AVX512_BF16 or AMX, GPUs): see :func:`hardware_accelerated`.
* ``FP8_E4M3``: simulated on every device (inputs and kernel rounded to the
  FP8 E4M3 grid with per-example / per-channel scales, the op in float32).
  No native FP8 path is built.

The layer hands float32 taps to the per-example path. One exception, by
design (issue 21): a Dense layer on sequences built with
``fixed_structure=True`` for bf16 has its per-example kernel gradients
contracted from bf16 operands into bf16 tensors while enabled; their norms are
bounded and they are clipped and summed as materialized tensors, so the clip
bound holds for exactly what is added. The noise is always float32.
"""

import enum
import functools
import os
from typing import FrozenSet

import tensorflow as tf

from dpquant_tf import _validation
from dpquant_tf.quantization._formats import Rounding

__all__ = ["Precision", "check_precision", "cpu_flags", "hardware_accelerated",
           "rounding_bits", "runs_natively", "to_bfloat16", "uniform_noise"]


class Precision(enum.Enum):
  """Execution precision of a layer's op. The value is the id in `tf.Variable`s."""
  FLOAT32 = 0
  BFLOAT16 = 1
  FP8_E4M3 = 2

  @property
  def id(self) -> int:
    return self.value


_ALIASES = {"fp32": Precision.FLOAT32, "float32": Precision.FLOAT32,
            "bf16": Precision.BFLOAT16, "bfloat16": Precision.BFLOAT16,
            "fp8_e4m3": Precision.FP8_E4M3, "fp8": Precision.FP8_E4M3}


def check_precision(name: str, value) -> Precision:
  """A `Precision`, its id, its name or an alias (``bf16``, ``fp32``, ``fp8``)."""
  if isinstance(value, str) and value.lower() in _ALIASES:
    return _ALIASES[value.lower()]
  if isinstance(value, bool):
    _validation.fail(name, value, f"one of {sorted(_ALIASES)}")
  try:
    return _validation.check_enum(name, value, Precision)
  except ValueError:
    _validation.fail(name, value, f"one of {sorted(_ALIASES)}")


def runs_natively(precision) -> bool:
  """True when the op really executes in `precision` (not simulated)."""
  precision = check_precision("precision", precision)
  return precision in (Precision.FLOAT32, Precision.BFLOAT16)


@functools.lru_cache(maxsize=1)
def cpu_flags() -> FrozenSet[str]:
  """The CPU feature flags of this machine (``/proc/cpuinfo``; empty elsewhere)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          return frozenset(line.split(":", 1)[1].split())
  except OSError:
    pass
  return frozenset()


def hardware_accelerated(precision) -> bool:
  """True when this machine has units that run `precision` faster than float32.

  bfloat16: a visible GPU, or a CPU with AVX512_BF16 or AMX-BF16 (oneDNN
  uses them). FP8: never (no native path is built). Set
  ``DPQUANT_ASSUME_BF16_HARDWARE=0/1`` to override the detection (tests,
  cross-machine cost models).
  """
  precision = check_precision("precision", precision)
  if precision == Precision.FLOAT32:
    return True
  if precision != Precision.BFLOAT16:
    return False
  forced = os.environ.get("DPQUANT_ASSUME_BF16_HARDWARE")
  if forced in ("0", "1"):
    return forced == "1"
  if {"avx512_bf16", "amx_bf16"} & cpu_flags():
    return True
  return bool(tf.config.list_physical_devices("GPU"))


@tf.custom_gradient
def _cast_straight_through(x, rounded):
  """bfloat16 cast of ``rounded``; the gradient flows to ``x`` as float32."""
  def grad(dy):
    return tf.cast(dy, x.dtype), None
  return tf.cast(rounded, tf.bfloat16), grad


_HASH_MUL_1 = 0x7FEB352D  # lowbias32 multipliers (C. Wellons, "hash prospector")
_HASH_MUL_2 = 0x846CA68B


def _mix(shape, key):
  """uint32 ``mix(i XOR key)`` for every row-major index ``i`` of ``shape``."""
  n = tf.reduce_prod(tf.cast(shape, tf.int32))
  h = tf.bitwise.bitwise_xor(tf.bitcast(tf.range(n), tf.uint32),
                             tf.cast(key, tf.uint32))
  h = h * tf.constant(_HASH_MUL_1, tf.uint32)
  h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, 15))
  h = h * tf.constant(_HASH_MUL_2, tf.uint32)
  return tf.reshape(h, shape)


def rounding_bits(shape, key):
  """16 pseudo-random bits per element (uint32 in [0, 2**16)) from one key.

  A counter-based generator: element ``i`` (row-major index) gets the high 16
  bits of ``mix(i XOR key)``, where ``mix`` (multiply, xor-shift, multiply)
  is a bijection of uint32. For every fixed ``i`` the map ``key -> bits`` is
  onto every 16-bit value equally often, so with a uniformly random 32-bit
  ``key`` each element's bits are exactly uniform: stochastic rounding with
  them is exactly unbiased. Cost: a handful of integer ops per element (fused
  under XLA) and one random draw per tensor, instead of 32 random bits per
  element from the generator (3-4 ns an element on a CPU, and under XLA a
  large Philox expansion per draw).

  Args:
    shape: the shape of the tensor to round (a 1-D int tensor or list).
    key: a uint32 scalar, drawn fresh for every tensor and step.

  Returns:
    A uint32 tensor of ``shape`` with values below ``2**16``.
  """
  return tf.bitwise.right_shift(_mix(shape, key), 16)


def uniform_noise(shape, generator):
  """Uniform noise on the grid ``k / 2**24`` in [0, 1), one key per call.

  Same counter-based bits as :func:`rounding_bits` (24 high bits): each
  element is exactly uniform on the grid; one 32-bit draw from ``generator``.
  """
  key = generator.uniform_full_int([], tf.uint32)
  bits = tf.bitwise.right_shift(_mix(shape, key), 8)
  return tf.cast(bits, tf.float32) * (1.0 / 2**24)


def to_bfloat16(x, *, rounding=Rounding.NEAREST, generator=None):
  """Casts a float32 tensor to bfloat16; gradients come back as float32.

  Stochastic rounding adds 16 random bits to the low half of the float32 bit
  pattern and truncates them: the magnitude rounds up with probability equal
  to the dropped fraction, so ``E[to_bfloat16(x)] = x`` (up to overflow at the
  largest finite values). The bits come from :func:`rounding_bits` with one
  32-bit key drawn from ``generator`` per call (cheap; exactly unbiased per
  element). Non-finite values stay non-finite.

  Args:
    x: float32 tensor.
    rounding: `Rounding.NEAREST` (TensorFlow's cast) or `Rounding.STOCHASTIC`.
    generator: a `tf.random.Generator` (required for stochastic rounding).

  Returns:
    The bfloat16 tensor (differentiable: straight-through to ``x``).
  """
  rounding = _validation.check_enum("rounding", rounding, Rounding)
  if rounding == Rounding.NEAREST:
    return tf.cast(x, tf.bfloat16)  # its gradient is cast back to float32
  if generator is None:
    _validation.fail("generator", generator,
                     "a tf.random.Generator for stochastic rounding")
  key = generator.uniform_full_int([], tf.uint32)
  return _cast_straight_through(x, _stochastic_bf16_bits(
      tf.stop_gradient(x), key))


def _stochastic_bf16_bits_impl(x, key):
  """``x`` (float32) with 16 random bits added and the low half cleared."""
  bits = tf.bitcast(x, tf.uint32) + rounding_bits(tf.shape(x), key)
  return tf.bitcast(
      tf.bitwise.bitwise_and(bits, tf.constant(0xFFFF0000, tf.uint32)),
      tf.float32)


# The rounding is a handful of integer ops per element: TensorFlow's graph
# executor runs each as a pass over memory (about 10 ms for 2.1 M elements
# on 2 cores), XLA fuses them into one loop (about 1.4 ms). Compiled on its
# own (an XLA cluster inside an ordinary graph; inlined under an outer
# ``jit_compile``). Same values either way: integer ops only.
_stochastic_bf16_bits = tf.function(_stochastic_bf16_bits_impl,
                                    jit_compile=True, autograph=False,
                                    reduce_retracing=True)

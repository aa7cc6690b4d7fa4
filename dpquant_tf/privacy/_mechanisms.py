"""DP-SGD mechanisms as small pure TensorFlow functions.

The optimizer (``dpquant_tf.optimizers``) is a thin adapter that owns the
variables and calls these functions in order::

    per-example grads -> clip_per_example -> quantize_per_example (optional)
      -> clip_per_example again (reclip mode) -> sum -> add_gaussian_noise
      -> normalize -> quantize_update (optional, post-processing)

``add_gaussian_noise`` is the one function in dpquant_tf that adds DP noise.
All randomness comes from a ``tf.random.Generator`` passed in by the caller.

Reference: Gao et al., "DPQuant", arXiv:2509.03472; docs/METHOD.md sections 3-4.
"""

import enum
from typing import List, Optional, Sequence

import tensorflow as tf

from dpquant_tf.privacy import _clip

__all__ = [
    "SensitivityMode",
    "add_gaussian_noise",
    "clip_per_example",
    "effective_noise_multiplier",
    "grid_levels",
    "per_example_global_norm",
    "quantization_error_bound",
    "quantize_per_example",
    "quantize_update",
    "sensitivity",
    "sensitivity_ratio",
]

MIN_BITS = 2
MAX_BITS = 24


class SensitivityMode(enum.Enum):
  """How per-example gradient quantization is reconciled with the clip norm.

  RECLIP: clip to C, quantize, clip to C again. Sensitivity is exactly C.
  BOUND: clip to C, quantize, no re-clip. Sensitivity is
    C + sqrt(sum_l d_l * Delta_l^2) with Delta_l = C / L_l the grid step of
    variable l (L_l = 2^(b_l - 1) - 1 levels per side) and d_l its size, so the
    step's effective noise multiplier is sigma * C / sensitivity.
  """
  RECLIP = "reclip"
  BOUND = "bound"


def grid_levels(bits: tf.Tensor) -> tf.Tensor:
  """Levels per side L = 2^(b-1) - 1 of a b-bit signed grid (float64)."""
  bits = tf.cast(bits, tf.float64)
  return tf.pow(tf.constant(2.0, tf.float64), bits - 1.0) - 1.0


def per_example_global_norm(grads: Sequence[tf.Tensor]) -> tf.Tensor:
  """L2 norm over all variables of each example: shape [num_examples].

  Mirrors ``tf.clip_by_global_norm``'s ``sqrt(2 * sum(l2_loss))`` (reporting
  only: the clip uses ``_clip.norm_bound``, a proven upper bound).
  """
  half_sq = []
  for g in grads:
    axes = list(range(1, g.shape.rank))
    half_sq.append(0.5 * tf.reduce_sum(tf.square(g), axis=axes)
                   if axes else 0.5 * tf.square(g))
  return tf.sqrt(2.0 * tf.add_n(half_sq))


def clip_per_example(grads: Sequence[tf.Tensor],
                     l2_norm_clip: tf.Tensor,
                     valid: Optional[tf.Tensor] = None) -> List[tf.Tensor]:
  """Clips each example's gradient (over all variables) to L2 norm C.

  The one clip (``dpquant_tf.privacy._clip``): example i is scaled by
  ``min(1, C / u_i)`` where ``u_i`` is the float64 norm of its gradient,
  enlarged by that sum's rounding bound, and the scale is rounded down so
  that the float32 product ``scale * g`` has norm at most C. An example whose
  norm is not finite (a NaN or inf anywhere in its gradient), or that
  ``valid`` marks invalid (an out-of-range Embedding id), is replaced by exact
  zeros: ``0 * NaN`` would be NaN, so the row is selected away with
  ``tf.where``, never multiplied by 0 (docs/METHOD.md section 4, invariant 9).

  Formal guarantee: each returned example has L2 norm at most C in the
  arithmetic executed, and is exactly 0 when its input was not finite or
  invalid.

  Args:
    grads: one ``[num_examples, *var.shape]`` tensor per variable.
    l2_norm_clip: scalar C > 0.
    valid: optional ``[num_examples]`` bool.

  Returns:
    The clipped gradients, same structure.
  """
  return _clip.clip_per_example(grads, l2_norm_clip, valid)


def quantize_per_example(grads: Sequence[tf.Tensor], bits: tf.Tensor,
                         l2_norm_clip: tf.Tensor,
                         generator: tf.random.Generator) -> List[tf.Tensor]:
  """Q(g; b, C) = C * round_stochastic(g / C * L) / L, per variable.

  The grid scale C is public (the clip norm), so there is no coupling between
  examples. Stochastic rounding is unbiased: E[Q(g)] = g for |g_i| <= C. Each
  coordinate moves by less than one grid step Delta = C / L.

  Args:
    grads: one ``[num_examples, *var.shape]`` tensor per variable, already
      clipped to C (so every coordinate lies in [-C, C]).
    bits: int vector, one entry per variable; 0 leaves that variable exact.
    l2_norm_clip: scalar C.
    generator: source of the rounding noise.

  Returns:
    The quantized gradients.
  """
  out = []
  for i, g in enumerate(grads):
    b = bits[i]
    levels = tf.cast(grid_levels(tf.maximum(b, MIN_BITS)), g.dtype)
    clip = tf.cast(l2_norm_clip, g.dtype)
    scaled = g / clip * levels
    u = generator.uniform(tf.shape(g), dtype=g.dtype)
    rounded = tf.clip_by_value(tf.floor(scaled + u), -levels, levels)
    out.append(tf.where(b > 0, rounded / levels * clip, g))
  return out


def quantize_update(grads: Sequence[tf.Tensor], bits: tf.Tensor,
                    generator: tf.random.Generator) -> List[tf.Tensor]:
  """Stochastic b-bit max-abs quantization of the noised update.

  Post-processing of an already-private value: costs no privacy.

  Args:
    grads: tensors to quantize (each scaled by its own max-abs).
    bits: scalar int, bits >= 2.
    generator: source of the rounding noise.

  Returns:
    The quantized tensors.
  """
  out = []
  for g in grads:
    levels = tf.cast(grid_levels(tf.maximum(bits, MIN_BITS)), g.dtype)
    scale = tf.reduce_max(tf.abs(g))
    safe = tf.where(scale > 0, scale, tf.ones_like(scale))
    u = generator.uniform(tf.shape(g), dtype=g.dtype)
    q = tf.clip_by_value(tf.floor(g / safe * levels + u), -levels, levels)
    out.append(q / levels * safe)
  return out


def quantization_error_bound(var_sizes: Sequence[int], bits: tf.Tensor,
                             l2_norm_clip: tf.Tensor) -> tf.Tensor:
  """sqrt(sum_l d_l * Delta_l^2), Delta_l = C / L_l (0 where bits_l == 0).

  The largest L2 norm by which stochastic rounding on the grids can move a
  vector. Float64.
  """
  sizes = tf.constant([float(s) for s in var_sizes], tf.float64)
  levels = grid_levels(tf.maximum(bits, MIN_BITS))
  clip = tf.cast(l2_norm_clip, tf.float64)
  delta_sq = tf.where(tf.cast(bits, tf.int32) > 0,
                      tf.square(clip / levels), tf.zeros_like(levels))
  return tf.sqrt(tf.reduce_sum(sizes * delta_sq))


def sensitivity(mode: SensitivityMode, var_sizes: Sequence[int],
                bits: tf.Tensor, l2_norm_clip: tf.Tensor,
                quantization_on: tf.Tensor) -> tf.Tensor:
  """L2 sensitivity of one example's contribution to the sum (float64).

  RECLIP (or quantization off): C. BOUND: C + quantization_error_bound.
  """
  clip = tf.cast(l2_norm_clip, tf.float64)
  if mode is SensitivityMode.RECLIP:
    return clip
  extra = quantization_error_bound(var_sizes, bits, l2_norm_clip)
  return clip + tf.where(quantization_on, extra, tf.zeros_like(extra))


def add_gaussian_noise(tensors: Sequence[tf.Tensor], stddev: tf.Tensor,
                       generator: tf.random.Generator) -> List[tf.Tensor]:
  """The one place dpquant_tf adds DP noise: t + stddev * N(0, I).

  Formal guarantee: with stddev = z * Delta for a sum of L2 sensitivity
  Delta, this is the Gaussian mechanism with noise multiplier z.

  Args:
    tensors: the clipped sums.
    stddev: scalar noise standard deviation this call adds: z * sensitivity,
      or under tf.distribute a replica's share of it
      (``distribute.replica_noise_stddev``: z * sensitivity / sqrt(R), so
      the SUM all-reduce of R independent shares carries exactly
      N(0, (z * sensitivity)^2)). The caller computes the share; this
      function draws.
    generator: a ``tf.random.Generator`` (non-deterministic unless seeded).

  Returns:
    The noised tensors; for the same generator state, the noise at stddev s
    equals s times the noise at stddev 1.
  """
  out = []
  for t in tensors:
    unit = generator.normal(tf.shape(t), dtype=t.dtype)
    out.append(t + tf.cast(stddev, t.dtype) * unit)
  return out


def levels_for_bits(bits: int) -> int:
  """Python helper: L = 2^(b-1) - 1."""
  return int(2 ** (bits - 1) - 1)


def sensitivity_ratio(mode: SensitivityMode, var_sizes: Sequence[int],
                      bits: tf.Tensor, l2_norm_clip: tf.Tensor) -> tf.Tensor:
  """Sensitivity of one example's contribution in units of C (float64).

  1 in RECLIP mode or with every bit width 0; in BOUND mode
  ``(C + quantization_error_bound) / C``. Runs in a graph and eagerly: the
  optimizer's step and ``current_event_parameters`` both call it.
  """
  bits = tf.convert_to_tensor(bits)
  quant_on = tf.reduce_any(bits > 0)
  sens = sensitivity(mode, var_sizes, bits, l2_norm_clip, quant_on)
  return sens / tf.cast(l2_norm_clip, tf.float64)


def effective_noise_multiplier(noise_multiplier: tf.Tensor,
                               sensitivity_ratio_: tf.Tensor,
                               rows_per_microbatch) -> tf.Tensor:
  """The noise multiplier the accountant is told for one step (float64).

  ``z_eff = z / (sensitivity / C)``, halved when a microbatch holds more than
  one example (replacing one example of a microbatch mean moves it by up to
  2C / k while it is clipped to C: add/remove adjacency doubles the
  sensitivity, as TF-Privacy's statement notes). The one place this is
  computed: the optimizer's graph step and the callback's projection
  (``current_event_parameters``, eager) both call it.

  Args:
    noise_multiplier: z, noise std / C.
    sensitivity_ratio_: sensitivity / C (``sensitivity_ratio``).
    rows_per_microbatch: examples per microbatch (int or scalar tensor);
      None or 1 for one example per microbatch.

  Returns:
    float64 scalar tensor.
  """
  z = (tf.cast(noise_multiplier, tf.float64) /
       tf.cast(sensitivity_ratio_, tf.float64))
  if rows_per_microbatch is None:
    return z
  return tf.where(tf.convert_to_tensor(rows_per_microbatch) > 1, z / 2.0, z)

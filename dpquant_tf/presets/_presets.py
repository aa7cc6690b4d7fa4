"""Named presets: quantization formats and schedule policies by name.

What a command line or a study configuration names as a string, turned into
library objects:

* :class:`FormatPreset` and :func:`layer_config`: the ``LayerQuantConfig`` of
  a quantized layer in a named format (the paper's LUQ-FP4 and the usual
  4- and 8-bit formats);
* :class:`PolicyName` and :func:`make_policy`: a ``dpquant_tf.schedule``
  policy by name (fp32, static subset, rotation, DPQuant's loss-aware
  selection, a bit ramp).
"""

import enum
from typing import Optional, Sequence

from dpquant_tf import _validation

__all__ = ["FormatPreset", "PolicyName", "layer_config", "make_policy"]


class FormatPreset(enum.Enum):
  """Formats of a quantized layer (forward and backward pass).

  int4: uniform INT4 both ways. fp4: FP4 E2M1 both ways. luq_fp4: the
  paper's LUQ-FP4 (INT4 with SAWB forward, radix-2 FP4 backward). fp8: FP8
  E4M3 forward, E5M2 backward. int8: uniform INT8 both ways.
  """
  INT4 = "int4"
  FP4 = "fp4"
  LUQ_FP4 = "luq_fp4"
  FP8 = "fp8"
  INT8 = "int8"


class PolicyName(enum.Enum):
  """Quantization schedules by name."""
  NONE = "none"              # no quantization (fp32 baseline)
  STATIC = "static"          # one random subset for the whole run
  ROTATION = "rotation"      # PLS: a new uniform subset each epoch
  LOSS_AWARE = "loss_aware"  # DPQuant: PLS + LLP with the DP estimator
  BIT_RAMP = "bit_ramp"      # per-layer gradient bits ramped 2 -> 8


def layer_config(preset):
  """The ``LayerQuantConfig`` of a quantized layer in a named format.

  Args:
    preset: a :class:`FormatPreset` or its value (e.g. ``"luq_fp4"``).

  Returns:
    An enabled ``dpquant_tf.quantization.LayerQuantConfig``.

  Raises:
    ValueError: for an unknown name ("Expected format=... to be one of ...").

  Example:
    >>> layer_config("fp8").fwd_bits
    8
  """
  from dpquant_tf.quantization import LayerQuantConfig, QuantFormat  # pylint: disable=g-import-not-at-top,g-multiple-import
  preset = _validation.check_enum("format", preset, FormatPreset)
  fwd, bwd = {
      FormatPreset.INT4: ((QuantFormat.INT, 4), (QuantFormat.INT, 4)),
      FormatPreset.FP4: ((QuantFormat.FP4_E2M1, 4), (QuantFormat.FP4_E2M1, 4)),
      FormatPreset.LUQ_FP4: ((QuantFormat.INT4_SAWB, 4),
                             (QuantFormat.LUQ_FP4, 4)),
      FormatPreset.FP8: ((QuantFormat.FP8_E4M3, 8), (QuantFormat.FP8_E5M2, 8)),
      FormatPreset.INT8: ((QuantFormat.INT, 8), (QuantFormat.INT, 8)),
  }[preset]
  return LayerQuantConfig(enabled=True, fwd_format=fwd[0], fwd_bits=fwd[1],
                          bwd_format=bwd[0], bwd_bits=bwd[1])


def make_policy(name, *, ratio: float = 0.75, beta: float = 50.0,
                period: int = 2, epochs: Optional[int] = None,
                static_layers: Optional[Sequence[str]] = None):
  """A ``dpquant_tf.schedule`` policy by name.

  Args:
    name: a :class:`PolicyName` or its value.
    ratio: fraction of the quantizable layers quantized per epoch
      (static, rotation, loss_aware).
    beta: loss-aware temperature, pi_i ~ exp(-beta * L_i) (loss_aware).
    period: epochs between loss-sensitivity analyses (loss_aware).
    epochs: epochs of the run (bit_ramp ramps over them; required there).
    static_layers: the fixed subset of layer names (static only; None draws
      a random subset of size round(ratio * n)).

  Returns:
    The policy, or None for ``"none"`` (no quantization).

  Raises:
    ValueError: for an unknown name, ``static_layers`` with another policy,
      or ``bit_ramp`` without ``epochs``.
  """
  from dpquant_tf import schedule  # pylint: disable=g-import-not-at-top
  name = _validation.check_enum("policy", name, PolicyName)
  if static_layers is not None and name is not PolicyName.STATIC:
    _validation.fail("static_layers", static_layers,
                     "None unless policy='static'")
  if name is PolicyName.STATIC:
    layers = None if static_layers is None else list(static_layers)
    return schedule.StaticPolicy(ratio=ratio, layers=layers)
  if name is PolicyName.ROTATION:
    return schedule.RotationPolicy(ratio=ratio)
  if name is PolicyName.LOSS_AWARE:
    return schedule.LossAwarePolicy(ratio=ratio, beta=beta, period=period)
  if name is PolicyName.BIT_RAMP:
    if epochs is None:
      _validation.fail("epochs", epochs, "an int >= 1 for policy='bit_ramp'")
    return schedule.BitRampPolicy(epochs=_validation.check_int(
        "epochs", epochs, low=1))
  return None

"""Bit-width policies (how many bits) and their combination with layer selection.

These serve the second reading of DPQuant (docs/METHOD.md section 3): per-layer
quantization of the clipped per-example gradients to b_l bits, with b_l raised
over training, larger toward the output, or adapted to released gradient norms.
By default their bits go to the optimizer's per-layer gradient bit widths
(``BitsTarget.GRADIENTS``); with ``target="layers"`` they set the bits of the
layers' own uniform INT quantizers instead.

Every policy here only reads the epoch, the public architecture and released
values: post-processing, ``spends_privacy = False``. Quantization error is
never counted as privacy (docs/METHOD.md invariant 6).
"""

import abc
import enum
import math
from typing import Any, Dict, Mapping, Sequence

import numpy as np

from dpquant_tf import _validation as v
from dpquant_tf.schedule import _base

MIN_BITS = 2  # Q(g; b, C) has 2^(b-1) - 1 levels per side: b = 1 has none.
MAX_BITS = 16  # the widest INT format of dpquant_tf.quantization


class RampMode(enum.Enum):
  """Shape of ``BitRampPolicy``'s ramp."""
  LINEAR = "linear"
  EXPONENTIAL = "exponential"


def _check_bits(name, value) -> int:
  return v.check_int(name, value, low=MIN_BITS, high=MAX_BITS)


def _round_half_up(x: float) -> int:
  return int(math.floor(x + 0.5))


class BitsPolicy(_base.Policy):
  """Base class of the bit-width policies.

  Used alone, a bits policy with target GRADIENTS leaves every layer
  unquantized and sets the optimizer's gradient bits; with target LAYERS it
  quantizes every layer (uniform INT) at the policy's bits. Combine it with a
  selection policy in ``CombinedPolicy`` to choose which layers.
  """

  def __init__(self, *, target):
    self.target = v.check_enum("target", target, _base.BitsTarget)

  @abc.abstractmethod
  def bits(self, epoch: int, layers: Sequence[Any],
           released: _base.Releases) -> Dict[str, int]:
    """Returns layer name -> bits for `epoch` (deterministic)."""

  def decide(self, epoch, layers, released, generator):
    names = _base.check_layers(layers)
    bits = self.bits(epoch, layers, released)
    if self.target is _base.BitsTarget.GRADIENTS:
      return _base.Decision(enabled={n: False for n in names}, gradient_bits=bits)
    return _base.Decision(enabled={n: True for n in names}, layer_bits=bits)

  def _config(self) -> Dict[str, Any]:
    return {"target": self.target.value}


@_base.register
class BitRampPolicy(BitsPolicy):
  """One global bit width ramped from `b_start` to `b_end` over `epochs` epochs.

  With t = min(epoch, epochs - 1) / (epochs - 1) (t = 1 when epochs = 1):
  linear: b = round(b_start + (b_end - b_start) * t);
  exponential: b = round(b_start * (b_end / b_start) ** t);
  rounding half up. Epochs past the ramp keep `b_end`. For example 2 -> 8
  over 7 epochs, linear: 2, 3, 4, 5, 6, 7, 8; over 5 epochs, exponential:
  2, 3, 4, 6, 8.

  Privacy: a function of the epoch only; ``spends_privacy = False``.

  Args:
    b_start: bits at epoch 0, in [2, 16].
    b_end: bits from epoch `epochs - 1` on, in [2, 16].
    epochs: ramp length in epochs (>= 1).
    mode: ``RampMode`` or "linear" / "exponential".
    target: ``BitsTarget`` or "gradients" (default) / "layers".
  """

  def __init__(self, *, b_start: int = 2, b_end: int = 8, epochs: int = 10,
               mode=RampMode.LINEAR, target=_base.BitsTarget.GRADIENTS):
    super().__init__(target=target)
    self.b_start = _check_bits("b_start", b_start)
    self.b_end = _check_bits("b_end", b_end)
    self.epochs = v.check_int("epochs", epochs, low=1)
    self.mode = v.check_enum("mode", mode, RampMode)

  def bits_at(self, epoch: int) -> int:
    """The global bit width at `epoch`."""
    epoch = v.check_int("epoch", epoch, low=0)
    t = 1.0 if self.epochs == 1 else min(epoch, self.epochs - 1) / (self.epochs - 1)
    if self.mode is RampMode.LINEAR:
      b = self.b_start + (self.b_end - self.b_start) * t
    else:
      b = self.b_start * (self.b_end / self.b_start) ** t
    return _round_half_up(b)

  def bits(self, epoch, layers, released):
    b = self.bits_at(epoch)
    return {n: b for n in _base.check_layers(layers)}

  def get_config(self):
    return {"b_start": self.b_start, "b_end": self.b_end, "epochs": self.epochs,
            "mode": self.mode.value, **self._config()}


@_base.register
class DepthBitsPolicy(BitsPolicy):
  """Per-layer bits growing linearly with depth: more bits toward the output.

  Layer i of n (in ``quantizable_layers`` order, input first) gets
  round(b_input + (b_output - b_input) * i / (n - 1)) bits (half up; a single
  layer gets `b_output`). For example 4 layers, 4 -> 8 bits: 4, 5, 7, 8.

  Privacy: a function of the public architecture; ``spends_privacy = False``.

  Args:
    b_input: bits of the first layer, in [2, 16].
    b_output: bits of the last layer, in [2, 16].
    target: ``BitsTarget`` or "gradients" (default) / "layers".
  """

  def __init__(self, *, b_input: int = 4, b_output: int = 8,
               target=_base.BitsTarget.GRADIENTS):
    super().__init__(target=target)
    self.b_input = _check_bits("b_input", b_input)
    self.b_output = _check_bits("b_output", b_output)

  def bits(self, epoch, layers, released):
    names = _base.check_layers(layers)
    n = len(names)
    out = {}
    for i, name in enumerate(names):
      t = 1.0 if n == 1 else i / (n - 1)
      out[name] = _round_half_up(self.b_input + (self.b_output - self.b_input) * t)
    return out

  def get_config(self):
    return {"b_input": self.b_input, "b_output": self.b_output, **self._config()}


@_base.register
class NormAdaptiveBitsPolicy(BitsPolicy):
  """Per-layer bits adapted to the released per-layer gradient magnitudes.

  The quantizer Q(g; b, C) has the same step C / (2^(b-1) - 1) in every layer,
  so a layer whose gradient coordinates are small is swamped by rounding noise;
  it needs more bits. With r_l the per-coordinate RMS of layer l's released
  update per step over the last epoch (``Releases.update_rms``; computed by
  ``DPQuantScheduler`` from the released weights) and m the median of the r_l:
  b_l = clip(round(b_ref + log2(m / r_l)), b_min, b_max), half up: one more bit
  for each halving of the layer's RMS relative to the median. Before any
  release every layer gets `b_ref`.

  Privacy: post-processing of released weights; ``spends_privacy = False``.

  Args:
    b_ref: bits of a layer with the median RMS, in [b_min, b_max].
    b_min: fewest bits, in [2, 16].
    b_max: most bits, in [b_min, 16].
    target: ``BitsTarget`` or "gradients" (default) / "layers".
  """

  needs_update_norms = True

  def __init__(self, *, b_ref: int = 4, b_min: int = 2, b_max: int = 8,
               target=_base.BitsTarget.GRADIENTS):
    super().__init__(target=target)
    self.b_min = _check_bits("b_min", b_min)
    self.b_max = v.check_int("b_max", b_max, low=self.b_min, high=MAX_BITS)
    self.b_ref = v.check_int("b_ref", b_ref, low=self.b_min, high=self.b_max)

  def bits_from_rms(self, rms: Mapping[str, float], names: Sequence[str]):
    """The rule above, for layer name -> RMS (missing layers get `b_ref`)."""
    known = [float(rms[n]) for n in names if n in rms and float(rms[n]) > 0]
    if not known:
      return {n: self.b_ref for n in names}
    median = float(np.median(known))
    out = {}
    for n in names:
      r = float(rms[n]) if n in rms else None
      if r is None:
        out[n] = self.b_ref
      elif r <= 0:
        out[n] = self.b_max
      else:
        b = _round_half_up(self.b_ref + math.log2(median / r))
        out[n] = int(min(max(b, self.b_min), self.b_max))
    return out

  def bits(self, epoch, layers, released):
    return self.bits_from_rms(released.update_rms, _base.check_layers(layers))

  def get_config(self):
    return {"b_ref": self.b_ref, "b_min": self.b_min, "b_max": self.b_max,
            **self._config()}


@_base.register
class CombinedPolicy(_base.Policy):
  """Which layers (a selection policy) x how many bits (a ``BitsPolicy``).

  The enabled layers come from `selection`; the bits from `bits`: with target
  LAYERS they set the quantized layers' INT bits, with target GRADIENTS the
  optimizer's per-layer gradient bits. Analyses are due when the selection
  policy's are.

  Privacy: ``spends_privacy`` is the OR of both parts (False for all policies
  in this package).

  Args:
    selection: ``StaticPolicy``, ``RotationPolicy`` or ``LossAwarePolicy``
      (any non-bits policy).
    bits: a ``BitsPolicy``.
  """

  def __init__(self, *, selection: _base.Policy, bits: BitsPolicy):
    if isinstance(selection, Mapping):
      selection = _base.deserialize_policy(selection)
    if isinstance(bits, Mapping):
      bits = _base.deserialize_policy(bits)
    if not isinstance(selection, _base.Policy) or isinstance(
        selection, (BitsPolicy, CombinedPolicy)):
      v.fail("selection", selection, "a layer-selection policy (StaticPolicy, "
             "RotationPolicy, LossAwarePolicy)", TypeError)
    v.check_type("bits", bits, BitsPolicy, "a bits policy (BitRampPolicy, "
                 "DepthBitsPolicy, NormAdaptiveBitsPolicy)")
    self.selection = selection
    self.bits_policy = bits

  @property
  def spends_privacy(self):  # pylint: disable=invalid-overridden-method
    return self.selection.spends_privacy or self.bits_policy.spends_privacy

  @property
  def needs_sensitivities(self):  # pylint: disable=invalid-overridden-method
    return self.selection.needs_sensitivities

  @property
  def needs_update_norms(self):  # pylint: disable=invalid-overridden-method
    return self.bits_policy.needs_update_norms

  def analysis_due(self, epoch):
    return self.selection.analysis_due(epoch)

  def decide(self, epoch, layers, released, generator):
    enabled = self.selection.decide(epoch, layers, released, generator).enabled
    bits = self.bits_policy.bits(epoch, layers, released)
    if self.bits_policy.target is _base.BitsTarget.LAYERS:
      return _base.Decision(enabled=enabled, layer_bits=bits)
    return _base.Decision(enabled=enabled, gradient_bits=bits)

  def get_config(self):
    return {"selection": _base.serialize_policy(self.selection),
            "bits": _base.serialize_policy(self.bits_policy)}

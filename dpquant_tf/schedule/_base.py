"""Shared pieces of the schedule policies: the policy interface, released values, sampling.

A policy is a small pure object: given the epoch, the model's quantizable layers
(public architecture), the values released so far (``Releases``) and a random
generator, it returns a ``Decision`` (a ``QuantPlan`` for the model's quantized
layers, and optionally per-layer gradient bit widths for a ``DPQuantOptimizer``).
It touches no private data; the only private-data access in the schedule is the
``LossSensitivityEstimator``, whose releases are accounted by the estimator
itself. Everything a policy computes is therefore post-processing of released
values, unless its ``spends_privacy`` says otherwise.
"""

import abc
import dataclasses
import enum
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from dpquant_tf import _validation as v


class BitsTarget(enum.Enum):
  """Where a bit-width policy's per-layer bits go.

  GRADIENTS: the optimizer's per-layer gradient bit widths
    (``DPQuantOptimizer.set_gradient_bits``, docs/METHOD.md section 3); the layers'
    forward/backward quantization is left off (or set by a selection policy).
  LAYERS: the bits of the layers' own uniform INT quantizers (forward weights
    and activations, and the gradient at the layer output).
  """
  GRADIENTS = "gradients"
  LAYERS = "layers"


@dataclasses.dataclass(frozen=True)
class SensitivityRelease:
  """One released (noised) output of the ``LossSensitivityEstimator``.

  Attributes:
    epoch: the epoch at whose beginning the analysis ran.
    estimates: layer name -> noised mean loss increase when only that layer is
      quantized. Already differentially private; using it is post-processing.
  """
  epoch: int
  estimates: Mapping[str, float]


@dataclasses.dataclass
class Releases:
  """Everything released so far that a policy may use (all post-processing-safe).

  Attributes:
    sensitivities: the estimator's releases, oldest first.
    update_rms: layer name -> per-coordinate RMS of the layer kernel's update
      per training step over the last finished epoch, computed from the
      released weights (post-processing). Empty before the first epoch ends.
  """
  sensitivities: List[SensitivityRelease] = dataclasses.field(default_factory=list)
  update_rms: Dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Decision:
  """What a policy decided for one epoch.

  Attributes:
    enabled: layer name -> whether the layer runs quantized this epoch.
    layer_bits: layer name -> bits of the layer's INT quantizers, or None to
      keep the base configuration's formats and bits.
    gradient_bits: layer name -> per-example gradient bits for the optimizer,
      or None to leave the optimizer untouched.
  """
  enabled: Mapping[str, bool]
  layer_bits: Optional[Mapping[str, int]] = None
  gradient_bits: Optional[Mapping[str, int]] = None

  @property
  def quantized(self) -> List[str]:
    return [name for name, on in self.enabled.items() if on]


class Policy(abc.ABC):
  """Base class of the schedule policies.

  Subclasses implement ``decide``; ``next_plan`` turns the decision into a
  ``dpquant_tf.quantization.QuantPlan`` (Contract 4 in docs/DESIGN.md).

  Attributes:
    spends_privacy: whether the policy itself touches private data. False for
      every policy here: they only read public architecture and released
      values (post-processing). The loss-aware policy consumes the estimator's
      releases, whose privacy cost the estimator records in the ledger.
    needs_sensitivities: whether the scheduler should run a
      ``LossSensitivityEstimator`` when ``analysis_due(epoch)``.
    needs_update_norms: whether the scheduler should compute per-layer update
      RMS from the weights at epoch boundaries.
  """

  spends_privacy: bool = False
  needs_sensitivities: bool = False
  needs_update_norms: bool = False

  @abc.abstractmethod
  def decide(self, epoch: int, layers: Sequence[Any], released: Releases,
             generator) -> Decision:
    """Returns the decision for `epoch` (0-based)."""

  def analysis_due(self, epoch: int) -> bool:  # pylint: disable=unused-argument
    """Whether the estimator should run at the beginning of `epoch`."""
    return False

  def next_plan(self, epoch: int, layers: Sequence[Any], released: Releases,
                generator, *, base_config=None):
    """Returns the ``QuantPlan`` for `epoch` (Contract 4)."""
    from dpquant_tf.schedule import _plan  # pylint: disable=g-import-not-at-top
    decision = self.decide(epoch, layers, released, generator)
    return _plan.plan_from_decision(decision, base_config=base_config)

  @abc.abstractmethod
  def get_config(self) -> Dict[str, Any]:
    """Returns the keyword arguments that rebuild this policy."""

  @classmethod
  def from_config(cls, config: Mapping[str, Any]):
    return cls(**dict(config))

  def __repr__(self):
    args = ", ".join(f"{k}={val!r}" for k, val in self.get_config().items())
    return f"{type(self).__name__}({args})"


_REGISTRY: Dict[str, type] = {}


def register(cls):
  """Registers a policy class for ``serialize_policy`` / ``deserialize_policy``."""
  _REGISTRY[cls.__name__] = cls
  return cls


def serialize_policy(policy: Policy) -> Dict[str, Any]:
  """Returns ``{"class_name": ..., "config": ...}`` (JSON-compatible)."""
  v.check_type("policy", policy, Policy, "a dpquant_tf.schedule policy")
  return {"class_name": type(policy).__name__, "config": policy.get_config()}


def deserialize_policy(config: Mapping[str, Any]) -> Policy:
  """Inverse of ``serialize_policy``."""
  name = config.get("class_name") if isinstance(config, Mapping) else None
  if name not in _REGISTRY:
    v.fail("config", config, f"a serialized policy with class_name in "
           f"{sorted(_REGISTRY)}")
  return _REGISTRY[name].from_config(config.get("config", {}))


def check_layers(layers: Sequence[Any]) -> List[str]:
  """Checks the layer list and returns the layer names in order."""
  if not isinstance(layers, (list, tuple)) or not layers:
    v.fail("layers", layers, "a non-empty list of LayerInfo "
           "(dpquant_tf.quantization.quantizable_layers(model))")
  names = []
  for info in layers:
    name = getattr(info, "name", None)
    if not isinstance(name, str):
      v.fail("layers", layers, "a list of objects with a str `name` (LayerInfo)",
             TypeError)
    names.append(name)
  if len(set(names)) != len(names):
    v.fail("layers", names, "a list of distinct layer names")
  return names


def num_quantized(ratio: float, n: int) -> int:
  """k = round(ratio * n), half away from zero (Python's round is to even)."""
  return int(math.floor(ratio * n + 0.5))


def uniforms(generator, n: int) -> np.ndarray:
  """Draws `n` float64 uniforms in the open interval (0, 1).

  Args:
    generator: a ``tf.random.Generator`` or a ``numpy.random.Generator``.
    n: how many.
  """
  if isinstance(generator, np.random.Generator):
    u = generator.random(n)
  else:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    if not isinstance(generator, tf.random.Generator):
      v.fail("generator", generator, "a tf.random.Generator or a "
             "numpy.random.Generator", TypeError)
    u = generator.uniform([n], dtype=tf.float64).numpy()
  tiny = np.finfo(np.float64).tiny
  return np.clip(u, tiny, 1.0 - np.finfo(np.float64).eps)


def gumbel_top_k(logits: np.ndarray, k: int, generator) -> Tuple[int, ...]:
  """Samples k distinct indices without replacement, proportional to exp(logits).

  Gumbel-top-k: the indices of the k largest ``logits + Gumbel`` keys, in
  decreasing key order, are distributed exactly as k successive draws without
  replacement, each from softmax(logits) renormalized over the indices not yet
  drawn (Plackett-Luce; Kool et al. 2019, arXiv:1903.06059). In particular the
  first index is distributed as softmax(logits); equal logits give a uniform
  random k-subset.

  Returns:
    The k indices, first draw first.
  """
  logits = np.asarray(logits, dtype=np.float64)
  keys = logits - np.log(-np.log(uniforms(generator, logits.shape[0])))
  order = np.argsort(-keys, kind="stable")
  return tuple(int(i) for i in order[:k])


def softmax(logits: np.ndarray) -> np.ndarray:
  z = np.asarray(logits, dtype=np.float64)
  z = z - z.max()
  e = np.exp(z)
  return e / e.sum()

"""Layer-selection policies: which k = round(ratio * n) layers run quantized.

Reference: Gao et al., "DPQuant: Efficient and Differentially-Private Model
Training via Dynamic Quantization Scheduling", arXiv:2509.03472, section 4
(probabilistic layer sampling, PLS; loss-aware layer prioritization, LLP).
"""

from typing import Any, Dict, Optional, Sequence

import numpy as np

from dpquant_tf import _validation as v
from dpquant_tf.schedule import _base

# Defaults for the hyperparameters the paper leaves open (docs/METHOD.md section 5);
# the reasoning is in docs/SCHEDULE.md.
DEFAULT_BETA = 20.0
DEFAULT_ALPHA = 0.5
DEFAULT_PERIOD = 2


def _check_ratio(ratio) -> float:
  return v.check_probability("ratio", ratio, allow_zero=True)


def _decision(names, chosen) -> _base.Decision:
  chosen = set(chosen)
  return _base.Decision(enabled={name: name in chosen for name in names})


@_base.register
class StaticPolicy(_base.Policy):
  """A fixed random subset of k = round(ratio * n) layers for the whole run.

  The paper's baseline. The subset is drawn uniformly without replacement on
  the first call (or given as `layers`) and then kept; ``get_config`` includes
  the drawn subset so that a restored policy keeps it.

  Privacy: post-processing (public architecture and randomness only);
  ``spends_privacy = False``.

  Args:
    ratio: fraction of the quantizable layers to quantize, in [0, 1].
    layers: optional explicit list of layer names to quantize (overrides ratio).
  """

  def __init__(self, *, ratio: float = 0.5,
               layers: Optional[Sequence[str]] = None):
    self.ratio = _check_ratio(ratio)
    if layers is not None:
      if not isinstance(layers, (list, tuple)) or not all(
          isinstance(n, str) for n in layers):
        v.fail("layers", layers, "None or a list of layer names", TypeError)
      layers = list(layers)
    self.layers = layers

  def decide(self, epoch, layers, released, generator):
    names = _base.check_layers(layers)
    if self.layers is None:
      k = _base.num_quantized(self.ratio, len(names))
      idx = _base.gumbel_top_k(np.zeros(len(names)), k, generator)
      self.layers = [names[i] for i in sorted(idx)]
    unknown = sorted(set(self.layers) - set(names))
    if unknown:
      v.fail("layers", self.layers, f"names of quantizable layers; unknown: "
             f"{unknown}")
    return _decision(names, self.layers)

  def get_config(self) -> Dict[str, Any]:
    return {"ratio": self.ratio, "layers": self.layers}


@_base.register
class RotationPolicy(_base.Policy):
  """Probabilistic layer sampling (PLS): k layers uniformly without replacement each epoch.

  Every layer is quantized in each epoch with probability k / n, independently
  across epochs.

  Privacy: post-processing; ``spends_privacy = False``.

  Args:
    ratio: fraction of the quantizable layers to quantize, in [0, 1].
  """

  def __init__(self, *, ratio: float = 0.5):
    self.ratio = _check_ratio(ratio)

  def decide(self, epoch, layers, released, generator):
    names = _base.check_layers(layers)
    k = _base.num_quantized(self.ratio, len(names))
    idx = _base.gumbel_top_k(np.zeros(len(names)), k, generator)
    return _decision(names, [names[i] for i in idx])

  def get_config(self) -> Dict[str, Any]:
    return {"ratio": self.ratio}


@_base.register
class LossAwarePolicy(_base.Policy):
  """Loss-aware layer prioritization (LLP), DPQuant's policy.

  Each epoch, k = round(ratio * n) layers are drawn without replacement,
  successively, from pi_i = exp(-beta * L_i) / sum_j exp(-beta * L_j) (the
  first draw is distributed exactly as pi). L is the exponential moving
  average of the estimator's released per-layer loss increases:
  L <- (1 - alpha) * L + alpha * R at every release (L = R at the first).
  Releases are due every `period` epochs, starting at epoch 0. Before any
  release (no estimator), L = 0 and the policy equals ``RotationPolicy``.

  Privacy: the policy only reads the estimator's noised releases, so it is
  post-processing (``spends_privacy = False``); the estimator records the cost
  of every release in the ledger.

  Args:
    ratio: fraction of the quantizable layers to quantize, in [0, 1].
    beta: inverse temperature, in 1 / (loss units); larger prefers low-impact
      layers more strongly. Default 20: a layer whose estimated loss increase
      is 0.05 higher is e times less likely to be drawn first (per-layer
      increases measured on digits models are 0.01 to 0.05; docs/SCHEDULE.md).
    alpha: EMA weight of the newest release, in (0, 1]. Default 0.5.
    period: epochs between analyses. Default 2 (the paper analyses about every
      2 epochs).
  """

  needs_sensitivities = True

  def __init__(self, *, ratio: float = 0.5, beta: float = DEFAULT_BETA,
               alpha: float = DEFAULT_ALPHA, period: int = DEFAULT_PERIOD):
    self.ratio = _check_ratio(ratio)
    self.beta = v.check_non_negative("beta", beta)
    self.alpha = v.check_probability("alpha", alpha)
    self.period = v.check_int("period", period, low=1)

  def analysis_due(self, epoch: int) -> bool:
    return epoch % self.period == 0

  def smoothed(self, names: Sequence[str], released: _base.Releases) -> np.ndarray:
    """Returns L (the EMA of the releases) in the order of `names`; zeros if none."""
    ema = None
    for release in released.sensitivities:
      missing = [n for n in names if n not in release.estimates]
      if missing:
        v.fail("released", release, f"a release with an estimate for every "
               f"layer; missing {missing}")
      r = np.array([float(release.estimates[n]) for n in names])
      ema = r if ema is None else (1.0 - self.alpha) * ema + self.alpha * r
    return np.zeros(len(names)) if ema is None else ema

  def probabilities(self, layers, released: _base.Releases) -> np.ndarray:
    """pi = softmax(-beta * L): the distribution of the first layer drawn."""
    names = _base.check_layers(layers)
    return _base.softmax(-self.beta * self.smoothed(names, released))

  def draw_order(self, layers, released, generator):
    """Returns the k drawn layer names in draw order (first draw first)."""
    names = _base.check_layers(layers)
    k = _base.num_quantized(self.ratio, len(names))
    logits = -self.beta * self.smoothed(names, released)
    return [names[i] for i in _base.gumbel_top_k(logits, k, generator)]

  def decide(self, epoch, layers, released, generator):
    names = _base.check_layers(layers)
    return _decision(names, self.draw_order(layers, released, generator))

  def get_config(self) -> Dict[str, Any]:
    return {"ratio": self.ratio, "beta": self.beta, "alpha": self.alpha,
            "period": self.period}

"""One-run audit of a whole training run (Steinke, Nasr, Jagielski 2023).

m input-space canaries (random inputs with random labels, far from the
data) are each included in the training set independently with probability
1/2, from a public seed. The run trains exactly as a user would (Keras
``fit`` on ``poisson_dataset`` with a ``DPQuantOptimizer`` and a
``PrivacyLedger``). Afterwards each canary is scored by its negative loss;
the auditor guesses "in" for the ``guesses_in`` highest scores, "out" for
the ``guesses_out`` lowest, abstains on the rest (numbers fixed before the
run, so no correction for choosing them is needed), and counts correct
guesses v of r. ``one_run_epsilon_lower_bound(m, r, v, delta)`` is then a
95%-confidence lower bound on the epsilon of the run, reported next to the
ledger's epsilon for the run.

With ``canary_kind="gradient"`` the canaries are gradient canaries
(``gradient_canaries``): m random unit directions u_i in parameter space,
each in the "in" set with probability 1/2, added as ``C u_i`` to the clipped
sum of every step that Poisson-samples them (probability q per step, like an
example). No input canary joins the data; the score of canary i is the
projection of the total parameter change on ``-u_i``. The ledger's epsilon
covers each canary as one Poisson-sampled example with an arbitrary clipped
gradient (see ``_gradient_canaries``).
"""

import dataclasses
import time
from typing import Any, Callable, Dict, Optional

import numpy as np
import tensorflow as tf

from dpquant_tf import _validation as V
from dpquant_tf import training
from dpquant_tf.audit import _gradient_canaries
from dpquant_tf.audit import _stats
from dpquant_tf.optimizers import DPQuantOptimizer
from dpquant_tf.privacy import PrivacyLedger
from dpquant_tf.privacy import SamplingMethod
from dpquant_tf.privacy import poisson_dataset

__all__ = ["OneRunAudit", "audit_one_run", "score_and_bound"]


@dataclasses.dataclass(frozen=True)
class OneRunAudit:
  """Result of ``audit_one_run``.

  Attributes:
    epsilon_lower_bound: the one-run bound at `confidence`.
    claimed_epsilon: the ledger's epsilon for the whole run.
    delta, confidence: of the bound and the claim.
    canaries: m; included: how many were trained on.
    guesses: r; correct: v.
    steps: DP steps of the run.
    wall_s: seconds.
    canary_kind: "input" or "gradient".
  """
  epsilon_lower_bound: float
  claimed_epsilon: float
  delta: float
  confidence: float
  canaries: int
  included: int
  guesses: int
  correct: int
  steps: int
  wall_s: float
  canary_kind: str = "input"

  @property
  def violated(self) -> bool:
    return self.epsilon_lower_bound > self.claimed_epsilon

  def as_dict(self) -> Dict[str, Any]:
    out = dataclasses.asdict(self)
    out["violated"] = self.violated
    return out


def default_model(dims: int, classes: int) -> tf.keras.Model:
  """A softmax regression (memorizes canaries when dims >= canaries)."""
  return tf.keras.Sequential([
      tf.keras.layers.InputLayer(input_shape=(dims,)),
      tf.keras.layers.Dense(classes, name="logits")])


def guess_counts(scores, included, guesses_in: int, guesses_out: int):
  """(r, v): guesses made and correct ones (top / bottom by score)."""
  scores = np.asarray(scores, np.float64)
  included = np.asarray(included, bool)
  order = np.argsort(-scores, kind="stable")
  top, bottom = order[:guesses_in], order[len(order) - guesses_out:]
  correct = int(included[top].sum()) + int((~included[bottom]).sum())
  return guesses_in + guesses_out, correct


def audit_one_run(
    *, canaries: int = 100, data_size: int = 100, dims: int = 128,
    classes: int = 4, epochs: int = 4, sampling_rate: float = 0.25,
    l2_norm_clip: float = 1.0, noise_multiplier: float = 1.0,
    learning_rate: float = 20.0,
    optimizer_cls: Callable[..., Any] = DPQuantOptimizer,
    optimizer_kwargs: Optional[Dict[str, Any]] = None,
    model_fn: Optional[Callable[[int, int], tf.keras.Model]] = None,
    guesses_in: Optional[int] = None, guesses_out: Optional[int] = None,
    delta: float = 1e-5, confidence: float = 0.95,
    canary_kind: str = "input", score: str = "per_step",
    seed: int = 0) -> OneRunAudit:
  """Trains once with canaries and bounds epsilon from membership guesses.

  Args:
    canaries: m.
    data_size: ordinary examples (a learnable Gaussian-cluster task).
    dims, classes: input features and classes.
    epochs: passes; each has ``ceil(1 / sampling_rate)`` Poisson steps.
    sampling_rate: q of ``poisson_dataset``.
    l2_norm_clip, noise_multiplier, learning_rate: of the optimizer.
    optimizer_cls, optimizer_kwargs: audited optimizer (class and extras).
    model_fn: builds the model from (dims, classes); default softmax
      regression.
    guesses_in, guesses_out: fixed numbers of "in" and "out" guesses
      (default m // 5 each).
    delta, confidence: of the bound and of the ledger's epsilon.
    canary_kind: "input" (random inputs scored by loss) or "gradient"
      (gradient canaries through the optimizer's audit hook, scored by the
      parameter change along each canary's direction).
    score: for gradient canaries, "per_step" (log-likelihood ratio of the
      per-step moves, plain SGD; ``per_step_scores``) or "final" (the total
      parameter change).
    seed: public seed of the data, the canaries, their inclusion and the
      model initialization. The optimizer's noise and the Poisson
      sampling are never seeded.

  Returns:
    A ``OneRunAudit``.
  """
  m = V.check_int("canaries", canaries, low=2)
  if canary_kind not in ("input", "gradient"):
    V.fail("canary_kind", canary_kind, "'input' or 'gradient'")
  gradient = canary_kind == "gradient"
  guesses_in = m // 5 if guesses_in is None else guesses_in
  guesses_out = m // 5 if guesses_out is None else guesses_out
  V.check_int("guesses_in + guesses_out", guesses_in + guesses_out, low=1,
              high=m)
  start = time.perf_counter()
  rng = np.random.default_rng(seed)
  centers = rng.standard_normal(size=(classes, dims))
  y_data = rng.integers(0, classes, size=data_size)
  x_data = centers[y_data] + rng.standard_normal(size=(data_size, dims))
  x_can = rng.standard_normal(size=(m, dims)) * 2.0
  y_can = rng.integers(0, classes, size=m)
  included = rng.random(m) < 0.5 if not gradient else np.zeros(m, bool)
  x = np.concatenate([x_data, x_can[included]]).astype(np.float32)
  y = np.concatenate([y_data, y_can[included]]).astype(np.int64)
  n = len(x)
  steps = int(np.ceil(1.0 / sampling_rate))
  # The sampler draws from OS entropy: a seeded one is accounted at q = 1
  # and the claim would not be the amplified epsilon under audit. (The
  # draw keeps the public seed's later values unchanged.)
  rng.integers(2**31)
  ds = poisson_dataset(x, y, sampling_rate, steps=steps)
  tf.keras.utils.set_random_seed(int(rng.integers(2**31)))
  model = (model_fn or default_model)(dims, classes)
  ledger = PrivacyLedger(sampling_method=SamplingMethod.POISSON,
                         dataset_size=n)
  optimizer = optimizer_cls(
      l2_norm_clip=l2_norm_clip, noise_multiplier=noise_multiplier,
      learning_rate=learning_rate, expected_batch_size=sampling_rate * n,
      sampling_probability=sampling_rate, ledger=ledger,
      **dict(optimizer_kwargs or {}))
  loss = tf.keras.losses.SparseCategoricalCrossentropy(
      from_logits=True, reduction=tf.keras.losses.Reduction.NONE)
  model.compile(optimizer=optimizer, loss=loss)
  training.install_dp_train_step(model)
  if gradient:
    scores, included = _gradient_canaries.fit_with_gradient_canaries(
        model, optimizer,
        lambda cbs: model.fit(ds, epochs=epochs, verbose=0, callbacks=cbs),
        canaries=m, seed=int(rng.integers(2**31)), score=score)
  else:
    model.fit(ds, epochs=epochs, verbose=0)
    logits = model(x_can.astype(np.float32), training=False)
    scores = -loss(y_can, logits).numpy()
  return score_and_bound(
      scores, included, ledger=ledger, guesses_in=guesses_in,
      guesses_out=guesses_out, delta=delta, confidence=confidence,
      canary_kind=canary_kind, wall_s=time.perf_counter() - start)


def score_and_bound(scores, included, *, ledger, guesses_in: int,
                    guesses_out: int, delta: float, confidence: float = 0.95,
                    canary_kind: str = "gradient",
                    wall_s: float = 0.0) -> OneRunAudit:
  """Guesses from canary scores, the one-run bound and the ledger's claim.

  Args:
    scores: [m] canary scores (higher = "in").
    included: [m] bool, the true membership.
    ledger: the run's ``PrivacyLedger`` (its epsilon is the claim).
    guesses_in, guesses_out: "in" guesses for the highest scores, "out"
      guesses for the lowest; fixed before the run.
    delta, confidence: of the bound and the claim.
    canary_kind, wall_s: recorded in the result.

  Returns:
    A ``OneRunAudit``.
  """
  m = len(scores)
  claimed = ledger.epsilon(delta)
  run_steps = sum(c for _, c in ledger.events())
  r, v = guess_counts(scores, included, guesses_in, guesses_out)
  bound = _stats.one_run_epsilon_lower_bound(m, r, v, delta=delta,
                                             confidence=confidence)
  return OneRunAudit(
      epsilon_lower_bound=bound, claimed_epsilon=claimed, delta=delta,
      confidence=confidence, canaries=m, included=int(np.sum(included)),
      guesses=r, correct=v, steps=int(run_steps), wall_s=wall_s,
      canary_kind=canary_kind)

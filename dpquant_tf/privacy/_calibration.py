"""Planning: epsilon of a planned run and the noise multiplier for a target.

A planned run is ``ceil(epochs * steps_per_epoch(N, B / N))`` Poisson-sampled
Gaussian steps with q = B / N, plus planned analysis releases (any
dp_accounting events). ``steps_per_epoch`` (ceil(N / B)) is the one definition
of an epoch's steps, shared with ``poisson_dataset`` and Keras' fixed batches,
so a run calibrated to a target never runs more steps than were planned.
"""

import math
from typing import Iterable

from dpquant_tf import _validation as V
from dpquant_tf.privacy import _accounting
from dpquant_tf.privacy import _events
from dpquant_tf.privacy import _sampling

__all__ = ["calibrate_noise_multiplier", "planned_epsilon", "planned_steps"]


def planned_steps(dataset_size: int, batch_size: float, epochs: float) -> int:
  """Steps of a run: ceil(epochs * steps_per_epoch(N, B / N)).

  One epoch is ``steps_per_epoch(N, B / N)`` = ceil(N / B) steps, as
  ``poisson_dataset`` (default ``steps``) and ``fit(batch_size=B)`` run it
  (TF-Privacy's ceil(epochs * N / B) plans fewer steps than such a pipeline
  runs when B does not divide N).
  """
  dataset_size = V.check_int("dataset_size", dataset_size, low=1)
  batch_size = V.check_positive("batch_size", batch_size)
  epochs = V.check_positive("epochs", epochs)
  q = min(float(batch_size) / float(dataset_size), 1.0)
  per_epoch = _sampling.steps_per_epoch(dataset_size, q)
  return int(math.ceil(epochs * per_epoch - 1e-9))


def _train_events(dataset_size, batch_size, epochs, noise_multiplier):
  q = min(float(batch_size) / float(dataset_size), 1.0)
  event = _events.sampled_gaussian_event(q, noise_multiplier)
  return [(event, planned_steps(dataset_size, batch_size, epochs))]


def _check_plan(dataset_size, batch_size, epochs, delta):
  dataset_size = V.check_int("dataset_size", dataset_size, low=1)
  batch_size = V.check_positive("batch_size", batch_size)
  if batch_size > dataset_size:
    V.fail("batch_size", batch_size, f"<= dataset_size={dataset_size}")
  epochs = V.check_positive("epochs", epochs)
  delta = _accounting.check_delta(delta, dataset_size)
  return dataset_size, batch_size, epochs, delta


def planned_epsilon(*, dataset_size: int, batch_size: float,
                    noise_multiplier: float, epochs: float, delta: float,
                    analyses: Iterable = (),
                    accountant=_accounting.Accountant.RDP) -> float:
  """Epsilon of a planned Poisson-sampled run plus planned analyses.

  Args:
    dataset_size: N.
    batch_size: expected batch size B (q = B / N).
    noise_multiplier: z of every step.
    epochs: epochs (steps = ``planned_steps(N, B, epochs)``).
    delta: target delta.
    analyses: DpEvents or (DpEvent, count) pairs released besides training.
    accountant: ``Accountant.RDP`` or ``PLD``.

  Returns:
    Epsilon at `delta`.
  """
  dataset_size, batch_size, epochs, delta = _check_plan(
      dataset_size, batch_size, epochs, delta)
  noise_multiplier = V.check_non_negative("noise_multiplier",
                                          noise_multiplier)
  accountant = V.check_enum("accountant", accountant, _accounting.Accountant)
  events = _train_events(dataset_size, batch_size, epochs, noise_multiplier)
  events += _accounting.as_event_counts(analyses)
  return _accounting.compose_epsilon(events, delta, accountant)


def calibrate_noise_multiplier(target_epsilon: float, delta: float,
                               dataset_size: int, batch_size: float,
                               epochs: float, *, analyses: Iterable = (),
                               accountant=_accounting.Accountant.RDP,
                               epsilon_tolerance: float = 0.01,
                               max_noise_multiplier: float = 1e3) -> float:
  """Smallest noise multiplier (to a tolerance) meeting `target_epsilon`.

  Bisection as in Opacus's ``get_noise_multiplier``: the returned z always
  satisfies planned_epsilon(z) <= target_epsilon, and
  target_epsilon - planned_epsilon(z) <= epsilon_tolerance.

  Args:
    target_epsilon: epsilon budget for training plus analyses.
    delta: target delta.
    dataset_size: N.
    batch_size: expected batch size B.
    epochs: planned epochs.
    analyses: planned analysis releases (DpEvents or (event, count) pairs).
    accountant: ``Accountant.RDP`` or ``PLD``.
    epsilon_tolerance: bisection stops within this of the target.
    max_noise_multiplier: largest z tried.

  Returns:
    The noise multiplier (Python float).

  Raises:
    ValueError: if no z <= max_noise_multiplier meets the target (e.g. the
      analyses alone spend it).
  """
  target_epsilon = V.check_positive("target_epsilon", target_epsilon)
  dataset_size, batch_size, epochs, delta = _check_plan(
      dataset_size, batch_size, epochs, delta)
  epsilon_tolerance = V.check_positive("epsilon_tolerance",
                                       epsilon_tolerance)
  accountant = V.check_enum("accountant", accountant, _accounting.Accountant)
  extra = _accounting.as_event_counts(analyses)

  def eps(z):
    events = _train_events(dataset_size, batch_size, epochs, z) + extra
    return _accounting.compose_epsilon(events, delta, accountant)

  high = 10.0
  eps_high = eps(high)
  while eps_high > target_epsilon:
    if high >= max_noise_multiplier:
      analysis_eps = _accounting.compose_epsilon(extra, delta, accountant)
      raise ValueError(
          f"Expected target_epsilon={target_epsilon!r} to be reachable with "
          f"noise_multiplier <= {max_noise_multiplier}: epsilon there is "
          f"{eps_high:.4g} (planned analyses alone spend {analysis_eps:.4g}).")
    high = min(2 * high, max_noise_multiplier)
    eps_high = eps(high)
  low = 0.0
  while target_epsilon - eps_high > epsilon_tolerance:
    mid = (low + high) / 2
    e = eps(mid)
    if e <= target_epsilon:
      high, eps_high = mid, e
    else:
      low = mid
    if high - low < 1e-9:
      break
  if eps_high > target_epsilon:  # Never returns a noise that overspends.
    raise ValueError(f"Calibration failed: epsilon {eps_high} > target "
                     f"{target_epsilon}.")
  return float(high)

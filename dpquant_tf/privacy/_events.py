"""Privacy events as data: an in-graph table of (q, z) -> step count.

Each DP step of the optimizer is a Poisson-sampled Gaussian mechanism with
sampling probability q and effective noise multiplier z. The optimizer keeps a
small fixed-size table of the distinct (q, z) pairs it has used and how many
steps used each, in ``tf.Variable``s, updated in graph (XLA compatible, works
with ``steps_per_execution > 1``). A table overflow sets a flag; building
events from an overflowed table raises, it never approximates.
"""

from typing import List, Tuple

import dp_accounting
import numpy as np
import tensorflow as tf

__all__ = [
    "EventTableOverflowError",
    "gaussian_event",
    "sampled_gaussian_event",
    "UnknownSamplingProbabilityError",
    "events_from_table",
    "merge_event_tables",
    "table_difference",
    "update_event_table",
]

DEFAULT_TABLE_SIZE = 64


class EventTableOverflowError(RuntimeError):
  """More distinct (q, z) pairs than the optimizer's event table holds."""


class UnknownSamplingProbabilityError(ValueError):
  """Steps were taken without a known sampling probability."""


def gaussian_event(noise_multiplier) -> dp_accounting.DpEvent:
  """The one builder of ``GaussianDpEvent`` (Python float, never numpy/int)."""
  return dp_accounting.GaussianDpEvent(float(noise_multiplier))


def sampled_gaussian_event(sampling_probability,
                           noise_multiplier) -> dp_accounting.DpEvent:
  """The one builder of the sampled Gaussian mechanism's event:
  ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` with Python floats."""
  return dp_accounting.PoissonSampledDpEvent(
      float(sampling_probability), gaussian_event(noise_multiplier))


def update_event_table(q_table: tf.Tensor, z_table: tf.Tensor,
                       counts: tf.Tensor, used: tf.Tensor,
                       q: tf.Tensor, z: tf.Tensor):
  """Returns the table after one more step with (q, z). Pure function.

  Args:
    q_table: float64 [K] sampling probabilities of the used slots.
    z_table: float64 [K] noise multipliers of the used slots.
    counts: int64 [K] step counts.
    used: int32 scalar, number of used slots.
    q: float64 scalar, this step's sampling probability.
    z: float64 scalar, this step's effective noise multiplier.

  Returns:
    (q_table, z_table, counts, used, overflowed) with `overflowed` a bool
    scalar that is True when the step could not be recorded (table full).
  """
  size = tf.shape(q_table)[0]
  in_use = tf.range(size) < used
  match = in_use & tf.equal(q_table, q) & tf.equal(z_table, z)
  found = tf.reduce_any(match)
  match_idx = tf.cast(tf.argmax(tf.cast(match, tf.int32)), tf.int32)
  full = used >= size
  overflowed = tf.logical_and(tf.logical_not(found), full)
  idx = tf.where(found, match_idx, tf.minimum(used, size - 1))
  ok = tf.logical_not(overflowed)
  one_hot = tf.one_hot(idx, size, on_value=True, off_value=False,
                       dtype=tf.bool) & ok
  new_q = tf.where(one_hot, q, q_table)
  new_z = tf.where(one_hot, z, z_table)
  new_counts = counts + tf.cast(one_hot, counts.dtype)
  new_used = used + tf.cast(ok & tf.logical_not(found), used.dtype)
  return new_q, new_z, new_counts, new_used, overflowed


def _key_match(src_q, src_z, src_live, dst_q, dst_z, dst_used):
  """[S, K] bool: source slot i holds the same (q, z) as destination slot j."""
  in_use = tf.range(tf.shape(dst_q)[0]) < dst_used
  return (src_live[:, None] & in_use[None, :] &
          tf.equal(src_q[:, None], dst_q[None, :]) &
          tf.equal(src_z[:, None], dst_z[None, :]))


def table_difference(q_table, z_table, counts, used, other_q, other_z,
                     other_counts, other_used) -> tf.Tensor:
  """Per slot of the first table: max(count - the other table's count of the
  same (q, z), 0) (int64 [K]). Pure function; unused slots give 0."""
  live = tf.range(tf.shape(q_table)[0]) < used
  match = _key_match(q_table, z_table, live, other_q, other_z, other_used)
  matched = tf.reduce_sum(tf.where(match, other_counts[None, :],
                                   tf.zeros_like(other_counts)[None, :]),
                          axis=1)
  return tf.where(live, tf.maximum(counts - matched, 0),
                  tf.zeros_like(counts))


def merge_event_tables(q_table, z_table, counts, used, src_q, src_z,
                       src_counts):
  """Adds the source table's counts into the table, keyed by (q, z).

  Pure function (XLA compatible). Source slots with count 0 are skipped;
  the source holds each (q, z) at most once (as every event table does).

  Returns:
    (q_table, z_table, counts, used, overflowed): `overflowed` is True when
    some source entry found no free slot (its steps were NOT added).
  """
  size = tf.shape(q_table)[0]
  live = src_counts > 0
  match = _key_match(src_q, src_z, live, q_table, z_table, used)
  found = tf.reduce_any(match, axis=1)
  add_existing = tf.reduce_sum(
      tf.where(match, src_counts[:, None], tf.zeros_like(counts)[None, :]),
      axis=0)
  new = live & tf.logical_not(found)
  rank = tf.cumsum(tf.cast(new, tf.int32)) - 1
  slot = used + rank
  fits = new & (slot < size)
  overflowed = tf.reduce_any(new & (slot >= size))
  onehot = tf.one_hot(tf.where(fits, slot, -tf.ones_like(slot)), size,
                      on_value=True, off_value=False, dtype=tf.bool)
  taken = tf.reduce_any(onehot, axis=0)
  zeros_q = tf.zeros_like(q_table)[None, :]
  new_q = tf.where(taken, tf.reduce_sum(
      tf.where(onehot, src_q[:, None], zeros_q), axis=0), q_table)
  new_z = tf.where(taken, tf.reduce_sum(
      tf.where(onehot, src_z[:, None], zeros_q), axis=0), z_table)
  new_counts = counts + add_existing + tf.reduce_sum(
      tf.where(onehot, src_counts[:, None], tf.zeros_like(counts)[None, :]),
      axis=0)
  new_used = used + tf.reduce_sum(tf.cast(fits, used.dtype))
  return new_q, new_z, new_counts, new_used, overflowed


def events_from_table(q_table, z_table, counts, used, overflow,
                      ) -> List[Tuple[dp_accounting.DpEvent, int]]:
  """Builds ``(PoissonSampledDpEvent(q, GaussianDpEvent(z)), count)`` pairs.

  All numbers are converted to Python floats/ints (dp_accounting pitfall).

  Raises:
    EventTableOverflowError: if the table overflowed.
    UnknownSamplingProbabilityError: if a step had no sampling probability.
  """
  if bool(np.asarray(overflow)):
    raise EventTableOverflowError(
        "The optimizer saw more distinct (sampling probability, noise "
        "multiplier) pairs than its event table holds; the privacy cost of "
        "the extra steps was not recorded. Construct the optimizer with a "
        "larger event_table_size or change noise/bit settings less often.")
  used = int(np.asarray(used))
  q_table = np.asarray(q_table)
  z_table = np.asarray(z_table)
  counts = np.asarray(counts)
  out = []
  for i in range(used):
    q, z, c = float(q_table[i]), float(z_table[i]), int(counts[i])
    if c == 0:
      continue
    if q < 0:
      raise UnknownSamplingProbabilityError(
          f"{c} training steps were taken without a known sampling "
          "probability: construct the optimizer with sampling_probability= "
          "or dataset_size=, or call optimizer.set_sampling_probability().")
    out.append((sampled_gaussian_event(q, z), c))
  return out

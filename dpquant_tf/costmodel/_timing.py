"""Measured step time per epoch: a Keras callback writing it into ``logs``.

The cost model predicts a speed-up; :class:`StepTimeCallback` measures the
step time each epoch actually took, so a run's metrics show both side by
side. Wall-clock time of this process: on a shared machine it is noisy.
"""

import time
from typing import Dict, List

import tensorflow as tf

__all__ = ["StepTimeCallback"]


class StepTimeCallback(tf.keras.callbacks.Callback):
  """Writes ``step_time_s``, ``epoch_time_s`` and ``epoch_wall_s`` into ``logs``.

  ``step_time_s`` is the mean wall-clock time of the epoch's steps after the
  first (the first step of a run traces and compiles): from the end of the
  first step to the end of the last, so epoch-end work of other callbacks
  (the epsilon, a schedule: about 50 ms each in ``examples/train.py``) is
  not in it; an epoch of one step reports that step. ``epoch_time_s`` is
  the time from this callback's ``on_epoch_begin`` to its ``on_epoch_end``:
  put the callback last in the list so that work other callbacks do at the
  epoch start (a loss-sensitivity analysis) is not counted. ``epoch_wall_s`` counts everything: the time
  from the previous epoch's end (for the first epoch, from this callback's
  ``on_train_begin``) to this epoch's end, so the first epoch's tracing and
  every callback's epoch-start work (the analysis) are in it; the fixed
  cost of a run is the first epoch's ``epoch_wall_s`` over a later one's.
  Timing reads the host clock only; it adds no device synchronisation
  (tensor logs are not converted).

  Attributes:
    history: one dict per epoch: ``epoch``, ``step_time_s``, ``epoch_time_s``,
      ``epoch_wall_s``, ``first_step_s`` (the epoch's first step: in the
      first epoch, tracing and compiling the train step), ``steps``.
  """

  def __init__(self):
    super().__init__()
    self._supports_tf_logs = True
    self.history: List[Dict[str, float]] = []
    self._begin = self._first_end = self._last_end = None
    self._batch_end = None
    self._steps = 0

  def on_train_begin(self, logs=None):
    del logs
    self._last_end = time.perf_counter()

  def on_epoch_begin(self, epoch, logs=None):
    del epoch, logs
    self._begin = time.perf_counter()
    self._first_end = None
    self._steps = 0

  def on_train_batch_end(self, batch, logs=None):
    del batch, logs
    self._steps += 1
    self._batch_end = time.perf_counter()
    if self._first_end is None:
      self._first_end = self._batch_end

  def on_epoch_end(self, epoch, logs=None):
    end = time.perf_counter()
    if self._begin is None:
      return
    epoch_time = end - self._begin
    if self._steps > 1:
      step_time = (self._batch_end - self._first_end) / (self._steps - 1)
    else:
      step_time = epoch_time / max(self._steps, 1)
    wall = end - (self._last_end if self._last_end is not None else self._begin)
    self._last_end = end
    entry = {"epoch": int(epoch), "step_time_s": float(step_time),
             "epoch_time_s": float(epoch_time), "epoch_wall_s": float(wall),
             "first_step_s": float((self._first_end or end) - self._begin),
             "steps": int(self._steps)}
    self.history.append(entry)
    if logs is not None:
      for key in ("step_time_s", "epoch_time_s", "epoch_wall_s"):
        logs[key] = entry[key]

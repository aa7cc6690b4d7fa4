"""The owned training step: the one path every DP step takes.

``owned_train_step(model, data)`` is Keras' ``train_step`` with three
differences:

* the per-example loss is computed here and handed, with the model and the
  input batch, to ``optimizer._owned_step`` (no stack frames are read);
* rows whose sample weight is 0 (the padding of Poisson batches) are excluded
  from the displayed loss and from every compiled metric (the weight is
  passed to the metrics as a mask), and their loss is exactly 0 even where the
  model gives them NaN (``Embedding(mask_zero=True)`` on an all-zero row);
* the step records the q the installer stated: the library's own sampler's
  rate (``make_private``), else 1 (no amplification by sampling).
"""

import functools
import logging
from typing import Optional

import tensorflow as tf

from dpquant_tf import _validation as V

__all__ = ["install_dp_train_step", "owned_train_step", "per_example_loss"]

_log = logging.getLogger(__name__)

# Attribute marking an installed owned step on a model instance.
_MARK = "_dpquant_owned_step_q"


def _unpack(data):
  return tf.keras.utils.unpack_x_y_sample_weight(data)


def _loss_function(model, loss):
  """The per-example loss callable: `loss`, else the compiled one."""
  loss = loss if loss is not None else getattr(model, "loss", None)
  if isinstance(loss, (dict, list, tuple)):
    V.fail("loss", loss, "one loss for a single-output model (the owned DP "
           "step supports one per-example loss)")
  if loss is None:
    V.fail("loss", None, "a per-example loss: compile the model with "
           "loss=... (reduction=tf.keras.losses.Reduction.NONE) or pass loss=")
  return tf.keras.losses.get(loss)


def per_example_loss(model, y, y_pred, sample_weight=None, *, loss=None):
  """(per-example loss [rows], real-row mask [rows]) of one batch.

  Rows with sample weight 0 (padding) get exactly 0, whatever the model
  returns for them; regularization losses are added to real rows only, so a
  padding row contributes a zero gradient.
  """
  fn = _loss_function(model, loss)
  values = fn(y, y_pred)
  values = tf.convert_to_tensor(values)
  if values.shape.rank is not None and values.shape.rank > 1:
    values = tf.reduce_sum(tf.reshape(values, [tf.shape(values)[0], -1]),
                           axis=1)
  values = tf.cast(values, tf.float32)
  if sample_weight is None:
    weight = tf.ones_like(values)
  else:
    weight = tf.reshape(tf.cast(sample_weight, values.dtype), [-1])
  real = weight > 0
  regularization = (tf.cast(tf.add_n(model.losses), values.dtype)
                    if model.losses else tf.zeros([], values.dtype))
  safe = tf.where(real, values, tf.zeros_like(values))
  return tf.where(real, safe * weight + regularization,
                  tf.zeros_like(values)), real


def _masked(y_pred, real):
  """`y_pred` whose Keras mask excludes padding rows (metrics honour it)."""
  out = tf.identity(y_pred)
  mask = real
  old = getattr(y_pred, "_keras_mask", None)
  if old is not None:
    mask = tf.logical_and(
        tf.cast(old, tf.bool),
        tf.reshape(real, [-1] + [1] * (old.shape.rank - 1)))
  out._keras_mask = mask  # pylint: disable=protected-access
  return out


def owned_train_step(model, data, *, sampling_probability: float = 1.0,
                     loss=None):
  """One owned DP training step of `model` on `data` (x, y[, weight])."""
  x, y, sample_weight = _unpack(data)
  optimizer = model.optimizer
  if not hasattr(optimizer, "_owned_step"):
    V.fail("model.optimizer", type(optimizer).__name__,
           "a DPQuant optimizer (DPQuantOptimizer or DPQuantAdamOptimizer)",
           TypeError)
  with tf.GradientTape() as tape:
    y_pred = model(x, training=True)
    losses, real = per_example_loss(model, y, y_pred, sample_weight,
                                    loss=loss)
  optimizer._owned_step(model, x, losses, tape, sampling_probability)  # pylint: disable=protected-access
  # Displayed loss: mean over real rows (padding excluded).
  count = tf.reduce_sum(tf.cast(real, tf.float32))
  tracker = None
  if model.compiled_loss is not None:
    if not model.compiled_loss.built:
      model.compiled_loss.build(y_pred)
    tracker = model.compiled_loss.metrics[0] if model.compiled_loss.metrics \
        else None
  if tracker is not None:
    tracker.update_state(tf.reduce_sum(losses) / tf.maximum(count, 1.0),
                         sample_weight=count)
  if model.compiled_metrics is not None:
    model.compiled_metrics.update_state(y, _masked(y_pred, real), None)
  return model.get_metrics_result()


def install_dp_train_step(model, *, sampling_probability: float = 1.0,
                          loss=None):
  """Makes `model.fit` take every step through the owned DP step.

  The compile form (``model.compile(optimizer=DPQuantOptimizer(...))``) calls
  this through ``PrivacyCallback`` (``set_model``, before Keras builds the
  train function); call it yourself to fit without one. `fit`'s data is not
  the library's sampler, so its steps are recorded with q = 1 (no
  amplification by sampling; each record counted in every step, at most
  once per step).

  Args:
    model: a compiled ``tf.keras.Model``.
    sampling_probability: the q recorded per step (the library passes its
      own sampler's rate; users keep 1.0).
    loss: per-example loss (default: the compiled loss).

  Returns:
    `model`.
  """
  if not isinstance(model, tf.keras.Model):
    V.fail("model", type(model).__name__, "a tf.keras.Model", TypeError)
  q = V.check_probability("sampling_probability", sampling_probability)
  if getattr(model, _MARK, None) == q:
    return model
  step = functools.partial(owned_train_step, model, sampling_probability=q,
                           loss=loss)
  # Plain attributes (no Keras tracking): the step is not saved state.
  object.__setattr__(model, "train_step", step)
  object.__setattr__(model, _MARK, q)
  # A train function traced before used the old step: rebuild it.
  object.__setattr__(model, "train_function", None)
  opt = getattr(model, "optimizer", None)
  if hasattr(opt, "set_sampling_probability"):
    opt.set_sampling_probability(q)
  return model


def installed_sampling_probability(model) -> Optional[float]:
  """The q of the owned step installed on `model` (None: none installed)."""
  return getattr(model, _MARK, None)

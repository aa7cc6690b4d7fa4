"""DPQuantAdamWOptimizer: DP-Adam with decoupled weight decay (AdamW).

AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR
2019) shrinks each decayed variable by ``learning_rate * weight_decay * var``
before Adam's update, instead of adding ``weight_decay * var`` to the gradient
(which Adam's moment normalisation would rescale). Per step:

1. the private gradient, exactly as ``DPQuantAdamOptimizer`` (per-example
   clipping, optional quantization, Gaussian noise, the step's privacy event
   recorded in the same in-graph table and ``PrivacyLedger``);
2. ``var <- var - lr * weight_decay * var`` for every variable not excluded;
3. Adam's update with the noised gradient (legacy Keras Adam: its bias-corrected
   step size).

Steps 2 and 3 read only the weights and the already noised gradient: they are
post-processing and cost no privacy. Same ledger behaviour as the other
optimizers: one event per step, nothing for the decay.
"""

from typing import Optional, Sequence

import tensorflow as tf

from dpquant_tf import _validation
from dpquant_tf.optimizers._dp_quant import DPQuantAdamOptimizer

__all__ = ["DPQuantAdamWOptimizer"]


@tf.keras.utils.register_keras_serializable(package="dpquant_tf")
class DPQuantAdamWOptimizer(DPQuantAdamOptimizer):
  """DP-AdamW: ``DPQuantAdamOptimizer`` plus decoupled weight decay.

  Args:
    l2_norm_clip, noise_multiplier, num_microbatches,
      gradient_accumulation_steps: as ``DPQuantOptimizer``.
    weight_decay: decay coefficient ``>= 0`` (0 gives DP-Adam's step). The
      shrink per step is ``learning_rate * weight_decay`` (the learning rate
      of the step, schedules included, without Adam's bias correction), as
      in Keras' ``AdamW``.
    exclude_from_weight_decay: substrings of variable names that are not
      decayed (for example ``("bias", "gamma", "beta")`` for biases and
      LayerNorm, as in BERT); default: every variable is decayed.
    name: optimizer name.
    **kwargs: as ``DPQuantAdamOptimizer`` (``ledger``, ``learning_rate``,
      ``beta_1``, ...).

  Example:
    >>> opt = DPQuantAdamWOptimizer(1.0, 1.1, weight_decay=0.01,
    ...                             exclude_from_weight_decay=("bias",),
    ...                             learning_rate=1e-3)
  """

  def __init__(self, l2_norm_clip, noise_multiplier, num_microbatches=None,
               gradient_accumulation_steps=1, *, weight_decay: float = 0.01,
               exclude_from_weight_decay: Optional[Sequence[str]] = None,
               name="DPQuantAdamWOptimizer", **kwargs):
    weight_decay = _validation.check_non_negative("weight_decay", weight_decay)
    if exclude_from_weight_decay is None:
      exclude = ()
    elif isinstance(exclude_from_weight_decay, str) or not all(
        isinstance(s, str) and s for s in exclude_from_weight_decay):
      _validation.fail("exclude_from_weight_decay", exclude_from_weight_decay,
                       "a sequence of non-empty variable-name substrings",
                       TypeError)
    else:
      exclude = tuple(exclude_from_weight_decay)
    super().__init__(l2_norm_clip, noise_multiplier, num_microbatches,
                     gradient_accumulation_steps, name=name, **kwargs)
    self._weight_decay = float(weight_decay)
    self._exclude = exclude

  @property
  def weight_decay(self) -> float:
    return self._weight_decay

  def _decays(self, var) -> bool:
    return self._weight_decay > 0 and not any(s in var.name
                                              for s in self._exclude)

  def _decay(self, var, apply_state):
    """``var -= lr * weight_decay * var`` (a no-op op when not decayed)."""
    if not self._decays(var):
      return tf.no_op()
    var_device, var_dtype = var.device, var.dtype.base_dtype
    coefficients = ((apply_state or {}).get((var_device, var_dtype))
                    or self._fallback_apply_state(var_device, var_dtype))
    lr = coefficients["lr_t"]   # the step's learning rate, no bias correction
    return var.assign_sub(var * (lr * tf.cast(self._weight_decay, var_dtype)),
                          read_value=False)

  def _resource_apply_dense(self, grad, var, apply_state=None):
    with tf.control_dependencies([self._decay(var, apply_state)]):
      return super()._resource_apply_dense(grad, var, apply_state)

  def _resource_apply_sparse(self, grad, var, indices, apply_state=None):
    with tf.control_dependencies([self._decay(var, apply_state)]):
      return super()._resource_apply_sparse(grad, var, indices, apply_state)

  def get_config(self):
    config = super().get_config()
    config["weight_decay"] = self._weight_decay
    config["exclude_from_weight_decay"] = list(self._exclude) or None
    return config

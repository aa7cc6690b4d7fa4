"""The DP step the bf16 quantization tests measure contributions with."""

import tensorflow as tf

from dpquant_tf.optimizers import DPQuantOptimizer

_LOSS = tf.keras.losses.MeanSquaredError(reduction="none")


def dp_sum_step(model, spec, *, clip, norm, jit=False):
  """tf.function: the optimizer's clipped sum (noise 0) times ``norm``."""
  opt = DPQuantOptimizer(clip, 0.0, learning_rate=0.1,
                         expected_batch_size=norm, seed=0)

  def step(x):
    with tf.GradientTape() as tape:
      out = model(x, training=True)
      loss = _LOSS(tf.zeros_like(out) + 1.0, out)
    with opt._bind(model, x):  # pylint: disable=protected-access
      pairs = opt._compute_gradients(loss, model.trainable_variables, tape=tape)  # pylint: disable=protected-access
    return [g * norm for g, _ in pairs]

  return tf.function(step, jit_compile=jit, input_signature=[spec])

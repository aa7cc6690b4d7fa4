"""DPQuantOptimizer(gradient_quantization=False): the step has no gradient
quantization branch; what it refuses, and that it takes the same step."""

import numpy as np
import pytest
import tensorflow as tf

import dpquant_tf  # noqa: F401  (Keras 2 switch before TensorFlow)
from dpquant_tf.optimizers import DPQuantAdamOptimizer
from dpquant_tf.optimizers import DPQuantOptimizer


def _model():
  tf.keras.utils.set_random_seed(0)
  return tf.keras.Sequential([tf.keras.Input((5,)),
                              tf.keras.layers.Dense(4, activation="tanh"),
                              tf.keras.layers.Dense(3)])


def _loss(y, logits):
  return tf.keras.losses.sparse_categorical_crossentropy(
      y, logits, from_logits=True)


def _step(opt, x, y):
  model = _model()

  @tf.function
  def step():
    with tf.GradientTape() as tape:
      per_example = _loss(y, model(x, training=True))
    opt.dp_step(model, x, per_example, tape)

  step()
  return [w.numpy() for w in model.trainable_variables], step


@pytest.mark.parametrize("cls", [DPQuantOptimizer, DPQuantAdamOptimizer])
def test_without_the_branch_the_step_is_the_same(cls):
  rng = np.random.default_rng(0)
  x = tf.constant(rng.normal(size=(8, 5)).astype(np.float32))
  y = tf.constant(rng.integers(0, 3, size=8).astype(np.int32))
  kw = dict(l2_norm_clip=0.5, noise_multiplier=1.0, seed=3,
            learning_rate=0.1)
  with_branch, full_step = _step(cls(**kw), x, y)
  lean_opt = cls(gradient_quantization=False, **kw)
  without, lean_step = _step(lean_opt, x, y)
  for a, b in zip(with_branch, without):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

  def ops(step):   # every op, also those inside conds' branch functions
    graph_def = step.get_concrete_function().graph.as_graph_def()
    return len(graph_def.node) + sum(len(f.node_def)
                                     for f in graph_def.library.function)

  # The quantization branch is not built: a much smaller step.
  assert ops(lean_step) < 0.8 * ops(full_step)
  assert lean_opt.get_config()["gradient_quantization"] is False


def test_refuses_bits_it_cannot_apply_before_any_state_change():
  with pytest.raises(ValueError, match="gradient_bits.*gradient_quantization"):
    DPQuantOptimizer(l2_norm_clip=1.0, noise_multiplier=1.0, gradient_bits=8,
                     gradient_quantization=False)
  with pytest.raises(TypeError, match="gradient_quantization"):
    DPQuantOptimizer(l2_norm_clip=1.0, noise_multiplier=1.0,
                     gradient_quantization="no")
  opt = DPQuantOptimizer(l2_norm_clip=1.0, noise_multiplier=1.0,
                         gradient_quantization=False)
  opt.set_gradient_bits(0)   # exact: allowed
  with pytest.raises(ValueError, match="bits.*gradient_quantization=False"):
    opt.set_gradient_bits({"dense": 8})
  assert opt.gradient_bits() in ({}, {"*": 0})

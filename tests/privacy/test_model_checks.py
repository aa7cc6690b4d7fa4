"""The one model check: BatchNorm by class, state assigned by a training step,
tapped layers inside TimeDistributed; every problem reported at once."""

import dpquant_tf  # noqa: F401  (Keras 2 before TensorFlow)
import numpy as np
import pytest
import tensorflow as tf

from dpquant_tf import perexample
from dpquant_tf import quantization as dq

L = tf.keras.layers


class RunningMean(L.Layer):
  """The attack layer: keeps the unnoised batch mean in a non-trainable variable."""

  def build(self, input_shape):
    self.kernel = self.add_weight("kernel", (input_shape[-1], 2))
    self.batch_mean = self.add_weight("batch_mean", (input_shape[-1],),
                                      trainable=False, initializer="zeros")

  def call(self, x, training=None):
    if training:
      self.batch_mean.assign(tf.reduce_mean(x, axis=0))
    return tf.matmul(x, self.kernel)


class MyBatchNorm(L.BatchNormalization):
  pass


def _bn_zoo():
  inp = tf.keras.Input((4,))
  h = L.Dense(4, name="d0")(inp)
  h = L.BatchNormalization(name="norm_a")(h)
  h = L.BatchNormalization(center=False, scale=False, name="plain")(h)
  h = L.experimental.SyncBatchNormalization(name="sync")(h)
  h = MyBatchNorm(name="mine")(h)
  return tf.keras.Model(inp, L.Dense(2, name="head")(h))


def test_batchnorm_by_class_all_reported_at_once_and_fixable():
  model = _bn_zoo()
  problems = dpquant_tf.validate_model(model, strict=False)
  assert len(problems) == 4, problems
  for name, p in zip(["norm_a", "plain", "sync", "mine"], problems):
    assert f"'{name}'" in p and "fix_model" in p
  with pytest.raises(ValueError, match=r"norm_a[\s\S]*plain"
                     r"[\s\S]*sync[\s\S]*mine"):
    dpquant_tf.DPQuantOptimizer.check_model(model)
  fixed = dpquant_tf.fix_model(model)   # center=False, scale=False included
  assert dpquant_tf.validate_model(fixed) == []
  assert not any(isinstance(l, L.BatchNormalization) for l in fixed.layers)


def _running_mean_model():
  tf.keras.utils.set_random_seed(0)
  return tf.keras.Sequential([tf.keras.Input((3,)), RunningMean(name="rm"),
                              L.Dense(2, name="head")])


def test_state_assigned_by_a_training_step_is_refused_before_any_step():
  model = _running_mean_model()
  problems = dpquant_tf.validate_model(model, strict=False)
  assert len(problems) == 1
  assert "'rm'" in problems[0] and "batch_mean" in problems[0]
  with pytest.raises(ValueError, match="rm.*batch_mean"):
    dpquant_tf.DPQuantOptimizer.check_model(model)
  # The check traced symbolically: no step ran, the state is untouched.
  np.testing.assert_array_equal(model.get_layer("rm").batch_mean.numpy(),
                                np.zeros(3, np.float32))


def test_state_update_inside_cond_of_a_subclassed_model_is_found():

  class Net(tf.keras.Model):

    def __init__(self):
      super().__init__()
      self.rm = RunningMean(name="hidden_stats")
      self.head = L.Dense(1)

    def call(self, x, training=None):
      h = tf.cond(tf.reduce_sum(x) > 0,
                  lambda: self.rm(x, training=training),
                  lambda: self.rm(-x, training=training))
      return self.head(h)

  net = Net()
  net(tf.zeros((2, 3)))
  problems = dpquant_tf.validate_model(net, strict=False)
  assert len(problems) == 1 and "hidden_stats" in problems[0]


def test_frozen_layers_and_quantized_layers_pass():
  frozen = L.Dense(4, name="frozen")
  model = tf.keras.Sequential([tf.keras.Input((3,)), frozen, L.Dense(2)])
  frozen.trainable = False
  assert model.non_trainable_variables
  assert dpquant_tf.validate_model(model) == []
  quantized = dq.quantize_model(model)
  assert quantized.non_trainable_variables   # bits, formats, flags
  assert dpquant_tf.validate_model(quantized) == []
  dpquant_tf.DPQuantOptimizer.check_model(quantized)


def test_tapped_layer_inside_time_distributed_is_refused():
  inp = tf.keras.Input((5, 3))
  h = L.TimeDistributed(perexample.TappedLayer(L.Dense(4)), name="td")(inp)
  out = L.Dense(2)(L.GlobalAveragePooling1D()(h))
  model = tf.keras.Model(inp, out)
  problems = dpquant_tf.validate_model(model, strict=False)
  assert len(problems) == 1 and "'td'" in problems[0]
  assert "TimeDistributed" in problems[0]
  # A plain Dense inside TimeDistributed takes the jacobian path: fine.
  plain = tf.keras.Model(inp, L.TimeDistributed(L.Dense(4))(inp))
  assert dpquant_tf.validate_model(plain) == []


def test_check_inside_a_step_keeps_the_fast_path_taps():
  """The optimizer may run the check between the forward pass and the
  per-example gradients: the taps of that step must survive it."""
  model = perexample.tap_model(tf.keras.Sequential(
      [tf.keras.Input((3,)), L.Dense(4), L.Dense(2)]))
  x = tf.ones((4, 3))

  @tf.function
  def step():
    model(x, training=True)
    taps = [l.tap_output for l in model.layers]
    dpquant_tf.validate_model(model)
    return all(a is l.tap_output for a, l in zip(taps, model.layers))

  assert bool(step())


def test_stateful_rnn_states_are_refused():
  """RNN states are not weights, but a stateful RNN assigns them from the batch."""
  inp = tf.keras.Input((4, 2), batch_size=2)
  stateful = tf.keras.Model(inp, L.SimpleRNN(3, stateful=True, name="srnn")(inp))
  problems = dpquant_tf.validate_model(stateful, strict=False)
  assert len(problems) == 1 and "'srnn'" in problems[0]
  stateless = tf.keras.Model(inp, L.SimpleRNN(3)(inp))
  assert dpquant_tf.validate_model(stateless) == []


def test_fit_refuses_the_running_mean_layer_before_any_step():
  """Through compile/fit: the optimizer runs the check itself."""
  model = _running_mean_model()
  before = [w.copy() for w in model.get_weights()]
  model.compile(
      optimizer=dpquant_tf.DPQuantOptimizer(
          l2_norm_clip=1.0, noise_multiplier=1.0, learning_rate=0.1,
          sampling_probability=0.5),
      loss=tf.keras.losses.SparseCategoricalCrossentropy(
          from_logits=True, reduction=tf.keras.losses.Reduction.NONE))
  dpquant_tf.install_dp_train_step(model)
  x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
  with pytest.raises(ValueError, match="rm.*batch_mean"):
    model.fit(x, np.zeros(8, np.int32), batch_size=4, epochs=1, verbose=0)
  for a, b in zip(model.get_weights(), before):
    np.testing.assert_array_equal(a, b)   # the batch mean never left the step


@pytest.mark.parametrize("compile_kwargs", [
    {"run_eagerly": False}, {"run_eagerly": True}, {"jit_compile": True},
    {"steps_per_execution": 2}])
def test_owned_step_reads_state_writes_from_its_own_forward_pass(
    compile_kwargs):
  """The owned train step's check reads the writes of the forward pass it
  traced (no second trace; also under XLA and inside the loop of several
  steps per execution); eagerly it traces forward and loss before running
  them. Either way the running-mean layer is refused before any weight or
  state changes."""
  model = _running_mean_model()
  before = [w.copy() for w in model.get_weights()]
  model.compile(
      optimizer=dpquant_tf.DPQuantOptimizer(
          l2_norm_clip=1.0, noise_multiplier=1.0, learning_rate=0.1),
      loss=tf.keras.losses.SparseCategoricalCrossentropy(
          from_logits=True, reduction=tf.keras.losses.Reduction.NONE),
      **compile_kwargs)
  dpquant_tf.install_dp_train_step(model)
  x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
  with pytest.raises(ValueError, match="rm.*batch_mean"):
    model.fit(x, np.zeros(8, np.int32), batch_size=4, epochs=1, verbose=0)
  for a, b in zip(model.get_weights(), before):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("run_eagerly", [False, True])
def test_state_write_in_the_loss_is_found_in_the_step_graph(run_eagerly):
  """Reading the step's graph sees writes the loss makes too."""
  model = tf.keras.Sequential([tf.keras.Input((3,)), L.Dense(2, name="head")])
  head = model.get_layer("head")
  stash = head.add_weight("stash", (2,), trainable=False, initializer="zeros")

  def leaky_loss(y, logits):
    stash.assign(tf.reduce_mean(logits, axis=0))
    return tf.keras.losses.sparse_categorical_crossentropy(
        y, logits, from_logits=True)

  model.compile(optimizer=dpquant_tf.DPQuantOptimizer(
      l2_norm_clip=1.0, noise_multiplier=1.0, learning_rate=0.1),
      loss=leaky_loss, run_eagerly=run_eagerly)
  dpquant_tf.install_dp_train_step(model)
  x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
  with pytest.raises(ValueError, match="head.*stash"):
    model.fit(x, np.zeros(8, np.int32), batch_size=4, epochs=1, verbose=0)
  np.testing.assert_array_equal(stash.numpy(), np.zeros(2, np.float32))


def test_custom_loop_dp_step_finds_a_state_write_in_the_loss():
  """dp_step in a traced custom loop: the loss's graph is read."""
  model = tf.keras.Sequential([tf.keras.Input((3,)), L.Dense(2, name="head")])
  stash = model.get_layer("head").add_weight(
      "stash", (2,), trainable=False, initializer="zeros")
  opt = dpquant_tf.DPQuantOptimizer(l2_norm_clip=1.0, noise_multiplier=1.0,
                                    learning_rate=0.1)
  x = tf.random.normal((4, 3))

  @tf.function
  def step():
    with tf.GradientTape() as tape:
      logits = model(x, training=True)
      stash.assign(tf.reduce_mean(logits, axis=0))
      loss = tf.keras.losses.sparse_categorical_crossentropy(
          tf.zeros(4, tf.int32), logits, from_logits=True)
    return opt.dp_step(model, x, loss, tape)

  with pytest.raises(ValueError, match="head.*stash"):
    step()
  np.testing.assert_array_equal(stash.numpy(), np.zeros(2, np.float32))

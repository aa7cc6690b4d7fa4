"""Models and losses that break the per-example bound are refused before the
first step (issue 19 items 2, 4, 5): Keras mixed precision, layers or losses
that couple the examples of a batch, and preprocessing state adapted on data
that was not declared public. Controls (CNN, Embedding, LayerNorm, Dropout,
quantized layers) keep training."""

import time

import dpquant_tf  # noqa: F401  (Keras 2 before TensorFlow)
import numpy as np
import pytest
import tensorflow as tf

from dpquant_tf.perexample import TappedLayer
from dpquant_tf import perexample
from dpquant_tf import privacy
from dpquant_tf import quantization as dq
from dpquant_tf.models import tutorial_cnn

L = tf.keras.layers
_SCE = dict(from_logits=True, reduction=tf.keras.losses.Reduction.NONE)


def _optimizer(ledger=None):
  return dpquant_tf.DPQuantOptimizer(l2_norm_clip=1.0, noise_multiplier=0.0,
                                     learning_rate=0.1, ledger=ledger,
                                     sampling_probability=0.5 if ledger else
                                     None)


def _fit(model, x, y, loss=None, *, ledger=None, jit=False):
  """One DP step through model.fit; returns whether the weights moved."""
  model.compile(optimizer=_optimizer(ledger), jit_compile=jit,
                loss=loss or tf.keras.losses.SparseCategoricalCrossentropy(
                    **_SCE))
  model.optimizer.install_train_step(model)   # the owned DP step
  before = [w.copy() for w in model.get_weights()]
  model.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
  return any(not np.array_equal(a, b)
             for a, b in zip(before, model.get_weights()))


def _refused_before_any_step(model, x, y, match, **kwargs):
  before = [w.copy() for w in model.get_weights()]
  with pytest.raises(ValueError, match=match):
    _fit(model, x, y, **kwargs)
  for a, b in zip(before, model.get_weights()):
    np.testing.assert_array_equal(a, b)


def _data(n=8, shape=(6,), classes=3, seed=0):
  rng = np.random.RandomState(seed)
  return (rng.normal(size=(n,) + shape).astype(np.float32),
          rng.randint(0, classes, size=n))


def _dense(name="dense_model"):
  tf.keras.utils.set_random_seed(0)
  inp = tf.keras.Input((6,))
  return tf.keras.Model(inp, L.Dense(3, name="out")(L.Dense(4, name="d")(inp)),
                        name=name)


# -- mixed precision ----------------------------------------------------------

@pytest.fixture
def mixed_bfloat16():
  tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
  try:
    yield
  finally:
    tf.keras.mixed_precision.set_global_policy("float32")


def test_mixed_bfloat16_with_tap_model_is_refused_before_the_first_step(
    mixed_bfloat16):  # pylint: disable=redefined-outer-name,unused-argument
  model = perexample.tap_model(_dense())
  x, y = _data()
  _refused_before_any_step(model, x, y, r"mixed_bfloat16[\s\S]*float32")
  with pytest.raises(ValueError, match="set_global_policy"):
    privacy.check_model_privacy(model)


def test_mixed_float16_policy_on_one_layer_is_refused():
  inp = tf.keras.Input((6,))
  h = L.Dense(4, name="half", dtype="mixed_float16")(inp)
  model = perexample.tap_model(tf.keras.Model(
      inp, L.Dense(3, name="out")(L.Activation("linear", dtype="float32")(h))))
  problems = dpquant_tf.validate_model(model, strict=False)
  assert len(problems) == 1 and "half" in problems[0], problems
  assert "mixed_float16" in problems[0]
  x, y = _data()
  _refused_before_any_step(model, x, y, "mixed_float16")


def test_quantize_model_under_mixed_precision_fails_with_a_clear_error(
    mixed_bfloat16):  # pylint: disable=redefined-outer-name,unused-argument
  model = _dense()
  with pytest.raises(ValueError, match=r"global_policy[\s\S]*"
                     r"mixed_bfloat16[\s\S]*set_global_policy\('float32'\)"):
    dq.quantize_model(model)


def test_quantize_model_of_a_model_built_under_mixed_precision_fails(
    mixed_bfloat16):  # pylint: disable=redefined-outer-name,unused-argument
  model = _dense()
  tf.keras.mixed_precision.set_global_policy("float32")
  with pytest.raises(ValueError, match="float32 model.*mixed_bfloat16"):
    dq.quantize_model(model)


# -- batch coupling ----------------------------------------------------------------

def _centering_model():
  tf.keras.utils.set_random_seed(0)
  inp = tf.keras.Input((6,))
  h = L.Dense(4, name="d")(inp)
  h = L.Lambda(lambda z: z - tf.reduce_mean(z, axis=0, keepdims=True),
               name="center")(h)
  return tf.keras.Model(inp, L.Dense(3, name="out")(h))


def test_lambda_batch_centering_is_refused_and_named():
  model = _centering_model()
  x, y = _data()
  _refused_before_any_step(model, x, y, "'center'")
  problems = dpquant_tf.validate_model(model, strict=False)
  assert len(problems) == 1 and "'center'" in problems[0]
  with pytest.raises(ValueError, match="'center' \\(Lambda\\).*depends on "
                     "other examples"):
    privacy.check_batch_independence(model)


def test_lambda_batch_centering_is_refused_under_jit_and_with_tap_model():
  x, y = _data()
  _refused_before_any_step(_centering_model(), x, y, "'center'", jit=True)
  _refused_before_any_step(perexample.tap_model(_centering_model()), x, y,
                           "'center'")


def test_training_only_coupling_is_found():
  """A layer that couples only with training=True (dropout-like masks must
  not hide it, and inference-mode calls do not see it)."""

  class TrainCenter(L.Layer):

    def call(self, z, training=None):
      if training:
        return z - tf.reduce_mean(z, axis=0)
      return z

  inp = tf.keras.Input((6,))
  h = L.Dropout(0.5)(L.Dense(4)(inp))
  model = tf.keras.Model(inp, L.Dense(3)(TrainCenter(name="tc")(h)))
  with pytest.raises(ValueError, match="'tc'"):
    privacy.check_batch_independence(model)


def _centred_logits_loss(y_true, logits):
  logits = logits - tf.reduce_mean(logits, axis=0, keepdims=True)
  return tf.keras.losses.sparse_categorical_crossentropy(
      y_true, logits, from_logits=True)


def _in_batch_contrastive_loss(y_true, z):
  del y_true
  logits = tf.matmul(z, z, transpose_b=True)
  return tf.keras.losses.sparse_categorical_crossentropy(
      tf.range(tf.shape(z)[0]), logits, from_logits=True)


class _PerExample(tf.keras.losses.Loss):
  """A loss function as a Keras Loss with reduction NONE (what DP needs)."""

  def __init__(self, fn):
    super().__init__(reduction=tf.keras.losses.Reduction.NONE)
    self.fn = fn

  def call(self, y_true, y_pred):
    return self.fn(y_true, y_pred)


@pytest.mark.parametrize("loss", [_centred_logits_loss,
                                  _in_batch_contrastive_loss])
def test_losses_that_couple_examples_are_refused(loss):
  model = _dense()
  x, y = _data()
  # model.fit probes the compiled loss.
  _refused_before_any_step(model, x, y, "the loss", loss=_PerExample(loss))
  with pytest.raises(ValueError, match="the loss: example i's loss entry "
                     "depends on other examples"):
    privacy.check_batch_independence(model, loss)
  with pytest.raises(privacy.UnsupportedModelError, match="the loss"):
    privacy.check_model_privacy(model, loss=loss)


class _CentredLoss(tf.keras.losses.Loss):

  def call(self, y_true, y_pred):
    return _centred_logits_loss(y_true, y_pred)


def test_coupling_loss_subclass_is_probed_unreduced():
  """A Keras Loss with the default (batch-mean) reduction: its per-example
  ``call`` is what the probe checks."""
  with pytest.raises(ValueError, match="the loss"):
    privacy.check_batch_independence(_dense(), _CentredLoss())


def test_user_probe_batch_and_labels_are_used():
  model = _dense()
  x, y = _data(n=3)
  with pytest.raises(ValueError, match="the loss"):
    privacy.check_batch_independence(model, _centred_logits_loss, x=x, y=y)
  privacy.check_batch_independence(
      model, tf.keras.losses.SparseCategoricalCrossentropy(**_SCE), x=x, y=y)


def test_scalar_loss_and_bad_arguments_are_refused():
  with pytest.raises(ValueError, match="one number for the whole batch"):
    privacy.check_batch_independence(
        _dense(), tf.keras.losses.SparseCategoricalCrossentropy(
            from_logits=True).__call__)
  with pytest.raises(TypeError, match="loss"):
    privacy.check_batch_independence(_dense(), loss=3)
  with pytest.raises(TypeError, match="model"):
    privacy.check_batch_independence("model")


# -- preprocessing state -----------------------------------------------------------

def _normalized_model():
  norm = L.Normalization(name="norm")
  norm.adapt(np.random.RandomState(1).normal(3.0, 2.0, (32, 6)).astype(
      np.float32))
  inp = tf.keras.Input((6,))
  return tf.keras.Model(inp, L.Dense(3, name="out")(norm(inp)))


def _text_model():
  tv = L.TextVectorization(max_tokens=20, output_sequence_length=4, name="tv")
  tv.adapt(["the cat sat", "a dog ran", "secretword of one record"])
  inp = tf.keras.Input((1,), dtype=tf.string)
  h = L.GlobalAveragePooling1D()(TappedLayer(L.Embedding(20, 4))(tv(inp)))
  return tf.keras.Model(inp, L.Dense(3, name="out")(h))


_TEXT = np.array([["the cat"], ["a dog ran"], ["sat"], ["cat cat"]])


@pytest.mark.parametrize("build,name,x", [
    (_normalized_model, "norm", _data()[0]),
    (_text_model, "tv", _TEXT)])
def test_adapted_preprocessing_is_refused_unless_declared_public(build, name,
                                                                 x):
  model = build()
  y = np.arange(len(x)) % 3
  problems = dpquant_tf.validate_model(model, strict=False)
  assert len(problems) == 1 and f"'{name}'" in problems[0], problems
  assert "public_state" in problems[0]
  _refused_before_any_step(model, x, y, f"'{name}'.*preprocessing state")
  # Declared public through the ledger: accepted, and the statement says so.
  ledger = privacy.PrivacyLedger(public_state=(name,), dataset_size=100)
  assert _fit(model, x, y, ledger=ledger)
  statement = ledger.statement(1e-5)
  assert "declared public" in statement and f"'{name}'" in statement
  # ... or directly.
  privacy.check_model_privacy(model, public_preprocessing=(name,))


def test_a_clone_of_an_adapted_layer_is_still_refused():
  """tap_model/clone_model forget is_adapted; the state is still there."""
  model = perexample.tap_model(_normalized_model())
  with pytest.raises(ValueError, match="'norm'"):
    privacy.check_model_privacy(model)
  privacy.check_model_privacy(model, public_preprocessing=("norm",))


def test_statement_without_declaration_has_no_public_line_and_bad_names_fail():
  assert "declared public" not in privacy.PrivacyLedger().statement(1e-5)
  with pytest.raises(TypeError, match="public_state"):
    privacy.PrivacyLedger(public_state=(3,))
  with pytest.raises(TypeError, match="public_preprocessing"):
    privacy.check_model_privacy(_dense(), public_preprocessing=[""])


def test_stateless_preprocessing_is_accepted():
  inp = tf.keras.Input((6,))
  h = L.Rescaling(0.5)(inp)
  model = tf.keras.Model(inp, L.Dense(3)(h))
  privacy.check_model_privacy(model)
  ids = tf.keras.Input((1,), dtype=tf.string)
  hashed = L.Hashing(16)(ids)
  model = tf.keras.Model(ids, L.Dense(3)(L.Flatten()(TappedLayer(L.Embedding(16, 4))(
      hashed))))
  privacy.check_model_privacy(model)


# -- controls -----------------------------------------------------------------------

def test_tutorial_cnn_is_accepted_and_the_check_is_fast():
  model = tutorial_cnn()
  loss = tf.keras.losses.SparseCategoricalCrossentropy(**_SCE)
  start = time.perf_counter()
  privacy.check_model_privacy(model, loss=loss)
  first = time.perf_counter() - start
  start = time.perf_counter()
  privacy.check_model_privacy(model, loss=loss)
  assert time.perf_counter() - start < 0.05   # cached per model and loss
  assert first < 5.0, first


def _embedding_model():
  ids = tf.keras.Input((7,), dtype="int32")
  h = L.GlobalAveragePooling1D()(TappedLayer(L.Embedding(10, 4))(ids))
  return tf.keras.Model(ids, L.Dense(3)(h))


def _layernorm_dropout_model():
  seq = tf.keras.Input((5, 8))
  h = L.LayerNormalization()(L.Dense(8)(seq))
  h = L.Dropout(0.5)(L.Flatten()(h))
  return tf.keras.Model(seq, L.Dense(3)(h))


def test_embedding_layernorm_and_dropout_models_are_accepted():
  privacy.check_model_privacy(
      _embedding_model(),
      loss=tf.keras.losses.SparseCategoricalCrossentropy(**_SCE))
  privacy.check_model_privacy(_layernorm_dropout_model(),
                              loss="categorical_crossentropy")


@pytest.mark.slow
def test_controls_train_through_fit():
  quantized = dq.quantize_model(_dense())   # stochastic rounding: no false alarm
  privacy.check_model_privacy(
      quantized, loss=tf.keras.losses.MeanSquaredError(
          reduction=tf.keras.losses.Reduction.NONE))
  x = np.random.RandomState(0).normal(size=(4, 28, 28, 1)).astype(np.float32)
  assert _fit(tutorial_cnn(), x, np.arange(4) % 10)
  assert _fit(_embedding_model(),
              np.random.RandomState(0).randint(0, 10, (8, 7)),
              np.arange(8) % 3)
  assert _fit(_layernorm_dropout_model(), *_data(shape=(5, 8)))
  assert _fit(quantized, *_data())

"""DPQuantAdamWOptimizer: a hand-computed AdamW step, exclusions, ledger, config."""

import dp_accounting
import numpy as np
import pytest
import tensorflow as tf

from dpquant_tf import privacy
from dpquant_tf.optimizers import DPQuantAdamOptimizer
from dpquant_tf.optimizers import DPQuantAdamWOptimizer
from tests.optimizers._helpers import make_data as _data
from tests.optimizers._helpers import make_loss as _loss
from tests.optimizers._helpers import make_model as _model

HUGE_CLIP = 2.0**20  # clipping is a no-op
LR, WD, B1, B2, EPS = 0.1, 0.3, 0.9, 0.999, 1e-7


def _step(opt, model, x, y):
  with tf.GradientTape() as tape:
    loss = _loss()(y, model(x))
  opt.dp_step(model, x, loss, tape)   # the owned DP step


def _mean_grads(model, x, y):
  with tf.GradientTape() as tape:
    loss = _loss("sum_over_batch_size")(y, model(x))
  return [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]


def test_noise_zero_step_equals_hand_computed_adamw():
  x, y = _data()
  model = _model()
  w0 = [w.numpy().astype(np.float64) for w in model.trainable_variables]
  g = [gi.astype(np.float64) for gi in _mean_grads(model, x, y)]
  opt = DPQuantAdamWOptimizer(HUGE_CLIP, 0.0, weight_decay=WD,
                              exclude_from_weight_decay=("bias",),
                              learning_rate=LR, beta_1=B1, beta_2=B2,
                              epsilon=EPS)
  _step(opt, model, x, y)
  for var, w, gi in zip(model.trainable_variables, w0, g):
    m, v = (1 - B1) * gi, (1 - B2) * gi * gi
    lr_t = LR * np.sqrt(1 - B2) / (1 - B1)
    decay = 0.0 if "bias" in var.name else WD
    expected = w * (1 - LR * decay) - lr_t * m / (np.sqrt(v) + EPS)
    np.testing.assert_allclose(var.numpy(), expected, rtol=2e-5, atol=1e-6,
                               err_msg=var.name)


def test_weight_decay_zero_equals_dp_adam_and_decay_changes_it():
  x, y = _data()
  runs = {}
  for key, opt in (
      ("adam", DPQuantAdamOptimizer(HUGE_CLIP, 0.0, learning_rate=LR)),
      ("adamw0", DPQuantAdamWOptimizer(HUGE_CLIP, 0.0, weight_decay=0.0,
                                       learning_rate=LR)),
      ("adamw", DPQuantAdamWOptimizer(HUGE_CLIP, 0.0, weight_decay=WD,
                                      learning_rate=LR))):
    model = _model()
    for _ in range(3):
      _step(opt, model, x, y)
    runs[key] = [w.numpy() for w in model.trainable_variables]
  for a, b in zip(runs["adam"], runs["adamw0"]):
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(runs["adam"][0], runs["adamw"][0])


def test_same_ledger_events_as_dp_adam():
  x, y = _data(64)
  eps = {}
  for cls, kw in ((DPQuantAdamOptimizer, {}),
                  (DPQuantAdamWOptimizer, {"weight_decay": 0.1})):
    ledger = privacy.PrivacyLedger()
    opt = cls(1.0, 1.1, ledger=ledger, dataset_size=64, learning_rate=0.01,
              **kw)
    model = _model()
    model.compile(optimizer=opt, loss=_loss())
    opt.install_train_step(model)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    # fit's arrays: recorded at q = 1 by the owned step (no amplification).
    event = dp_accounting.PoissonSampledDpEvent(
        1.0, dp_accounting.GaussianDpEvent(1.1))
    assert opt.dp_events() == [(event, 16)]
    eps[cls.__name__] = ledger.epsilon(1e-5)
  assert eps["DPQuantAdamWOptimizer"] == eps["DPQuantAdamOptimizer"]


def test_config_round_trip_and_validation():
  opt = DPQuantAdamWOptimizer(1.0, 1.1, weight_decay=0.05,
                              exclude_from_weight_decay=["bias", "gamma"],
                              learning_rate=0.01)
  config = opt.get_config()
  assert config["weight_decay"] == 0.05
  assert config["exclude_from_weight_decay"] == ["bias", "gamma"]
  again = DPQuantAdamWOptimizer.from_config(config)
  assert again.weight_decay == 0.05
  with pytest.raises(ValueError, match="weight_decay"):
    DPQuantAdamWOptimizer(1.0, 1.1, weight_decay=-1.0)
  with pytest.raises(TypeError, match="exclude_from_weight_decay"):
    DPQuantAdamWOptimizer(1.0, 1.1, exclude_from_weight_decay="bias")

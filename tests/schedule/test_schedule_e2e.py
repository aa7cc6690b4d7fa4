"""End to end: DPQuant's loss-aware schedule trains on real digits under DP.

Poisson-sampled batches, DPQuantOptimizer, PrivacyLedger, the DP
loss-sensitivity estimator and the loss-aware policy at ratio 0.5. The run must
learn, log its per-epoch plans and epsilon, and spend under 2 percent of
epsilon on analysis.
"""

import json

import numpy as np
import pytest
from sklearn import datasets

import dpquant_tf  # noqa: F401  (Keras 2 first)
import tensorflow as tf

from dpquant_tf import optimizers
from dpquant_tf import privacy
from dpquant_tf import quantization
from dpquant_tf import schedule

DELTA = 1e-5


def _digits():
  x, y = datasets.load_digits(return_X_y=True)
  x = (x / 16.0).astype("float32")
  order = np.random.default_rng(0).permutation(len(x))
  x, y = x[order], y[order].astype("int32")
  return x[:1500], y[:1500], x[1500:], y[1500:]


def _mnist():
  from dpquant_tf import data  # pylint: disable=g-import-not-at-top
  ds = data.load_dataset("mnist")
  return ds.x_train, ds.y_train, ds.x_test, ds.y_test


def _mlp(input_shape):
  return tf.keras.Sequential([
      tf.keras.Input(input_shape),
      tf.keras.layers.Flatten(),
      tf.keras.layers.Dense(32, activation="relu"),
      tf.keras.layers.Dense(32, activation="relu"),
      tf.keras.layers.Dense(16, activation="relu"),
      tf.keras.layers.Dense(10),
  ])


def _run(x, y, x_test, y_test, *, epochs, q, target_epsilon, learning_rate,
         build=_mlp, seed=0):
  n = len(x)
  estimator = schedule.LossSensitivityEstimator(x, y, seed=seed)  # defaults
  policy = schedule.LossAwarePolicy(ratio=0.5)  # defaults: beta 20, alpha 0.5, period 2
  analyses = estimator.planned_analyses(epochs=epochs, period=policy.period)
  sigma = privacy.calibrate_noise_multiplier(target_epsilon, DELTA, n, q * n, epochs,
                                             analyses=analyses)
  max_batch = privacy.poisson_max_batch_size(n, q)
  # Unseeded: a seeded sampler is accounted at q = 1 (no amplification).
  ds = privacy.poisson_dataset(x, y, q, max_batch)
  ledger = privacy.PrivacyLedger(sampling_method="poisson", dataset_size=n)
  opt = optimizers.DPQuantOptimizer(1.0, sigma, learning_rate=learning_rate,
                                    expected_batch_size=q * n, sampling_probability=q,
                                    ledger=ledger, seed=seed)
  tf.keras.utils.set_random_seed(seed)
  model = quantization.quantize_model(build(x.shape[1:]), seed=seed)
  model.compile(optimizer=opt, metrics=["accuracy"],
                loss=tf.keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True, reduction="none"))
  scheduler = schedule.DPQuantScheduler(policy, ledger=ledger, estimator=estimator,
                                        delta=DELTA, seed=seed)
  hist = model.fit(ds, epochs=epochs, verbose=0, callbacks=[scheduler])
  _, acc = model.evaluate(x_test, y_test, verbose=0)
  return hist, scheduler, ledger, acc, sigma


def _check(hist, scheduler, ledger, acc, *, epochs, target_epsilon, min_accuracy):
  n_layers = len(scheduler.history[0]["bits"])
  k = int(np.floor(0.5 * n_layers + 0.5))
  assert acc > min_accuracy, acc  # chance is 0.1
  # Per-epoch plans: k layers each epoch, logged for History / CSVLogger.
  assert len(scheduler.history) == epochs
  assert all(len(e["quantized"]) == k for e in scheduler.history)
  assert hist.history["quant_layer_fraction"] == [pytest.approx(k / n_layers)] * epochs
  assert [e["analysis"] is not None for e in scheduler.history] == [
      epoch % 2 == 0 for epoch in range(epochs)]
  # Privacy: the ledger holds the analyses, epsilon is logged every epoch.
  assert ledger.events("analysis")[0][1] == (epochs + 1) // 2
  eps = hist.history["epsilon"]
  assert len(eps) == epochs and eps == sorted(eps)
  # Logged: the proven epsilon (issue 20). The seeded estimator here loses
  # its amplification there; the calibrated (Poisson) figure meets the target.
  assert eps[-1] == pytest.approx(ledger.proven_epsilon(DELTA))
  assert ledger.epsilon(DELTA) <= target_epsilon * 1.001
  share = hist.history["analysis_epsilon_share"][-1]
  assert 0 < share < 0.02, share
  blob = json.loads(scheduler.to_json())
  assert blob["policy"]["config"]["ratio"] == 0.5 and len(blob["epochs"]) == epochs


def test_loss_aware_schedule_trains_on_digits_fast():
  x, y, x_test, y_test = _digits()
  hist, scheduler, ledger, acc, _ = _run(x, y, x_test, y_test, epochs=3, q=0.0625,
                                         target_epsilon=4.0, learning_rate=2.0)
  _check(hist, scheduler, ledger, acc, epochs=3, target_epsilon=4.0, min_accuracy=0.5)


@pytest.mark.slow
def test_loss_aware_schedule_trains_on_mnist_digits():
  x, y, x_test, y_test = _mnist()
  hist, scheduler, ledger, acc, _ = _run(x, y, x_test, y_test, epochs=8, q=0.02,
                                         target_epsilon=4.0, learning_rate=0.7)
  _check(hist, scheduler, ledger, acc, epochs=8, target_epsilon=4.0, min_accuracy=0.7)

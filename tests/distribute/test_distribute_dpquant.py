"""DPQuantOptimizer, its Adam variant, the ledger and the schedule callback
under MirroredStrategy (logical CPU devices)."""

import dpquant_tf
import numpy as np
import pytest
import tensorflow as tf

from dpquant_tf import privacy
from tests.distribute import _factories
from tests.distribute import _helpers

DELTA = 1e-5


def _fit(num_replicas, make_optimizer, *, epochs=2, n=8):
  x, y = _helpers.data(n=n)
  strategy = _helpers.mirrored(num_replicas)
  with strategy.scope():
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([tf.keras.layers.Dense(3, input_shape=(5,))])
    optimizer = make_optimizer()
    model.compile(optimizer=optimizer, loss=_helpers.per_example_mse())
  if hasattr(optimizer, "dp_step"):  # DP: the owned train step
    dpquant_tf.install_dp_train_step(model)
  before = [w.copy() for w in model.get_weights()]
  model.fit(x, y, batch_size=n, epochs=epochs, shuffle=False, verbose=0)
  deltas = [a - b for a, b in zip(model.get_weights(), before)]
  return optimizer, deltas


@pytest.mark.parametrize("kind", ["dpquant", "dpquant_adam"])
def test_privacy_events_use_the_global_sampling_rate(kind):
  """One global event per step (not per replica), identical for 1 and 2
  replicas."""
  make = _factories.optimizer(kind, noise_multiplier=1.1, dataset_size=80)
  single, _ = _fit(1, make)
  multi, _ = _fit(2, make)
  assert multi.dp_events() == single.dp_events()
  (event, count), = multi.dp_events()
  assert count == 2
  # fit's arrays are not the library's sampler: recorded at q = 1 (the
  # global figure; a per-replica q would differ between 1 and 2 replicas).
  assert event.sampling_probability == 1.0
  ledgers = []
  for opt in (single, multi):
    ledger = privacy.PrivacyLedger(sampling_method="poisson")
    ledger.attach(opt)
    ledgers.append(ledger.epsilon(DELTA))
  assert ledgers[1] == pytest.approx(ledgers[0], rel=1e-12)


def test_expected_batch_size_is_the_global_normalizer():
  """Poisson batches: each replica divides by the global expected size E."""
  make = _factories.optimizer("dpquant", noise_multiplier=0.0,
                              expected_batch_size=10.0)
  _, single = _fit(1, make, epochs=1)
  _, multi = _fit(2, make, epochs=1)
  _, fixed = _fit(1, _factories.optimizer("dpquant", noise_multiplier=0.0),
                  epochs=1)
  for s, m, f in zip(single, multi, fixed):
    np.testing.assert_allclose(m, s, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(s, f * 8 / 10, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["reclip", "bound"])
def test_quantized_gradients_under_two_replicas(mode):
  """With 24-bit gradient codes the step equals the single-device step up to
  rounding; the recorded (BOUND-mode) noise multiplier is the same."""
  make = _factories.optimizer("dpquant", noise_multiplier=0.8, dataset_size=80,
                              gradient_bits=24, sensitivity_mode=mode)
  single, _ = _fit(1, make, epochs=1)
  multi, _ = _fit(2, make, epochs=1)
  assert multi.dp_events() == single.dp_events()
  zero = _factories.optimizer("dpquant", noise_multiplier=0.0,
                              gradient_bits=24, sensitivity_mode=mode)
  _, d1 = _fit(1, zero, epochs=1)
  _, d2 = _fit(2, zero, epochs=1)
  for a, b in zip(d1, d2):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_update_quantization_is_refused_with_several_replicas():
  make = _factories.optimizer("dpquant", noise_multiplier=1.0, update_bits=8)
  _fit(1, make, epochs=1)  # fine on one device
  with pytest.raises(tf.errors.InvalidArgumentError, match="update_bits"):
    _fit(2, make, epochs=1)

"""One definition of an epoch's steps for calibration and the input pipeline
(issue 15 item 11)."""

import numpy as np

from dpquant_tf import privacy

DELTA = 1e-5


def test_calibrated_run_of_the_pipeline_never_ends_above_target():
  n, batch, epochs, target = 1000, 28, 5, 1.0  # 1 / q = 35.7: not integral.
  q = batch / n
  z = privacy.calibrate_noise_multiplier(target, DELTA, n, batch, epochs,
                                         epsilon_tolerance=1e-4)
  x = np.zeros((n, 1), np.float32)
  y = np.zeros((n,), np.int32)
  ds = privacy.poisson_dataset(x, y, q, seed=0)  # Default: one epoch.
  per_epoch = int(ds.cardinality().numpy())
  assert per_epoch == privacy.steps_per_epoch(n, q) == 36  # ceil(N / B)
  assert privacy.planned_steps(n, batch, epochs) == epochs * per_epoch
  ledger = privacy.PrivacyLedger(sampling_method="poisson", dataset_size=n)
  ledger.record(privacy.sampled_gaussian_event(q, z), kind="train",
                count=epochs * per_epoch)  # What fit(ds, epochs=5) runs.
  assert ledger.epsilon(DELTA) <= target


def test_steps_per_epoch_matches_fixed_keras_batches():
  for n, batch in ((64, 8), (60000, 256), (1000, 28), (10, 10), (7, 3)):
    assert privacy.steps_per_epoch(n, batch / n) == -(-n // batch)

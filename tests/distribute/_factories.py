"""The DP optimizers the distribute tests run, by kind."""

from dpquant_tf import distribute

CLIP = 0.5
SIGMA = 1.3


def optimizer(kind, *, noise_multiplier, seed=7, clip=CLIP,
              expected_batch_size=None):
  """Returns a factory (called inside strategy.scope()) for `kind`."""
  if kind == "prototype":
    return lambda: distribute.PrototypeDPSGDOptimizer(
        l2_norm_clip=clip, noise_multiplier=noise_multiplier,
        learning_rate=1.0, seed=seed, expected_batch_size=expected_batch_size)
  raise ValueError(f"unknown optimizer kind {kind!r}")

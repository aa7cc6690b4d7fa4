"""The DP optimizers the distribute tests run, by kind."""

from tests.distribute import _prototype

CLIP = 0.5
SIGMA = 1.3
KINDS = ("prototype", "dpquant", "dpquant_adam")


def optimizer(kind, *, noise_multiplier, seed=7, clip=CLIP, **kwargs):
  """Returns a factory (to call inside strategy.scope()) for `kind`."""
  if kind == "prototype":
    return lambda: _prototype.PrototypeDPSGDOptimizer(
        l2_norm_clip=clip, noise_multiplier=noise_multiplier,
        learning_rate=1.0, seed=seed, **kwargs)
  # Imported here: the optimizers package may not exist in older checkouts.
  from dpquant_tf import optimizers  # pylint: disable=g-import-not-at-top
  if kind == "dpquant":
    return lambda: optimizers.DPQuantOptimizer(
        l2_norm_clip=clip, noise_multiplier=noise_multiplier,
        learning_rate=1.0, seed=seed, **kwargs)
  if kind == "dpquant_adam":
    return lambda: optimizers.DPQuantAdamOptimizer(
        l2_norm_clip=clip, noise_multiplier=noise_multiplier,
        learning_rate=0.1, seed=seed, **kwargs)
  raise ValueError(f"unknown optimizer kind {kind!r}")

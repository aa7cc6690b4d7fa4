"""The one generator factory of dpquant_tf (noise, stochastic rounding, sampling).

Every ``tf.random.Generator`` the library draws private randomness from is made
here. Default: OS entropy (``from_non_deterministic_state``), which differs per
process also under XLA (docs/METHOD.md section 4, invariant 3). An explicit seed is
accepted only where a test or a research study asks for it by name; such a
generator's stream is a guarantee only while the seed stays secret.
"""

from typing import Optional

import tensorflow as tf

__all__ = ["make_generator"]


def make_generator(*, seed: Optional[int] = None) -> tf.random.Generator:
  """A generator from OS entropy, or from `seed` (tests and seeded studies).

  Args:
    seed: None (default, non-deterministic) or an int seed.

  Returns:
    A new ``tf.random.Generator``.
  """
  if seed is None:
    return tf.random.Generator.from_non_deterministic_state()
  return tf.random.Generator.from_seed(int(seed))

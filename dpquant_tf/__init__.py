"""dpquant_tf: differentially private training in Keras with dynamic per-layer quantization.

Importing this package switches ``tf.keras`` to Keras 2 (tf-keras) when
TensorFlow has not been imported yet, and refuses a process where Keras 3 is
already active. See ``dpquant_tf/_env.py``.
"""

from dpquant_tf import _env

_env.setup()

# pylint: disable=g-import-not-at-top,wrong-import-position
from dpquant_tf._version import __version__

__all__ = [
    "__version__",
]

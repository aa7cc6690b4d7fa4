"""Fast per-example gradients from layer taps (+ jacobian fallback).

One backward pass gives the gradient of the summed loss at every tapped
layer's output; per-layer rules combine it with the layer's input into
per-example (per-microbatch) gradients. See docs/PERFORMANCE.md and
docs/PEREXAMPLE.md.
"""

from dpquant_tf.perexample._fallback import FallbackWatch
from dpquant_tf.perexample._gradients import collect
from dpquant_tf.perexample._gradients import example_validity
from dpquant_tf.perexample._gradients import jacobian_gradients
from dpquant_tf.perexample._gradients import per_example_gradients
from dpquant_tf.perexample._gradients import PerExampleTaps
from dpquant_tf.perexample._registry import LayerKind
from dpquant_tf.perexample._registry import register_tapped_layer
from dpquant_tf.perexample._registry import registered_slots
from dpquant_tf.perexample._registry import unregister_tapped_layer
from dpquant_tf.perexample._rules import UnsupportedLayerError
from dpquant_tf.perexample._taps import TappedLayer
from dpquant_tf.perexample._taps import tap_model

__all__ = [
    "FallbackWatch",
    "LayerKind",
    "PerExampleTaps",
    "TappedLayer",
    "UnsupportedLayerError",
    "collect",
    "example_validity",
    "jacobian_gradients",
    "per_example_gradients",
    "register_tapped_layer",
    "registered_slots",
    "tap_model",
    "unregister_tapped_layer",
]

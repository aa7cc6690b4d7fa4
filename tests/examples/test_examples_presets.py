"""Formats and policies by name (dpquant_tf.presets), as examples/ use them."""

import pytest

from dpquant_tf import presets
from dpquant_tf import quantization
from dpquant_tf import schedule


@pytest.mark.parametrize("name, fwd, bwd", [
    ("luq_fp4", (quantization.QuantFormat.INT4_SAWB, 4),
     (quantization.QuantFormat.LUQ_FP4, 4)),
    ("fp8", (quantization.QuantFormat.FP8_E4M3, 8),
     (quantization.QuantFormat.FP8_E5M2, 8)),
    ("int4", (quantization.QuantFormat.INT, 4), (quantization.QuantFormat.INT, 4)),
])
def test_layer_config_by_name(name, fwd, bwd):
  cfg = presets.layer_config(name)
  assert cfg == presets.layer_config(presets.FormatPreset(name))
  assert cfg.enabled
  assert (cfg.fwd_format, cfg.fwd_bits) == fwd
  assert (cfg.bwd_format, cfg.bwd_bits) == bwd


def test_make_policy_by_name():
  assert presets.make_policy("none") is None
  assert isinstance(presets.make_policy("rotation", ratio=0.5),
                    schedule.RotationPolicy)
  loss_aware = presets.make_policy("loss_aware", ratio=0.5, period=3)
  assert isinstance(loss_aware, schedule.LossAwarePolicy)
  assert loss_aware.needs_sensitivities
  assert isinstance(presets.make_policy("static", static_layers=["a"]),
                    schedule.StaticPolicy)
  assert isinstance(presets.make_policy("bit_ramp", epochs=3),
                    schedule.BitRampPolicy)


def test_bad_names_name_the_argument():
  with pytest.raises(ValueError, match="Expected format='fp3' to be one of"):
    presets.layer_config("fp3")
  with pytest.raises(ValueError, match="Expected policy='lossaware' to be"):
    presets.make_policy("lossaware")
  with pytest.raises(ValueError, match="Expected static_layers=.*None unless"):
    presets.make_policy("rotation", static_layers=["a"])
  with pytest.raises(ValueError, match="Expected epochs=None"):
    presets.make_policy("bit_ramp")

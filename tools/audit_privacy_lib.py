"""Logic of tools/audit_privacy.py: run an empirical privacy audit of a
configuration described like examples/train.py's flags and format the result.

Audits (dpquant_tf.audit): ``mechanism`` (white-box one step, many trials),
``checkpoint`` (an adversary with two consecutive checkpoints tries to
regenerate the noise), ``one_run`` (Steinke et al. 2023, m canaries in one
training run).
"""

import dataclasses
import enum
import json
from typing import Any, Dict, Optional

import dpquant_tf
from dpquant_tf import _validation as V
from dpquant_tf import audit
from dpquant_tf import presets

__all__ = ["AuditConfig", "AuditKind", "format_table", "run"]


class AuditKind(enum.Enum):
  MECHANISM = "mechanism"
  CHECKPOINT = "checkpoint"
  ONE_RUN = "one_run"


@dataclasses.dataclass(frozen=True, kw_only=True)
class AuditConfig:
  """One audit. Names follow examples/train.py where they mean the same."""
  audit: str = "mechanism"
  noise_multiplier: float = 1.0
  l2_norm_clip: float = 1.0
  learning_rate: Optional[float] = None
  optimizer: str = "sgd"
  gradient_bits: int = 0
  sensitivity_mode: str = "reclip"
  format: Optional[str] = None
  delta: float = 1e-5
  confidence: float = 0.95
  trials: int = 1000
  canaries: int = 100
  epochs: int = 4
  batch_size: int = 50
  seed: int = 0
  strategy: Any = None

  def __post_init__(self):
    V.check_enum("audit", self.audit, AuditKind)
    V.check_one_of("optimizer", self.optimizer, ["sgd", "adam"])
    V.check_int("gradient_bits", self.gradient_bits, low=0, high=24)
    if self.format is not None:
      V.check_enum("format", self.format, presets.FormatPreset)


def _optimizer(cfg: AuditConfig):
  cls = (dpquant_tf.DPQuantAdamOptimizer if cfg.optimizer == "adam" else
         dpquant_tf.DPQuantOptimizer)
  kwargs: Dict[str, Any] = {"sensitivity_mode": cfg.sensitivity_mode}
  if cfg.gradient_bits:
    kwargs["gradient_bits"] = cfg.gradient_bits
  if cfg.learning_rate is not None:
    kwargs["learning_rate"] = cfg.learning_rate
  return cls, kwargs


def _quantized_probe(fmt):
  def build(dims):
    return dpquant_tf.quantize_model(
        audit.linear_probe_model(dims),
        config=presets.layer_config(fmt))
  return build


def run(cfg: AuditConfig) -> Dict[str, Any]:
  """Runs the audit; returns a JSON-able dict (config and result)."""
  kind = V.check_enum("audit", cfg.audit, AuditKind)
  cls, kwargs = _optimizer(cfg)
  common = dict(l2_norm_clip=cfg.l2_norm_clip,
                noise_multiplier=cfg.noise_multiplier, optimizer_cls=cls,
                delta=cfg.delta, confidence=cfg.confidence, seed=cfg.seed)
  if kind is AuditKind.MECHANISM:
    model_fn = None if cfg.format is None else _quantized_probe(cfg.format)
    result = audit.audit_mechanism(trials=cfg.trials, model_fn=model_fn,
                                   optimizer_kwargs=kwargs,
                                   strategy=cfg.strategy, **common)
  elif kind is AuditKind.CHECKPOINT:
    result = audit.audit_checkpoint_replay(trials=cfg.trials,
                                           optimizer_kwargs=kwargs, **common)
  else:
    lr = kwargs.pop("learning_rate", 20.0)
    data = max(cfg.canaries, 100)
    result = audit.audit_one_run(
        canaries=cfg.canaries, data_size=data, epochs=cfg.epochs,
        sampling_rate=min(1.0, cfg.batch_size / (data + cfg.canaries / 2)),
        learning_rate=lr, optimizer_kwargs=kwargs, **common)
  config = dataclasses.asdict(cfg)
  config.pop("strategy")
  if cfg.strategy is not None:
    config["replicas"] = cfg.strategy.num_replicas_in_sync
  return {"config": config, "result": result.as_dict()}


def format_table(report: Dict[str, Any]) -> str:
  """A plain-text table of one report."""
  cfg, res = report["config"], report["result"]
  rows = [("audit", cfg["audit"]),
          ("optimizer", cfg["optimizer"]),
          ("noise_multiplier", cfg["noise_multiplier"]),
          ("l2_norm_clip", cfg["l2_norm_clip"]),
          ("gradient_bits", cfg["gradient_bits"] or "off"),
          ("sensitivity_mode", cfg["sensitivity_mode"]),
          ("format (quantized compute)", cfg["format"] or "off"),
          ("claimed epsilon (ledger)", f"{res['claimed_epsilon']:.4f}"),
          (f"epsilon lower bound ({100 * res['confidence']:g}%)",
           f"{res['epsilon_lower_bound']:.4f}"),
          ("delta", res["delta"]),
          ("violated", res["violated"]),
          ("wall seconds", f"{res['wall_s']:.1f}")]
  if "trials" in res:
    rows.insert(7, ("trials per side", res["trials"]))
  else:
    rows.insert(7, ("canaries / guesses / correct",
                    f"{res['canaries']} / {res['guesses']} / "
                    f"{res['correct']}"))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def to_json(report: Dict[str, Any]) -> str:
  return json.dumps(report, default=str, sort_keys=True)

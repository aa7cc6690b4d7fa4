"""Logic of tools/audit_privacy.py: run an empirical privacy audit of a
configuration described like examples/train.py's flags and format the result.

Audits (dpquant_tf.audit): ``mechanism`` (white-box one step, many trials),
``checkpoint`` (an adversary with two consecutive checkpoints tries to
regenerate the noise), ``one_run`` (Steinke et al. 2023, m canaries in one
training run). ``audit_train_config`` runs the one-run audit with gradient
canaries on the exact configuration an ``examples/train.py`` run describes
(its ``TrainConfig``; model, data, optimizer, schedule and ledger are built
by ``examples/train_lib.py``'s own builders, used read-only).
"""

import dataclasses
import enum
import json
import time
from typing import Any, Dict, Optional

import dpquant_tf
from dpquant_tf import _validation as V
from dpquant_tf import audit
from dpquant_tf import presets

__all__ = ["AuditConfig", "AuditKind", "audit_train_config", "format_table",
           "run"]


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
  canary_kind: str = "input"
  score: str = "per_step"

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
        learning_rate=lr, optimizer_kwargs=kwargs,
        canary_kind=cfg.canary_kind, score=cfg.score, **common)
  config = dataclasses.asdict(cfg)
  config.pop("strategy")
  if cfg.strategy is not None:
    config["replicas"] = cfg.strategy.num_replicas_in_sync
  return {"config": config, "result": result.as_dict()}


def audit_train_config(train_config, *, canaries: int, seed: int = 0,
                       score: str = "per_step",
                       guesses: Optional[int] = None,
                       confidence: float = 0.95) -> Dict[str, Any]:
  """One-run audit, gradient canaries, of an examples/train.py configuration.

  Builds the model, data, Poisson input pipeline, calibrated noise, DP
  optimizer, ledger and DPQuant schedule exactly as ``train_lib.train``
  does, then trains once with ``canaries`` gradient canaries injected
  through the optimizer's audit hook (``audit.fit_with_gradient_canaries``).
  The claim is the ledger's epsilon for the whole run (sensitivity analyses
  included).

  Args:
    train_config: an ``examples.train_lib.TrainConfig`` (dp=True).
    canaries: m.
    seed: public seed of the canaries (directions, "in" set).
    score: "per_step" (plain SGD) or "final".
    guesses: "in" guesses and "out" guesses each (default m // 10).
    confidence: of the bound.

  Returns:
    A report dict: "config" (the TrainConfig, public fields) and "result"
    (``OneRunAudit.as_dict()`` plus "noise_multiplier", "test_accuracy").
  """
  # pylint: disable=g-import-not-at-top,protected-access
  from examples import train_lib as T
  import tensorflow as tf
  cfg = train_config.validate()
  if not cfg.dp:
    V.fail("train_config.dp", cfg.dp, "True (nothing to audit without DP)")
  start = time.perf_counter()
  if cfg.seed is not None:
    tf.keras.utils.set_random_seed(cfg.seed)
  ds = T.dp_data.load_dataset(cfg.dataset, max_train=cfg.max_train,
                              max_test=cfg.max_test, data_dir=cfg.data_dir,
                              tfds_download=cfg.tfds_download)
  n = len(ds.x_train)
  batch = min(cfg.batch_size, n)
  q = batch / n
  model, _, all_off = T._quantized_model(cfg, ds)
  policy = T._make_policy(cfg, V.check_enum("policy", cfg.policy,
                                            T.PolicyName))
  loss = tf.keras.losses.SparseCategoricalCrossentropy(
      from_logits=True, reduction=tf.keras.losses.Reduction.NONE)
  estimator = T._make_estimator(cfg, ds, policy, loss)
  train_data, steps_per_epoch, ledger, noise = T._input_pipeline(
      cfg, ds, batch=batch, q=q, estimator=estimator, policy=policy)
  optimizer = T._make_optimizer(cfg, noise=noise, ledger=ledger, n=n, q=q)
  model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])
  callbacks, _ = T._callbacks(cfg, policy, ledger, estimator)

  def fit(extra):
    model.fit(train_data, epochs=cfg.epochs, callbacks=callbacks + extra,
              verbose=0, steps_per_epoch=steps_per_epoch)

  scores, included = audit.fit_with_gradient_canaries(
      model, optimizer, fit, canaries=canaries, seed=seed, score=score)
  k = canaries // 10 if guesses is None else guesses
  result = audit.score_and_bound(
      scores, included, ledger=ledger, guesses_in=k, guesses_out=k,
      delta=cfg.delta, confidence=confidence, canary_kind="gradient",
      wall_s=time.perf_counter() - start)
  if all_off is not None:   # pinned layers evaluate in float32 anyway
    dpquant_tf.set_plan(model, all_off)  # evaluate in full precision
  _, acc = model.evaluate(ds.x_test, ds.y_test, batch_size=256, verbose=0)
  out = result.as_dict()
  out.update(noise_multiplier=noise, test_accuracy=float(acc), score=score)
  config = T._public_config(cfg)
  config.update(audit="one_run (examples/train.py configuration)",
                canaries=canaries, seed_canaries=seed)
  return {"config": config, "result": out}


def format_table(report: Dict[str, Any]) -> str:
  """A plain-text table of one report."""
  cfg, res = report["config"], report["result"]
  if "model" in cfg:  # audit_train_config
    rows = [(k, cfg[k]) for k in ("audit", "dataset", "model", "epochs",
                                  "batch_size", "target_epsilon", "policy",
                                  "format", "learning_rate")]
    rows += [("noise_multiplier", f"{res['noise_multiplier']:.4f}"),
             ("claimed epsilon (ledger)", f"{res['claimed_epsilon']:.4f}"),
             (f"epsilon lower bound ({100 * res['confidence']:g}%)",
              f"{res['epsilon_lower_bound']:.4f}"),
             ("canaries / guesses / correct",
              f"{res['canaries']} / {res['guesses']} / {res['correct']}"),
             ("DP steps", res["steps"]), ("violated", res["violated"]),
             ("test accuracy", f"{res['test_accuracy']:.4f}"),
             ("wall seconds", f"{res['wall_s']:.1f}")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
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

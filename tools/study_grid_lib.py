"""The paired grid of the deeper-model study (small ResNet, docs/RESULTS.md).

Separate from the CNN grid of tools/run_study_lib.py (which stays as it
was). Paired cells with common random numbers: for every seed s, every
policy (fp32 DP = quantization off, static random subsets, rotation,
DPQuant) runs with the same ``--seed=s`` (initialisation, schedule draws)
and the same research seeds derived from s (:func:`research_seeds`), so all
policies of one seed see the same Poisson batches and the same DP noise
draws, up to what the differing quantization changes. Differences between
policies are then judged per seed (tools/study_stats_lib.py).

The research seeds make the DP guarantee hold only while they stay secret
(they are derived from s here, so they are not secret: research runs only,
never a release). examples/train.py prints a warning, withholds their values
from the metrics and records ``research.noise_seeded`` /
``research.sampling_seeded``; :func:`run_meta` adds the pairing seed.

The non-DP runs (plain SGD, ``--nodp``) take the same ``--seed=s`` but no
research seeds (train.py refuses them without DP; its data order is then
fixed by ``--seed``).
"""

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from dpquant_tf import _validation
from tools import run_study_lib

__all__ = ["DP_POLICIES", "NATIVE_FORMATS", "available_formats", "default_formats",
           "research_seeds", "run_meta", "study_grid", "sweep_grid"]

# Kind of a run in the report -> examples/train.py --policy.
DP_POLICIES = {"fp32": "none", "static": "static", "rotation": "rotation",
               "dpquant": "loss_aware"}
# Formats with a hardware path, taken into the default grid when train.py has them.
NATIVE_FORMATS = ("bf16",)
_NOISE_BASE, _SAMPLING_BASE, _ESTIMATOR_BASE = 1_000_000, 2_000_000, 3_000_000


def available_formats() -> List[str]:
  """The values `examples/train.py --format` accepts (presets and native)."""
  try:
    from examples import train_lib  # pylint: disable=g-import-not-at-top
    return list(train_lib.format_names())
  except (ImportError, AttributeError):  # an examples/ without native formats
    from dpquant_tf import presets  # pylint: disable=g-import-not-at-top
    return [f.value for f in presets.FormatPreset]


def default_formats() -> List[str]:
  """LUQ-FP4 (the paper's) plus the native formats that train.py accepts."""
  have = available_formats()
  return ["luq_fp4"] + [f for f in NATIVE_FORMATS if f in have]


def research_seeds(seed: int) -> Tuple[int, int, int]:
  """(noise, sampling, estimator) research seeds of pairing seed `seed`.

  Every private random stream of a DP run (optimizer noise, Poisson sampler,
  the loss-sensitivity estimator's sampling and noise) is seeded, so the
  policies of one seed are common-random-number pairs.
  """
  seed = _validation.check_int("seed", seed, low=0)
  if seed >= _NOISE_BASE:
    _validation.fail("seed", seed, f"an int below {_NOISE_BASE}")
  return _NOISE_BASE + seed, _SAMPLING_BASE + seed, _ESTIMATOR_BASE + seed


def run_meta(spec: run_study_lib.RunSpec) -> Dict[str, Any]:
  """What a study record notes besides the metrics: grid, kind, pairing seed."""
  cfg = spec.config
  kind = {v: k for k, v in DP_POLICIES.items()}.get(cfg.get("policy"), cfg.get("policy"))
  return {"grid": cfg.get("model") or "small_resnet", "kind": kind, "pair_seed": cfg.get("seed"),
          "paired": cfg.get("research_noise_seed") is not None,
          "sweep": spec.run_id.startswith("sweep-")}


def _check_formats(formats: Sequence[str]) -> List[str]:
  have = available_formats()
  for fmt in formats:
    if fmt not in have:
      _validation.fail("formats", fmt, f"one of {have} (examples/train.py --format)")
  return list(formats)


def study_grid(*, layer_names: Sequence[str], seeds: Sequence[int],
               ratios: Sequence[float], formats: Sequence[str],
               epsilon: float = 8.0, n_static: int = 1,
               dp_policies: Sequence[str] = tuple(DP_POLICIES),
               nodp_policies: Sequence[str] = ("fp32", "static"),
               common: Optional[Mapping[str, Any]] = None,
               nodp_overrides: Optional[Mapping[str, Any]] = None
               ) -> List[run_study_lib.RunSpec]:
  """The paired grid, seed by seed (a partial study already has whole pairs).

  Per seed s: the fp32 DP run, then per format and ratio DPQuant, rotation
  (left out when k = n: it would equal static) and `n_static` static random
  subsets (drawn with seed s: over the seeds they sample the static mean);
  then the non-DP runs of `nodp_policies` (kinds "fp32", "static",
  "rotation", "dpquant"). Every DP run of seed s carries
  ``research_seeds(s)``.

  Args:
    layer_names: the model's quantizable layers.
    seeds: pairing seeds (at least 5 for the claims to be decidable).
    ratios: quantized fractions.
    formats: examples/train.py formats.
    epsilon: the DP target epsilon.
    n_static: static subsets per seed, format and ratio.
    dp_policies: kinds run with DP ("fp32", "static", "rotation", "dpquant").
    nodp_policies: kinds also run without DP.
    common: TrainConfig arguments shared by every run.
    nodp_overrides: TrainConfig arguments of the non-DP runs (learning rate).

  Returns:
    The run specs, ids ``eps8-<fmt>-r<ratio>-<kind>[-<layers>]-s<seed>``.
  """
  formats = _check_formats(formats)
  _validation.check_int("n_static", n_static, low=1)
  _validation.check_positive("epsilon", epsilon)
  for name, kinds in (("dp_policies", dp_policies), ("nodp_policies", nodp_policies)):
    for kind in kinds:
      if kind not in DP_POLICIES:
        _validation.fail(name, kind, f"one of {sorted(DP_POLICIES)}")
  seeds = [int(s) for s in seeds]
  if len(set(seeds)) != len(seeds):
    _validation.fail("seeds", seeds, "distinct seeds")
  common = dict(common or {}, model=(common or {}).get("model", "small_resnet"))
  n = len(layer_names)
  runs = []
  for seed in seeds:
    noise_seed, sampling_seed, estimator_seed = research_seeds(seed)
    dp = dict(common, seed=seed, dp=True, target_epsilon=float(epsilon),
              research_noise_seed=noise_seed, research_sampling_seed=sampling_seed,
              research_estimator_seed=estimator_seed)
    nodp = dict(common, seed=seed, dp=False, target_epsilon=None,
                **dict(nodp_overrides or {}))
    for tag, base, kinds in ((f"eps{epsilon:g}", dp, tuple(dp_policies)),
                             ("nodp", nodp, tuple(nodp_policies))):
      if "fp32" in kinds:
        runs.append(run_study_lib.RunSpec(f"{tag}-fp32-s{seed}",
                                          dict(base, policy="none")))
      for fmt in formats:
        for ratio in ratios:
          head = f"{tag}-{fmt}-r{ratio:g}"
          cell = dict(base, ratio=float(ratio), format=fmt)
          if "dpquant" in kinds:
            runs.append(run_study_lib.RunSpec(f"{head}-dpquant-s{seed}",
                                              dict(cell, policy="loss_aware")))
          everything = run_study_lib.num_quantized(ratio, n) == n
          if "rotation" in kinds and not everything:
            runs.append(run_study_lib.RunSpec(f"{head}-rotation-s{seed}",
                                              dict(cell, policy="rotation")))
          if "static" in kinds:
            for subset in run_study_lib.static_subsets(layer_names, ratio, n_static,
                                                       seed):
              runs.append(run_study_lib.RunSpec(
                  f"{head}-static-{'+'.join(subset)}-s{seed}",
                  dict(cell, policy="static", static_layers=tuple(subset))))
  return runs


def sweep_grid(*, learning_rates: Sequence[float], epochs: Sequence[int],
               epsilon: float = 8.0, seed: int = 0,
               common: Optional[Mapping[str, Any]] = None
               ) -> List[run_study_lib.RunSpec]:
  """Short fp32 DP runs that choose the study's learning rate and epochs.

  Ids ``sweep-eps8-fp32-lr<lr>-e<epochs>-s<seed>``; the noise multiplier is
  calibrated to `epsilon` for each number of epochs, as in the study.
  """
  _validation.check_positive("epsilon", epsilon)
  common = dict(common or {}, model=(common or {}).get("model", "small_resnet"))
  noise_seed, sampling_seed, estimator_seed = research_seeds(seed)
  runs = []
  for lr in learning_rates:
    _validation.check_positive("learning_rates", lr)
    for e in epochs:
      _validation.check_int("epochs", e, low=1)
      runs.append(run_study_lib.RunSpec(
          f"sweep-eps{epsilon:g}-fp32-lr{lr:g}-e{e}-s{seed}",
          dict(common, seed=seed, dp=True, target_epsilon=float(epsilon),
               policy="none", learning_rate=float(lr), epochs=int(e),
               research_noise_seed=noise_seed, research_sampling_seed=sampling_seed,
               research_estimator_seed=estimator_seed)))
  return runs

"""PrivacyLedger: one accountant for every training step and analysis release.

Training steps come from the attached optimizers' in-graph event tables (the
optimizer emits them; nothing is recomputed from hyperparameters). Analysis
releases (the loss-sensitivity estimator) are recorded with ``record``. The
ledger is a ``tf.Module``: its recorded events live in a string variable, so
``tf.train.Checkpoint(ledger=ledger)`` saves and restores them; every attached
optimizer also tracks the ledger, so each checkpoint of the model (Keras
``save_weights``, ``ModelCheckpoint``, ``BackupAndRestore``,
``tf.train.Checkpoint(model=...)``) carries it.

Privacy state only grows. A restore of an earlier checkpoint of the same
ledger (same lineage) never drops a release: what the restore removed is kept
in memory outside every checkpoint (a bank) and still accounted. The ledger
also notes, per attached optimizer history, how many steps it saw; a ledger
whose notes do not match the attached optimizers' histories (another run's
ledger, or a ledger from a later checkpoint than the optimizer) is refused.
"""

import enum
import json
import math
import secrets
import textwrap
from typing import Dict, List, Optional, Tuple

import attr
import dp_accounting
from dp_accounting import dp_event as dp_event_lib
import tensorflow as tf

from dpquant_tf import _validation as V
from dpquant_tf import _tf_utils
from dpquant_tf.privacy import _accounting
from dpquant_tf.privacy import _events
from dpquant_tf.privacy import _model_checks

__all__ = ["EventKind", "PrivacyLedger", "SamplingMethod", "SEEDED_SOURCES"]

# Sources of private randomness that may be seeded, and what a known seed
# voids (the statement prints these).
SEEDED_SOURCES = {
    "noise": ("the DP noise of the training steps (optimizer seed= / "
              "noise_seed=): the guarantee holds only while the seed stays "
              "secret; anyone who knows it can regenerate and subtract the "
              "noise, and then no guarantee is left"),
    "sampler": ("the Poisson sampler (poisson_dataset seed=): the batches are "
                "known to anyone who knows the seed, so amplification by "
                "sampling is void; the guarantee stated is the epsilon "
                "without amplification"),
    "estimator": ("the loss-sensitivity estimator (seed=): its sample is "
                  "known to anyone who knows the seed, so its releases are "
                  "accounted without amplification; its noise protects only "
                  "while the seed stays secret"),
    "canaries": ("the audit canaries (seed=): which canaries were inserted "
                 "is reproducible; the audit's lower bound is then a "
                 "statement about these canaries only"),
}


class SamplingMethod(enum.Enum):
  """How training batches were formed.

  POISSON: each example independently with probability q (``poisson_dataset``).
    The accounted epsilon is the guarantee.
  SHUFFLED: fixed-size batches of shuffled data (plain ``model.fit``). The
    Poisson-accounted epsilon is then NOT a proven guarantee; the statement
    says so and also gives the bound without amplification by sampling.
  """
  POISSON = "poisson"
  SHUFFLED = "shuffled"


class EventKind(enum.Enum):
  TRAIN = "train"
  ANALYSIS = "analysis"


def _event_to_json(event):
  if isinstance(event, (list, tuple)):
    return [_event_to_json(e) for e in event]
  if isinstance(event, dp_accounting.DpEvent):
    fields = {f.name: _event_to_json(getattr(event, f.name))
              for f in attr.fields(type(event))}
    return {"__event__": type(event).__name__, **fields}
  if isinstance(event, (bool, int, float, str)) or event is None:
    return event
  raise TypeError(f"Cannot serialize {event!r} in a DpEvent.")


def _event_from_json(data):
  if isinstance(data, list):
    return [_event_from_json(d) for d in data]
  if isinstance(data, dict):
    data = dict(data)
    cls = getattr(dp_event_lib, data.pop("__event__"))
    return cls(**{k: _event_from_json(v) for k, v in data.items()})
  return data


def _unamplified(event):
  """The event without its Poisson sampling (the sample is known)."""
  if isinstance(event, dp_accounting.PoissonSampledDpEvent):
    return event.event
  return event


def _parse_state(raw: str) -> Dict:
  """The stored state; a list is the format before lineages (no notes)."""
  data = json.loads(raw)
  if isinstance(data, list):
    data = {"lineage": None, "records": data}
  data.setdefault("records", [])
  data.setdefault("seeded", [])
  data.setdefault("histories", {})
  return data


class _Spent:
  """Plain holder (not tracked, never saved): the state as this object last
  wrote or read it (`shadow`), and what restores removed from it (`bank`)."""

  def __init__(self, raw: str, state: Dict):
    self.shadow_raw = raw
    self.shadow = state
    self.bank_records: List[Dict] = []
    self.bank_seeded = set()
    self.bank_histories: Dict[str, int] = {}


def _add_record(records: List[Dict], kind: str, key: str, count: int):
  for item in records:
    if item["kind"] == kind and item["key"] == key:
      item["count"] += count
      return
  records.append({"kind": kind, "key": key, "count": count})


class _Attached:
  """Plain holder so tf.Module does not track attached objects.

  optimizers: attached DP optimizers (their events are pulled on queries).
  planners: callbacks (``DPQuantScheduler``) that release analyses at epoch
    begin; guards project their planned releases.
  """

  def __init__(self):
    self.optimizers = []
    self.planners = []


class PrivacyLedger(tf.Module):
  """Records DP events and answers epsilon queries.

  Args:
    sampling_method: ``SamplingMethod.SHUFFLED`` (default: plain shuffled
      fixed batches) or ``POISSON`` (``poisson_dataset``).
    accountant: ``Accountant.RDP`` (default) or ``PLD``.
    dataset_size: N, only used in the statement.
    public_state: names of preprocessing layers (Normalization,
      TextVectorization, lookups, ...) whose state the user declares public
      (adapted on public data, not on the private training set). The model
      check refuses undeclared ones; the statement lists the declared ones.
    name: module name.
  """

  def __init__(self, *, sampling_method=SamplingMethod.SHUFFLED,
               accountant=_accounting.Accountant.RDP,
               dataset_size: Optional[int] = None, public_state=(),
               name="privacy_ledger"):
    super().__init__(name=name)
    self.sampling_method = V.check_enum("sampling_method", sampling_method,
                                        SamplingMethod)
    self.accountant = V.check_enum("accountant", accountant,
                                   _accounting.Accountant)
    self.dataset_size = (None if dataset_size is None else
                         V.check_int("dataset_size", dataset_size, low=1))
    self.public_state = _model_checks.check_public_names("public_state",
                                                         public_state)
    # Host-side state: never mirrored (MultiWorkerMirroredStrategy cannot
    # broadcast strings), also when the ledger is created in a strategy scope.
    initial = {"lineage": secrets.token_hex(8), "records": [], "seeded": [],
               "histories": {}}
    raw = json.dumps(initial, sort_keys=True)
    self._records = _tf_utils.local_variable(
        raw, dtype=tf.string, name="recorded_events")
    self._attached = _Attached()
    self._spent = _Spent(raw, initial)

  def check_delta(self, delta: float) -> float:
    """Validates `delta`: in (0, 1), and below 1/dataset_size when the
    ledger knows N (refused at or above 1/N, a warning above 1/(10 N))."""
    return _accounting.check_delta(delta, self.dataset_size)

  # ------------------------------------------------------------ input
  def attach(self, optimizer) -> None:
    """Pulls `optimizer.dp_events()` on every query."""
    if not hasattr(optimizer, "dp_events"):
      V.fail("optimizer", optimizer, "an optimizer with dp_events() (a "
             "DPQuantOptimizer)", TypeError)
    if all(o is not optimizer for o in self._attached.optimizers):
      self._attached.optimizers.append(optimizer)
    # Every checkpoint of the optimizer (hence of a compiled model) carries
    # the ledger's releases: BackupAndRestore, ModelCheckpoint, save_weights.
    track = getattr(optimizer, "_track_trackable", None)
    if track is not None:
      track(self, name="dp_privacy_ledger", overwrite=True)

  def is_attached(self, optimizer) -> bool:
    """Whether `optimizer`'s steps are pulled into this ledger."""
    return any(o is optimizer for o in self._attached.optimizers)

  def add_planner(self, planner) -> None:
    """Registers a callback with ``planned_releases(epoch)``."""
    if all(p is not planner for p in self._attached.planners):
      self._attached.planners.append(planner)

  def remove_planner(self, planner) -> None:
    self._attached.planners = [p for p in self._attached.planners
                               if p is not planner]

  def planned_releases(self, epoch: int) -> List[Tuple[dp_accounting.DpEvent,
                                                      int]]:
    """(event, count) releases the registered planners make at `epoch`."""
    out = []
    for planner in self._attached.planners:
      out.extend(_accounting.as_event_counts(planner.planned_releases(epoch)))
    return out

  def record(self, event: dp_accounting.DpEvent, *, kind=EventKind.ANALYSIS,
             count: int = 1) -> None:
    """Records `count` occurrences of `event` (a release that spends privacy).

    Args:
      event: a dp_accounting ``DpEvent`` with Python-float parameters.
      kind: ``"analysis"`` (estimator releases) or ``"train"``.
      count: number of occurrences.
    """
    V.check_type("event", event, dp_accounting.DpEvent, "a DpEvent")
    kind = V.check_enum("kind", kind, EventKind)
    count = V.check_int("count", count, low=1)
    state = self._state()
    key = json.dumps(_event_to_json(event), sort_keys=True)
    _add_record(state["records"], kind.value, key, count)
    self._write(state)

  def note_seeded(self, source: str) -> None:
    """Records THAT a source of private randomness was seeded (never the
    seed). `source`: one of ``SEEDED_SOURCES`` ("noise", "sampler",
    "estimator", "canaries"). The statement names it and what it voids; a
    seeded sampler or estimator loses amplification in ``proven_epsilon``.
    Saved with the ledger; never forgotten by a restore."""
    if source not in SEEDED_SOURCES:
      V.fail("source", source, f"one of {sorted(SEEDED_SOURCES)}")
    state = self._state()
    if source not in state["seeded"]:
      state["seeded"] = sorted(set(state["seeded"]) | {source})
      self._write(state)

  def seeded_sources(self) -> List[str]:
    """Sources noted as seeded (also attached optimizers with seeded noise)."""
    state = self._state()
    out = set(state["seeded"]) | self._spent.bank_seeded
    if any(getattr(o, "noise_is_seeded", False)
           for o in self._attached.optimizers):
      out.add("noise")
    return sorted(out)

  def proves_amplification(self) -> bool:
    """Whether the training steps' amplification by sampling is proven:
    Poisson sampling by an unseeded sampler."""
    return (self.sampling_method is SamplingMethod.POISSON and
            "sampler" not in self.seeded_sources())

  def _write(self, state: Dict) -> None:
    raw = json.dumps(state, sort_keys=True)
    self._records.assign(raw)
    self._spent.shadow_raw, self._spent.shadow = raw, state

  def _state(self) -> Dict:
    """The stored state; banks what a restore removed since the last read.

    A restore of the same lineage (an earlier checkpoint of this ledger)
    banks the releases it removed; a restore of another lineage (another
    ledger's checkpoint, e.g. a resumed run) banks everything this object
    held before. A fresh ledger holds nothing, so a resumed run accounts the
    checkpoint's releases exactly once.
    """
    spent = self._spent
    raw = self._records.numpy().decode()
    if raw != spent.shadow_raw:
      new = _parse_state(raw)
      old = spent.shadow
      same = (old.get("lineage") is not None and
              old.get("lineage") == new.get("lineage"))
      now = {(r["kind"], r["key"]): r["count"] for r in new["records"]}
      for r in old["records"]:
        lost = r["count"] - (now.get((r["kind"], r["key"]), 0) if same
                             else 0)
        if lost > 0:
          _add_record(spent.bank_records, r["kind"], r["key"], lost)
      spent.bank_seeded |= set(old["seeded"])
      for h, steps in old["histories"].items():
        spent.bank_histories[h] = max(spent.bank_histories.get(h, 0), steps)
      spent.shadow_raw, spent.shadow = raw, new
    return json.loads(json.dumps(spent.shadow))

  def _load(self) -> List[Dict]:
    """Every recorded release: the stored ones plus the banked ones."""
    records = [dict(r) for r in self._state()["records"]]
    for r in self._spent.bank_records:
      _add_record(records, r["kind"], r["key"], r["count"])
    return records

  def _check_histories(self, steps_by_history: Dict[str, int]) -> None:
    """Refuses a ledger that does not match the attached optimizers."""
    state = self._state()
    notes = dict(self._spent.bank_histories)
    for h, steps in state["histories"].items():
      notes[h] = max(notes.get(h, 0), steps)
    for h, steps in steps_by_history.items():
      if notes.get(h, 0) > steps:
        raise ValueError(
            f"This ledger does not match the optimizer's history: it saw "
            f"{notes[h]} steps of optimizer history {h}, the optimizer now "
            f"holds {steps} (the ledger was restored from a later "
            "checkpoint than the optimizer). Restore both from the same "
            "checkpoint.")
      if (h not in notes and steps > 0 and notes and
          not any(k in steps_by_history for k in notes)):
        raise ValueError(
            f"This ledger does not match the optimizer's history: it holds "
            f"the notes of optimizer histories {sorted(notes)} (another "
            f"run's ledger?), the attached optimizer is history {h} with "
            f"{steps} steps. Restore the ledger and the optimizer from the "
            "same checkpoint, or use a new ledger.")
    changed = False
    for h, steps in steps_by_history.items():
      if state["histories"].get(h, -1) < steps:
        state["histories"][h] = steps
        changed = True
    if changed:
      self._write(state)

  # ------------------------------------------------------------ output
  def events(self, kind=None) -> List[Tuple[dp_accounting.DpEvent, int]]:
    """(event, count) pairs of the given kind (None = all).

    Raises:
      EventTableOverflowError / UnknownSamplingProbabilityError from an
      attached optimizer whose events cannot be accounted exactly.
    """
    kind = None if kind is None else V.check_enum("kind", kind, EventKind)
    out = []
    if kind in (None, EventKind.TRAIN):
      by_history = {}
      for opt in self._attached.optimizers:
        events = opt.dp_events()
        out.extend(events)
        if hasattr(opt, "history_id"):
          h = str(opt.history_id)
          by_history[h] = by_history.get(h, 0) + sum(c for _, c in events)
      self._check_histories(by_history)
    for item in self._load():
      if kind is None or item["kind"] == kind.value:
        out.append((_event_from_json(json.loads(item["key"])),
                    item["count"]))
    return out

  def epsilon(self, delta: float, *, accountant=None, kind=None) -> float:
    """Epsilon at `delta` of everything recorded (or one kind)."""
    delta = self.check_delta(delta)
    acc = (self.accountant if accountant is None else
           V.check_enum("accountant", accountant, _accounting.Accountant))
    return _accounting.compose_epsilon(self.events(kind), delta, acc)

  def epsilon_with(self, extra, delta: float) -> float:
    """Epsilon if `extra` (DpEvents or (event, count) pairs) were added."""
    delta = self.check_delta(delta)
    events = self.events() + _accounting.as_event_counts(extra)
    return _accounting.compose_epsilon(events, delta, self.accountant)

  def analysis_share(self, delta: float) -> float:
    """Share of epsilon due to analysis: (eps_all - eps_train) / eps_all."""
    total = self.epsilon(delta)
    if total <= 0 or not math.isfinite(total):
      return 0.0
    return max(0.0, (total - self.epsilon(delta, kind=EventKind.TRAIN))
               / total)

  def _train_summary(self, extra_train=()):
    """(steps, epochs, min z, max z, q values) of the training events."""
    steps, epochs, zs, qs = 0, 0.0, [], set()
    for event, count in (self.events(EventKind.TRAIN) +
                         _accounting.as_event_counts(extra_train)):
      q = getattr(event, "sampling_probability", 1.0)
      inner = getattr(event, "event", event)
      zs.append(float(getattr(inner, "noise_multiplier", float("nan"))))
      qs.add(q)
      steps += count
      epochs += count * q
    return steps, epochs, zs, qs

  def epsilon_without_amplification(self, delta: float, *, extra_train=(),
                                    extra_analysis=()) -> float:
    """Bound with each example in at most ceil(epochs) steps (any order).

    Every training step is taken at the smallest noise multiplier used, so
    this is conservative for runs whose noise changes.

    Args:
      delta: target delta.
      extra_train: training (event, count) pairs to project (not recorded).
      extra_analysis: analysis releases to project (not recorded).
    """
    delta = self.check_delta(delta)
    steps, epochs, zs, _ = self._train_summary(extra_train)
    events = []
    if steps:
      z = min(zs)
      events.append((_events.gaussian_event(z),
                     max(1, math.ceil(epochs - 1e-9))))
    events += self._analysis_events(extra_analysis)
    return _accounting.compose_epsilon(events, delta, self.accountant)

  def _analysis_events(self, extra_analysis=()):
    """Analysis releases as the guarantee accounts them: without their
    sampling amplification when the estimator was seeded."""
    events = (self.events(EventKind.ANALYSIS) +
              _accounting.as_event_counts(extra_analysis))
    if "estimator" in self.seeded_sources():
      events = [(_unamplified(e), c) for e, c in events]
    return events

  def proven_epsilon(self, delta: float, *, extra_train=(),
                     extra_analysis=()) -> float:
    """The epsilon that holds for the sampling actually used (invariant 12).

    POISSON with an unseeded sampler: the (amplified) composition of every
    event. SHUFFLED, or a seeded sampler (``note_seeded("sampler")``): the
    bound without amplification (``epsilon_without_amplification``). A
    seeded estimator's releases are accounted without their amplification.
    This is the figure ``PrivacyCallback`` and ``DPQuantScheduler`` log as
    ``epsilon`` and budgets are checked with.

    Args:
      delta: target delta.
      extra_train: training (event, count) pairs to project (not recorded).
      extra_analysis: analysis releases to project (not recorded).
    """
    if self.proves_amplification():
      delta = self.check_delta(delta)
      events = (self.events(EventKind.TRAIN) +
                _accounting.as_event_counts(extra_train) +
                self._analysis_events(extra_analysis))
      return _accounting.compose_epsilon(events, delta, self.accountant)
    return self.epsilon_without_amplification(
        delta, extra_train=extra_train, extra_analysis=extra_analysis)

  def statement(self, delta: float) -> str:
    """A privacy statement in the wording of TF-Privacy's
    ``compute_dp_sgd_privacy_statement``."""
    delta = self.check_delta(delta)
    steps, epochs, zs, qs = self._train_summary()
    n = self.dataset_size
    if n is not None and qs:
      batch = ", ".join(f"{q * n:g}" for q in sorted(qs))
      n_text = f"{n} examples with {batch} expected examples per iteration"
    else:
      rates = ", ".join(f"{q:g}" for q in sorted(qs)) or "n/a"
      n_text = f"examples sampled at rate {rates} per iteration"
    z_text = (f"{zs[0]:g}" if len(set(zs)) == 1 else
              f"from {min(zs):g} to {max(zs):g}" if zs else "n/a")
    sampling = ("Poisson sampling" if self.sampling_method is
                SamplingMethod.POISSON else "shuffled fixed-size batches")
    paras = [textwrap.fill(
        f"DP-SGD (dpquant_tf) performed over {n_text}, noise multiplier "
        f"{z_text} for {epochs:g} epochs ({steps} steps) using {sampling}, "
        "and no bound on number of examples per user.", width=80)]
    paras.append(textwrap.fill(
        "This privacy guarantee protects the release of all model "
        "checkpoints in addition to the final model.", width=80))
    eps_once = self.epsilon_without_amplification(delta)
    eps_poisson = self.epsilon(delta)
    para = textwrap.fill(
        f"Example-level DP with add-or-remove-one adjacency at delta = "
        f"{delta} computed with {self.accountant.name} accounting:", width=80)
    para += (f"\n    Epsilon with each example occurring once per epoch:  "
             f"{eps_once:12.3f}\n    Epsilon assuming Poisson sampling (*):"
             f"               {eps_poisson:12.3f}")
    paras.append(para)
    paras.append(textwrap.fill(
        "No user-level privacy guarantee is possible without a bound on the "
        "number of examples per user.", width=80))
    share = self.analysis_share(delta)
    paras.append(textwrap.fill(
        f"Loss-sensitivity analysis releases account for {100 * share:.2f}% "
        "of the Poisson epsilon (share = 1 - eps(training only) / eps(all)).",
        width=80))
    if self.proves_amplification():
      note = ("(*) Batches were Poisson sampled (each example included "
              "independently with the stated rate), so this is the "
              "guarantee of the run.")
    elif self.sampling_method is SamplingMethod.POISSON:
      note = ("(*) Batches were Poisson sampled by a SEEDED sampler: anyone "
              "who knows the seed knows every batch, so amplification by "
              "sampling is not a guarantee. Only the first value is a proven "
              "bound.")
    else:
      note = ("(*) Batches were NOT Poisson sampled: training used shuffled "
              "fixed-size batches. Poisson sampling is not usually done in "
              "training pipelines, but assuming that the data was randomly "
              "shuffled, it is believed that the actual epsilon should be "
              "closer to this value than the conservative assumption of an "
              "arbitrary data order. Only the first value is a proven bound.")
    paras.append(textwrap.fill(note, width=80))
    paras.append(textwrap.fill(
        "Not covered by this guarantee (released without DP unless "
        "suppressed): the training loss and metrics Keras computes on the "
        "private batches (progress bar, History, logs of callbacks such as "
        "CSVLogger or TensorBoard) and validation metrics computed on "
        "private validation data. To release nothing else, train with "
        "verbose=0, compile without metrics, pass no validation data, and "
        "drop the 'loss' and metric entries from the logs (or do not keep "
        "History); only the weights, epsilon and the schedule's logged "
        "values are covered.", width=80))
    if self.public_state:
      paras.append(textwrap.fill(
          "Preprocessing state declared public by the user (not covered by "
          "this guarantee; adapted on public data, not on the private "
          "training set): " + ", ".join(repr(n) for n in self.public_state)
          + ".", width=80))
    seeded = self.seeded_sources()
    if "noise" in seeded:
      paras.append(textwrap.fill(
          "WARNING: the noise was drawn from an explicitly seeded generator "
          "(seed=...). The guarantee holds only while the seed stays "
          "secret; anyone who knows it can regenerate and subtract the "
          "noise.", width=80))
    for source in seeded:
      paras.append(textwrap.fill(
          f"WARNING: seeded source of private randomness: "
          f"{SEEDED_SOURCES[source]}.", width=80))
    if not seeded:
      paras.append(textwrap.fill(
          "Noise and sampling were drawn from OS entropy (no seed) by every "
          "attached optimizer and recorded source.", width=80))
    paras.append(textwrap.fill(
        f"The guarantee stated is {self.proven_epsilon(delta):.3f} at "
        f"delta = {delta}.", width=80))
    return "\n\n".join(paras) + "\n"

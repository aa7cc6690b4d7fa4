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
import logging
import math
import os
import secrets
import textwrap
import weakref
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

_log = logging.getLogger(__name__)

_JOURNAL_FORMAT = "dpquant_tf privacy journal 1"

# The DP algorithm the statement names, by optimizer class.
_ALGORITHMS = {"DPQuantOptimizer": "DP-SGD", "DPQuantAdamOptimizer": "DP-Adam",
               "DPQuantAdamWOptimizer": "DP-AdamW"}

# Sources of private randomness that may be seeded, and what a known seed
# voids (the statement prints these).
SEEDED_SOURCES = {
    "noise": ("the DP noise of the training steps (optimizer seed= / "
              "noise_seed=): the guarantee holds only while the seed stays "
              "secret; anyone who knows it can regenerate and subtract the "
              "noise, and then no guarantee is left"),
    "sampler": ("the Poisson sampler (poisson_dataset seed=): the batches are "
                "known to anyone who knows the seed, so amplification by "
                "sampling is void; its steps are accounted at rate 1 (each "
                "may hold every record)"),
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
  wrote or read it (`shadow`) and the spent budget, which only grows.

  `total[lineage][rk]`: releases spent per ledger lineage (rk = kind + key);
  at least the stored count, and never lowered by a restore (a restore of
  an older checkpoint of the same lineage leaves it; one of another lineage
  adds that lineage). `seeded`, `histories`: union / maximum of everything
  seen. `train[h]`: the maximum of the events of optimizer history h seen
  (in the journal or here); `offsets[h]`: the journaled steps of history h
  that the checkpoint this process restored no longer held (fixed when this
  object first sees h).
  """

  def __init__(self, raw: str, state: Dict):
    self.shadow_raw = raw
    self.shadow = state
    self.total: Dict[str, Dict[str, int]] = {}
    self.seeded = set()
    self.histories: Dict[str, int] = {}
    self.train: Dict[str, Dict[str, int]] = {}
    self.offsets: Dict[str, Dict[str, int]] = {}
    self.journal_raw: Optional[str] = None


def _journal_file(path) -> str:
  path = V.check_type("journal_path", path, (str, os.PathLike),
                      "a file path (str or os.PathLike)")
  path = os.fspath(path)
  if not path or os.path.isdir(path):
    V.fail("journal_path", path, "a file path, not a directory (e.g. "
           "<checkpoint dir>/privacy_journal.json)")
  return path


class _JournalHook(tf.__internal__.tracking.Trackable):
  """Saved with the ledger: every checkpoint save first writes the journal
  (the optimizers' steps up to this save), so a checkpoint the journal does
  not cover cannot exist. Its saved value (the journal path) is unused."""

  def __init__(self, ledger):
    self._ledger = weakref.ref(ledger)

  def _serialize_to_tensors(self):
    ledger = self._ledger()
    path = ""
    if ledger is not None and ledger.journal_path is not None:
      path = ledger.journal_path
      if tf.executing_eagerly():
        try:
          ledger._optimizer_events()  # pylint: disable=protected-access
        except (ValueError, _events.EventTableOverflowError,
                _events.UnknownSamplingProbabilityError) as e:
          # The save goes on; every later query raises the same error.
          _log.warning("Privacy journal not updated at this save: %s", e)
    return {"journal": tf.constant(path)}

  def _restore_from_tensors(self, restored_tensors):
    del restored_tensors
    return tf.no_op()


def _rk(record) -> str:
  return record["kind"] + "|" + record["key"]


def _lineage(state) -> str:
  return state.get("lineage") or "legacy"


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
    journal_path: optional file (best: in the checkpoint directory, e.g.
      ``<dir>/privacy_journal.json``) where the ledger keeps the spent
      budget's high-water mark (releases, the optimizers' steps per history,
      seeded sources) on every query, record and checkpoint save. A ledger
      restored from an OLDER checkpoint, also in a new process, reads it and
      accounts everything spent since (it never lowers the spent budget).
      Without it, a new process that restores an older checkpoint sees only
      that checkpoint. The journal is not a secret (counts and noise
      parameters only).
    name: module name.
  """

  def __init__(self, *, sampling_method=SamplingMethod.SHUFFLED,
               accountant=_accounting.Accountant.RDP,
               dataset_size: Optional[int] = None, public_state=(),
               journal_path: Optional[str] = None,
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
    self.journal_path = (None if journal_path is None else
                         _journal_file(journal_path))
    # Host-side state: never mirrored (MultiWorkerMirroredStrategy cannot
    # broadcast strings), also when the ledger is created in a strategy scope.
    initial = {"lineage": secrets.token_hex(8), "records": [], "seeded": [],
               "histories": {}}
    raw = json.dumps(initial, sort_keys=True)
    self._records = _tf_utils.local_variable(
        raw, dtype=tf.string, name="recorded_events")
    self._attached = _Attached()
    self._spent = _Spent(raw, initial)
    self._spent.total[initial["lineage"]] = {}
    # Written on every checkpoint save that holds the ledger (the journal).
    self._journal_hook = _JournalHook(self)

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
    if getattr(optimizer, "noise_is_seeded", False):
      self.note_seeded("noise")   # saved with the ledger
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
    total = self._spent.total.setdefault(_lineage(state), {})
    rk = _rk({"kind": kind.value, "key": key})
    total[rk] = total.get(rk, 0) + count
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
    """Sources noted as seeded: noted ones (also by a checkpoint restored
    earlier, or in the journal) and the attached optimizers' seeded noise or
    seeded sampler batches (noted in the ledger, so saved with it)."""
    self._note_optimizer_seeds()
    self._state()
    return sorted(self._spent.seeded)

  def _note_optimizer_seeds(self) -> None:
    for opt in self._attached.optimizers:
      if getattr(opt, "noise_is_seeded", False):
        self.note_seeded("noise")
      if getattr(opt, "sampler_is_seeded", False):
        self.note_seeded("sampler")

  def proves_amplification(self) -> bool:
    """Whether the RECORDED training events' (``record(kind="train")``)
    amplification by sampling is proven: Poisson sampling by an unseeded
    sampler. (The attached optimizers' steps carry their own q: the
    library sampler's, proven by its seal, or 1.)"""
    return (self.sampling_method is SamplingMethod.POISSON and
            "sampler" not in self.seeded_sources())

  def _write(self, state: Dict) -> None:
    raw = json.dumps(state, sort_keys=True)
    self._records.assign(raw)
    self._spent.shadow_raw, self._spent.shadow = raw, state
    self._absorb(state)
    self._sync_journal()

  def _absorb(self, state: Dict) -> None:
    """Raises the spent budget to at least the stored `state`."""
    spent = self._spent
    total = spent.total.setdefault(_lineage(state), {})
    for r in state["records"]:
      total[_rk(r)] = max(total.get(_rk(r), 0), r["count"])
    spent.seeded |= set(state["seeded"])
    for h, steps in state["histories"].items():
      spent.histories[h] = max(spent.histories.get(h, 0), steps)

  # ------------------------------------------------------------ journal
  def _read_journal(self) -> Dict:
    if self.journal_path is None or not os.path.exists(self.journal_path):
      return {}, {}
    try:
      with open(self.journal_path) as f:
        raw = f.read()
      data = json.loads(raw)
    except (OSError, ValueError) as e:
      raise ValueError(
          f"The privacy journal {self.journal_path} cannot be read ({e}): "
          "the spent budget of earlier processes is unknown. Restore the "
          "file, or use a ledger without journal_path (a restore then "
          "accounts only what its checkpoint holds).") from e
    ok = (isinstance(data, dict) and data.get("format") == _JOURNAL_FORMAT
          and isinstance(data.get("lineages"), dict)
          and isinstance(data.get("histories"), dict))
    if not ok:
      raise ValueError(f"The privacy journal {self.journal_path} is not a "
                       f"{_JOURNAL_FORMAT!r} file.")
    return data["lineages"], data["histories"]

  def _sync_journal(self) -> None:
    """Merges the journal into the spent budget (maximum per lineage of
    this object), then writes the merged high-water mark back (atomically).
    """
    if self.journal_path is None:
      return
    spent = self._spent
    lineages, histories = self._read_journal()
    for lin, entry in lineages.items():
      if lin not in spent.total:
        continue   # another run's ledger in the same directory
      total = spent.total[lin]
      for rk, count in entry.get("records", {}).items():
        total[rk] = max(total.get(rk, 0), int(count))
      spent.seeded |= set(entry.get("seeded", []))
    for h, events in histories.items():
      mine = spent.train.setdefault(h, {})
      for ek, count in events.items():
        mine[ek] = max(mine.get(ek, 0), int(count))
    out = {lin: dict(entry) for lin, entry in lineages.items()}
    for lin, total in spent.total.items():
      entry = out.setdefault(lin, {})
      records = dict(entry.get("records", {}))
      for rk, count in total.items():
        records[rk] = max(records.get(rk, 0), count)
      entry["records"] = records
      entry["seeded"] = sorted(set(entry.get("seeded", [])) | spent.seeded)
    hist_out = {h: dict(e) for h, e in histories.items()}
    for h, events in spent.train.items():
      mine = hist_out.setdefault(h, {})
      for ek, count in events.items():
        mine[ek] = max(mine.get(ek, 0), count)
    raw = json.dumps({"format": _JOURNAL_FORMAT, "lineages": out,
                      "histories": hist_out}, sort_keys=True)
    if raw == spent.journal_raw:
      return
    directory = os.path.dirname(os.path.abspath(self.journal_path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{self.journal_path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
      f.write(raw)
    os.replace(tmp, self.journal_path)
    spent.journal_raw = raw

  def _state(self) -> Dict:
    """The stored state (a copy); a restore since the last read never
    lowers the spent budget (``_absorb`` keeps the maximum per lineage:
    an earlier checkpoint of this ledger leaves the spent releases, another
    ledger's checkpoint, e.g. a resumed run, adds its lineage). A fresh
    ledger holds nothing, so a resumed run accounts the checkpoint's
    releases exactly once."""
    spent = self._spent
    raw = self._records.numpy().decode()
    if raw != spent.shadow_raw:
      new = _parse_state(raw)
      spent.shadow_raw, spent.shadow = raw, new
      fresh_lineage = _lineage(new) not in spent.total
      self._absorb(new)
      if fresh_lineage:
        self._sync_journal()
    return json.loads(json.dumps(spent.shadow))

  def _load(self) -> List[Dict]:
    """Every spent release (all lineages this object held)."""
    self._state()
    records = []
    for total in self._spent.total.values():
      for rk, count in total.items():
        kind, key = rk.split("|", 1)
        if count > 0:
          _add_record(records, kind, key, count)
    return records

  def _check_histories(self, steps_by_history: Dict[str, int]) -> None:
    """Refuses a ledger that does not match the attached optimizers."""
    state = self._state()
    notes = dict(self._spent.histories)
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

  def _optimizer_events(self) -> List[Tuple[dp_accounting.DpEvent, int]]:
    """The attached optimizers' steps, plus the journaled steps of their
    histories that the checkpoint this process restored no longer held."""
    spent = self._spent
    self._state()
    self._sync_journal()
    out, by_history, seen, base = [], {}, {}, {}
    for opt in self._attached.optimizers:
      events = opt.dp_events()
      out.extend(events)
      if not hasattr(opt, "history_id"):
        continue
      h = str(opt.history_id)
      by_history[h] = by_history.get(h, 0) + sum(c for _, c in events)
      for table, pairs in ((seen, events),
                           (base, getattr(opt, "dp_restored_events",
                                          lambda: [])())):
        mine = table.setdefault(h, {})
        for event, count in pairs:
          ek = json.dumps(_event_to_json(event), sort_keys=True)
          mine[ek] = mine.get(ek, 0) + count
    # Checked on the optimizers' own histories: a ledger newer than the
    # optimizer is refused whatever the journal holds.
    self._check_histories(by_history)
    # Only the histories an attached optimizer holds (an optimizer restored
    # to another history in this process reports the steps of the one it
    # left in its own dp_events). The offset is fixed when this object first
    # sees the history: the journal then holds only earlier processes' steps.
    for h, cur in seen.items():
      if h not in spent.offsets:
        before = spent.train.get(h, {})
        spent.offsets[h] = {
            ek: count - base[h].get(ek, 0) for ek, count in before.items()
            if count > base[h].get(ek, 0)}
      merged = dict(cur)
      for ek, count in spent.offsets[h].items():
        out.append((_event_from_json(json.loads(ek)), count))
        merged[ek] = merged.get(ek, 0) + count
      old = spent.train.get(h, {})
      spent.train[h] = {ek: max(merged.get(ek, 0), old.get(ek, 0))
                        for ek in set(merged) | set(old)}
    self._note_optimizer_seeds()
    self._sync_journal()
    return out

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
      out.extend(self._optimizer_events())
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

    * The attached optimizers' steps are composed as they were recorded:
      the owned step records the q of the library's own unseeded sampler
      only when the batch's seal proves it (any ledger ``sampling_method``),
      every other batch (arrays, transformed or SEEDED samplers) at q = 1.
      `extra_train` (projections of the next steps) is taken the same way.
    * Training events recorded by hand (``record(kind="train")``, e.g. a
      plan): amplified when the ledger is POISSON with an unseeded sampler;
      each one unamplified when the sampler was seeded; for SHUFFLED, the
      bound with each example once per epoch (``epsilon_without_amplification``
      of those events).
    * Analysis releases: without their amplification when the estimator was
      seeded.

    This is the figure ``PrivacyCallback`` and ``DPQuantScheduler`` log as
    ``epsilon`` and budgets are checked with.

    Args:
      delta: target delta.
      extra_train: training (event, count) pairs to project (not recorded).
      extra_analysis: analysis releases to project (not recorded).
    """
    delta = self.check_delta(delta)
    events = (self._optimizer_events() +
              _accounting.as_event_counts(extra_train))
    recorded = [(_event_from_json(json.loads(item["key"])), item["count"])
                for item in self._load() if item["kind"] == "train"]
    if recorded:
      if self.proves_amplification():
        events += recorded
      elif self.sampling_method is SamplingMethod.POISSON:
        events += [(_unamplified(e), c) for e, c in recorded]
      else:
        steps = sum(c for _, c in recorded)
        epochs = sum(c * getattr(e, "sampling_probability", 1.0)
                     for e, c in recorded)
        z = min(float(getattr(getattr(e, "event", e), "noise_multiplier",
                              float("nan"))) for e, _ in recorded)
        if steps:
          events.append((_events.gaussian_event(z),
                         max(1, math.ceil(epochs - 1e-9))))
    events += self._analysis_events(extra_analysis)
    return _accounting.compose_epsilon(events, delta, self.accountant)

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
    algorithms = sorted({_ALGORITHMS.get(type(o).__name__, "DP-SGD")
                         for o in self._attached.optimizers}) or ["DP-SGD"]
    paras = [textwrap.fill(
        f"{' and '.join(algorithms)} (dpquant_tf) performed over {n_text}, "
        f"noise multiplier "
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
    sealed = any(getattr(e, "sampling_probability", 1.0) < 1.0
                 for e, _ in self._optimizer_events())
    if sealed:
      note = ("(*) Steps at a rate below 1 took batches of the library's own "
              "unseeded Poisson sampler, consumed as drawn (their seals prove "
              "it); every other step (rate 1) may hold every record. The "
              "guarantee stated composes the steps as recorded.")
    elif self.proves_amplification():
      note = ("(*) Batches were Poisson sampled (each example included "
              "independently with the stated rate), so this is the "
              "guarantee of the run.")
    elif self.sampling_method is SamplingMethod.POISSON:
      note = ("(*) Batches were Poisson sampled by a SEEDED sampler: anyone "
              "who knows the seed knows every batch, so amplification by "
              "sampling is not a guarantee; its steps are accounted at rate "
              "1.")
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
    if self.journal_path is None:
      paras.append(textwrap.fill(
          "Restores: restoring an older checkpoint in this process never "
          "lowers the spent budget. No privacy journal was kept "
          "(journal_path): a NEW process that restores an older checkpoint "
          "sees only what that checkpoint holds, not the steps and releases "
          "of later checkpoints.", width=80))
    else:
      paras.append(textwrap.fill(
          f"Restores: the spent budget's high-water mark is kept in the "
          f"privacy journal {self.journal_path}; restoring an older "
          "checkpoint, also in a new process, never lowers it. Not seen: "
          "checkpoints copied elsewhere without the journal, a deleted or "
          "replaced journal, and steps taken after the last save or query "
          "by a process that died.", width=80))
    paras.append(textwrap.fill(
        f"The guarantee stated is {self.proven_epsilon(delta):.3f} at "
        f"delta = {delta}.", width=80))
    return "\n\n".join(paras) + "\n"

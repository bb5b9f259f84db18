"""What a report is built from, read from the records memtune writes, as pandas tables.

A report joins up to three records, found by their content rather than their file names:

* a plan result (``memtune plan --json``): ``chosen``, ``estimate``, ``candidates``, ``llama_cookbook_default``,
  ``data``;
* a validation record (``validation.json``, ``ValidationRecord.to_json``): ``mode``, ``estimate``, ``ranks``, and a
  CUDA memory snapshot when ``validate --snapshot`` recorded one;
* a run folder (``memtune launch``): ``run.json``, ``metrics.jsonl``, and ``plan.json`` / ``validation.json`` when
  they are there.

Everything here is reading and arithmetic on bytes; formatting happens in ``memtune.report.html``. What memtune
computes for a report but the records may lack - the estimated memory timeline, the plan's exports to other tools
(``memtune.records``) - is filled in by ``memtune.reporting.annotate`` before the report is drawn; nothing here
estimates.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from memtune.errors import ConfigError, MemtuneError
from memtune.estimate.categories import ALLOCATED_CATEGORIES, MemCategory, Phase
from memtune.records import EstimatedTimeline, Export, bucket_max, metric_rows

RUN_FILES = ("run.json", "plan.json", "validation.json")
CHART_TOP = 12
"""Candidates in the chart (the cheapest, as in the terminal's plan table); the table lists them all."""


@dataclass(kw_only=True)
class Sources:
    """The records one report is built from (any of them may be missing, not all)."""

    origin: str
    """What the report was built from, as the user named it."""
    plan_result: dict | None = None
    validation: dict | None = None
    run: dict | None = None
    metrics: list[dict] = field(default_factory=list)
    base: Path | None = None
    """Folder the records came from: relative paths (a snapshot) are looked up there."""
    estimated_timeline: EstimatedTimeline | None = None
    """The report's plan's estimated memory timeline (``memtune.reporting.annotate``)."""
    exports: list[Export] = field(default_factory=list)
    """The report's plan in other tools' words (``memtune.reporting.annotate``)."""

    @property
    def has_snapshot(self) -> bool:
        """A CUDA memory snapshot will be drawn as the timeline."""
        return find_snapshot(self) is not None

    @property
    def kind(self) -> str:
        return "run" if self.run else "validation" if self.validation else "plan"

    @property
    def estimate(self) -> dict | None:
        """The estimate of the plan the report is about (the run's, the validated one, or the chosen one)."""
        for record in (self.run, self.validation, self.plan_result):
            if record and record.get("estimate"):
                return normalized_estimate(record["estimate"])
        return None

    @property
    def plan(self) -> dict | None:
        """The plan the report is about, as a ``Plan.to_dict()`` mapping."""
        if self.run and isinstance(self.run.get("plan"), dict):
            return self.run["plan"]
        if self.validation:
            return self.validation.get("plan")
        if self.plan_result:
            miss = self.plan_result.get("closest_miss") or {}
            return self.plan_result.get("chosen") or miss.get("plan")
        return None

    @property
    def model(self) -> str:
        return self._name("model")

    @property
    def model_path(self) -> str:
        """Where the model's config is: a run records the path it resolved (its ``model`` may be relative to the
        plan file)."""
        return str(self.run["model_path"]) if self.run and self.run.get("model_path") else self.model

    @property
    def gpu(self) -> str:
        return self._name("gpu")

    def _name(self, key: str) -> str:
        """The model's or GPU's name from whichever record has it (a plan result where nothing fits names them
        only at its top level, when at all)."""
        for record in (self.run, self.validation, self.plan_result, self.estimate):
            if record and record.get(key):
                return str(record[key])
        return f"unknown {'model' if key == 'model' else 'GPU'}"


def normalized_estimate(est: dict) -> dict:
    """An estimate object with the fields older records lack filled in from the ones they have (records made
    before the verdict had three values say only ``fits``)."""
    out = dict(est)
    out.setdefault("verdict", "fits" if est.get("fits") else "does not fit")
    out.setdefault("verdict_reason", "")
    out.setdefault("gpu_reserved_bytes", None)
    out.setdefault("calibration", None)
    return out


# --- reading the records --------------------------------------------------------------------------------------

def is_plan_result(d) -> bool:
    return isinstance(d, dict) and isinstance(d.get("candidates"), list) and "chosen" in d


def is_validation(d) -> bool:
    return isinstance(d, dict) and "mode" in d and isinstance(d.get("ranks"), list) and "estimate" in d


def is_run(d) -> bool:
    return isinstance(d, dict) and "plans_tried" in d and "status" in d


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds no JSON object: expected a plan result, a validation record or run.json")
    for key in ("estimate", "plan"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise ConfigError(f"{path}: {key!r} must be a JSON object, not {data[key]!r}"[:300])
    return data


def read_metrics(path: Path) -> list[dict]:
    """The rows of ``metrics.jsonl`` (``memtune.records.metric_rows``: a torn or damaged line is skipped)."""
    return [row for _, row in metric_rows(path)]


def load_sources(source: Path | str) -> Sources:
    """Find what ``source`` is - a run folder, a folder with plan.json and/or validation.json, a plan result or a
    validation record (run.json names its folder) - and read it.

    Raises:
        ConfigError: a missing path, or one that holds none of these records.
    """
    path = Path(source)
    if not path.exists():
        raise ConfigError(f"no such file or folder: {path}")
    if path.is_file():
        data = _read_json(path)
        if is_run(data):
            return load_sources(path.parent)
        if is_plan_result(data):
            return Sources(origin=str(path), plan_result=data, base=path.parent)
        if is_validation(data):
            return Sources(origin=str(path), validation=data, base=path.parent)
        raise ConfigError(f"{path} is not a plan result (`memtune plan --json`), a validation record "
                          f"(validation.json) or a run's run.json")
    found = {name: _read_json(path / name) for name in RUN_FILES if (path / name).is_file()}
    if not found:
        raise ConfigError(f"{path} has none of {', '.join(RUN_FILES)}: pass a run folder, a plan result or a "
                          f"validation record")
    checks = {"run.json": is_run, "plan.json": is_plan_result, "validation.json": is_validation}
    for name, data in found.items():
        if not checks[name](data):
            raise ConfigError(f"{path / name} does not look like a {name.split('.')[0]} record")
    return Sources(origin=str(path), run=found.get("run.json"), plan_result=found.get("plan.json"),
                   validation=found.get("validation.json"), metrics=read_metrics(path / "metrics.jsonl"), base=path)


# --- specs, when they can be resolved here -----------------------------------------------------------------------

def resolve_gpu(name: str):
    """The GPU profile of that name, or None (a record from a GPU this table does not know)."""
    from memtune.specs import resolve_gpu as resolve

    try:
        return resolve(name)
    except MemtuneError:
        return None


def resolve_model(name: str):
    """The ModelSpec of that name, or None when it cannot be found on this machine."""
    from memtune.specs import resolve_model as resolve

    try:
        return resolve(name)
    except (MemtuneError, ValueError, OSError):  # a Hub-style name that is not a valid repo id is a ValueError
        return None


def plan_of(d: dict | None):
    """A ``Plan`` from its mapping, or None when it is missing or from another version of memtune."""
    from memtune.plan import Plan

    if not isinstance(d, dict):
        return None
    try:
        return Plan.from_dict(d)
    except (MemtuneError, TypeError):
        return None


# --- tables ------------------------------------------------------------------------------------------------------

def category_name(category: str) -> str:
    """A category or phase as the terminal tables write it (``optimizer_states`` -> ``optimizer states``)."""
    return str(category).replace("_", " ")


def breakdown_frame(estimate: dict) -> pd.DataFrame:
    """Allocated bytes by category (rows) at each phase's peak (columns), with an ``allocated`` total row; the
    categories that are zero in every phase are left out, as in ``memtune estimate``."""
    phases = estimate["phase_components"]
    rows = {}
    for cat in ALLOCATED_CATEGORIES:
        values = [phases.get(p.value, {}).get(cat.value, 0) for p in Phase]
        if any(values):
            rows[cat.value] = values
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=[p.value for p in Phase])
    frame.loc["allocated"] = [estimate["phases"].get(p.value, 0) for p in Phase]
    return frame


def candidates_frame(result: dict) -> pd.DataFrame:
    """One row per candidate of a plan result, cheapest first (the most estimated tokens/s per GPU, then the most
    headroom; those that cannot run last): a unique display label, micro-batch split, verdict, bytes needed,
    headroom, estimated tokens/s, how it was estimated, the reason, and whether it is the chosen plan. The index
    is the candidate's position in the result."""
    rows = []
    for i, c in enumerate(result["candidates"]):
        plan = c.get("plan") or {}
        rows.append({
            "position": i,
            "label": c["label"],
            "precision": plan.get("precision", ""),
            "split": f"{plan.get('batch_size', 1)} x {plan.get('grad_accum', 1)}",
            "verdict": c["verdict"] if c.get("verdict") != "invalid" else "cannot run",
            "fits": bool(c.get("fits")),
            "required_bytes": c.get("required_bytes"),
            "headroom_bytes": c.get("headroom_bytes"),
            "tokens_per_s": c.get("estimated_tokens_per_s"),
            "method": {"trace": "traced", "screen": "screened"}.get(c.get("method") or "", c.get("method") or ""),
            "reason": c.get("reason", ""),
            "chosen": result.get("chosen") is not None and plan == result["chosen"],
        })
    frame = pd.DataFrame(rows, columns=["position", "label", "precision", "split", "verdict", "fits",
                                        "required_bytes", "headroom_bytes", "tokens_per_s", "method", "reason",
                                        "chosen"]).set_index("position")
    frame["display"] = _unique_labels(frame)
    keys = pd.DataFrame([_rank(c) for c in result["candidates"]], index=frame.index)
    return frame.loc[keys.sort_values(list(keys.columns), kind="stable").index]


def _rank(candidate: dict) -> tuple:
    """The planner's order, as the record keeps it (``rank``; those it could not estimate last); a record made
    before it kept one: the most estimated tokens/s per GPU, then the most headroom."""
    if "rank" in candidate:
        return (candidate["rank"] is None, candidate["rank"] or 0, 0)
    speed = candidate.get("estimated_tokens_per_s")
    return (candidate.get("required_bytes") is None, -float(f"{speed:.4g}") if speed else 0.0,
            -(candidate.get("headroom_bytes") or 0))


def _unique_labels(frame: pd.DataFrame) -> list[str]:
    """The labels, with the precision (then a number) added to those that repeat, so each bar has its own."""
    labels = list(frame["label"])
    counts = pd.Series(labels).value_counts()
    labels = [f"{label}, {p}" if counts[label] > 1 and p else label for label, p in zip(labels, frame["precision"])]
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 and labels.count(label) == 1 else f"{label} #{seen[label]}")
    return out


def charted_candidates(frame: pd.DataFrame, top: int = CHART_TOP) -> pd.DataFrame:
    """The cheapest ``top`` candidates that were estimated (the chosen one always), cheapest first, as the
    terminal's plan table shows them."""
    estimated = frame[frame["required_bytes"].notna()]
    shown = estimated.head(top)
    chosen = estimated[estimated["chosen"]]
    if len(chosen) and chosen.index[0] not in shown.index:
        shown = pd.concat([shown, chosen])
    return shown


def candidate_components(result: dict, shown: pd.DataFrame | None = None) -> tuple[pd.DataFrame, str | None]:
    """Bytes by category of the candidates in ``shown`` (default: ``charted_candidates``), one row each under its
    display label, columns in ``MemCategory`` order (runtime overhead included), and a note naming those that
    could not be split by category.

    A plan result keeps each candidate's split (``components``; records from before it did keep it for the chosen
    plan only, in ``estimate``), used when it gives the recorded total (within 0.5 %), so the chart never disagrees
    with the table. Otherwise the bar shows the total needed, unsplit.
    """
    if shown is None:
        shown = charted_candidates(candidates_frame(result))
    rows, unsplit = {}, []
    for position, row in shown.iterrows():
        c = result["candidates"][position]
        components = next((given for given in (c.get("components"), result.get("estimate") and c.get("plan") ==
                                               result.get("chosen") and result["estimate"]["components"])
                           if given and _adds_up(given, c["required_bytes"])), None)
        if components is None:
            components = {"needed (not split)": c["required_bytes"]}
            unsplit.append(row["display"])
        rows[row["display"]] = components
    frame = pd.DataFrame.from_dict(rows, orient="index").fillna(0).astype("int64")
    order = [c.value for c in MemCategory if c.value in frame.columns]
    frame = frame[order + [c for c in frame.columns if c not in order]]
    note = None
    if unsplit:
        note = f"not split by category (the record keeps only the total): {', '.join(unsplit)}"
    return frame, note


def _adds_up(components: dict, total: int) -> bool:
    return abs(sum(components.values()) - total) <= 0.005 * total


def validation_phases_frame(record: dict) -> pd.DataFrame | None:
    """Estimated and measured peak allocated bytes per phase, and peak reserved (largest rank), with the error
    (estimated / measured - 1); None for a dry run or an out-of-memory record."""
    if record.get("mode") == "dry-run" or record.get("oom"):
        return None
    ranks = record["ranks"]
    est = record["estimate"]
    rows = []
    for phase in Phase:
        measured = max((r.get("measured_phases") or {}).get(phase.value, 0) for r in ranks)
        rows.append({"what": category_name(phase.value), "estimated": est["phases"][phase.value],
                     "measured": measured})
    rows.append({"what": "reserved", "estimated": record["estimated_peak_reserved_bytes"],
                 "measured": record["measured_peak_reserved_bytes"]})
    frame = pd.DataFrame(rows)
    frame["error"] = [e / m - 1 if m else None for e, m in zip(frame["estimated"], frame["measured"])]
    return frame


def validation_categories_frame(record: dict) -> pd.DataFrame | None:
    """Estimated and measured parameters, gradients and optimizer states at the start of each phase (what the
    probe can tell apart on the GPU; rank 0), and the rest of each phase's peak (activations, logits, temporaries,
    workspaces)."""
    if record.get("mode") == "dry-run" or record.get("oom"):
        return None
    rank = record["ranks"][0]
    measured_cats = rank.get("measured_categories") or {}
    phases = rank.get("measured_phases") or {}
    est = record["estimate"]["phase_components"]
    separable = (MemCategory.PARAMETERS, MemCategory.GRADIENTS, MemCategory.OPTIMIZER_STATES)
    rows = []
    for phase in Phase:
        m_cats, e_cats = measured_cats.get(phase.value) or {}, est.get(phase.value) or {}
        for cat in separable:
            rows.append({"phase": phase.value, "category": cat.value, "estimated": e_cats.get(cat.value, 0),
                         "measured": m_cats.get(cat.value, 0)})
        if phases.get(phase.value):
            rest = "everything else"
            rows.append({"phase": phase.value, "category": rest,
                         "estimated": sum(e_cats.values()) - sum(e_cats.get(c.value, 0) for c in separable),
                         "measured": phases[phase.value] - sum(m_cats.get(c.value, 0) for c in separable)})
    return pd.DataFrame(rows)


def metrics_frames(rows: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training rows, evaluation rows) of ``metrics.jsonl``, sorted by step; memory columns are NaN where the
    run measured none (on the CPU)."""
    train_cols = ["step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "step_time_s",
                  "peak_allocated_bytes", "peak_reserved_bytes"]
    train = pd.DataFrame([r for r in rows if "loss" in r and "step" in r], columns=train_cols)
    evals = pd.DataFrame([r for r in rows if "eval_loss" in r and "step" in r], columns=["step", "eval_loss"])
    for frame in (train, evals):
        for col in frame.columns:
            frame[col] = pd.to_numeric(frame[col], errors="coerce")
    return train.sort_values("step", ignore_index=True), evals.sort_values("step", ignore_index=True)


def plans_tried_frame(run: dict) -> pd.DataFrame:
    """The plans a run tried, in order, with how each ended and at which step."""
    rows = []
    for t in run.get("plans_tried") or []:
        rows.append({"plan": t.get("plan"), "outcome": t.get("outcome", ""), "at_step": t.get("at_step")})
    return pd.DataFrame(rows, columns=["plan", "outcome", "at_step"])


# --- memory timelines --------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Timeline:
    frame: pd.DataFrame
    """Columns ``x``, ``allocated`` and ``reserved`` (bytes); the highest point of each bucket of events."""
    source: str
    """``snapshot`` (measured by PyTorch) or ``estimate`` (memtune's trace replayed)."""
    x_label: str
    limit_bytes: int | None
    """What PyTorch's pool may use on the card (the emulated cap, or the usable memory less the runtime and the
    margin)."""
    limit_label: str
    notes: tuple[str, ...] = ()


class _PlainData(pickle.Unpickler):
    """Unpickles plain data only (dicts, lists, numbers, strings): a memory snapshot needs nothing else, and a
    report should not run code from a file it was pointed at."""

    SAFE = {("builtins", n) for n in ("set", "frozenset", "tuple", "list", "dict", "int", "float", "str", "bytes",
                                      "bool", "complex")} | {("collections", "OrderedDict")}

    def find_class(self, module, name):
        if (module, name) in self.SAFE:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"a memory snapshot holds plain data only, not {module}.{name}")


def read_snapshot(path: Path) -> dict:
    """A CUDA memory snapshot (``torch.cuda.memory._dump_snapshot``) as plain data.

    Raises:
        ConfigError: unreadable, not a snapshot, or not plain data.
    """
    try:
        with open(path, "rb") as f:
            data = _PlainData(f).load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise ConfigError(f"cannot read the memory snapshot {path}: {e}") from None
    if not isinstance(data, dict) or "device_traces" not in data or "segments" not in data:
        raise ConfigError(f"{path} is not a CUDA memory snapshot (no segments and device_traces)")
    return data


def snapshot_timeline_frame(snapshot: dict) -> pd.DataFrame:
    """Allocated and reserved bytes after every event of the device trace with the most events.

    The trace is a ring buffer that may begin after the first allocations, so the walk goes backwards from the
    state the snapshot ends in (its segments and their allocated blocks) and undoes each event: ``alloc`` and
    ``free_completed`` change allocated bytes, ``segment_alloc``/``segment_map`` and ``segment_free``/
    ``segment_unmap`` reserved bytes (``torch.cuda._memory_viz`` reads it the same way).
    """
    traces = snapshot.get("device_traces") or [[]]
    device = max(range(len(traces)), key=lambda i: len(traces[i]))
    events = traces[device]
    segments = [s for s in snapshot["segments"] if s.get("device", device) == device]
    allocated = sum(b["size"] for s in segments for b in s.get("blocks", []) if b.get("state") != "inactive")
    reserved = sum(s["total_size"] for s in segments)
    alloc_sign = {"alloc": 1, "free_completed": -1}
    seg_sign = {"segment_alloc": 1, "segment_map": 1, "segment_free": -1, "segment_unmap": -1}
    rows = []
    for e in reversed(events):
        rows.append((e.get("time_us", 0), allocated, reserved))
        allocated -= alloc_sign.get(e["action"], 0) * e.get("size", 0)
        reserved -= seg_sign.get(e["action"], 0) * e.get("size", 0)
    rows.reverse()
    frame = pd.DataFrame(rows, columns=["time_us", "allocated", "reserved"])
    start = frame["time_us"].min() if len(frame) else 0
    frame["x"] = (frame["time_us"] - start) / 1000.0
    return _bucket_max(frame[["x", "allocated", "reserved"]])


def _bucket_max(frame: pd.DataFrame) -> pd.DataFrame:
    """At most ``memtune.records.MAX_TIMELINE_POINTS`` rows (``bucket_max``), so the SVG stays small."""
    x, allocated, reserved = bucket_max(frame["x"].tolist(), frame["allocated"].tolist(), frame["reserved"].tolist())
    return pd.DataFrame({"x": x, "allocated": allocated, "reserved": reserved})


def find_snapshot(sources: Sources) -> Path | None:
    """The snapshot a validation record names, as recorded or next to the record."""
    name = (sources.validation or {}).get("snapshot")
    if not name:
        return None
    path = Path(name)
    for candidate in (path, (sources.base or Path(".")) / path.name):
        if candidate.is_file():
            return candidate
    return None


def timeline(sources: Sources) -> Timeline | None:
    """The memory timeline of the report's plan: measured, from the validation's CUDA snapshot, or else estimated
    (``sources.estimated_timeline``)."""
    est = sources.estimate
    limit = label = None
    if est:
        limit = est["device_usable_bytes"] - est["runtime_overhead_bytes"] - est["margin_bytes"]
        label = "left to PyTorch on the card (less CUDA context/NCCL and the margin)"
    cap = (sources.validation or {}).get("memory_cap_bytes")
    if cap:
        limit, label = cap, f"emulation cap ({sources.gpu} less the CUDA context)"
    path = find_snapshot(sources)
    if path is not None:
        frame = snapshot_timeline_frame(read_snapshot(path))
        return Timeline(frame=frame, source="snapshot", x_label="time (ms)", limit_bytes=limit, limit_label=label,
                        notes=(f"measured by PyTorch over the validated steps ({path.name})",))
    t = sources.estimated_timeline
    if t is None:
        return None
    frame = pd.DataFrame({"x": t.x, "allocated": t.allocated, "reserved": t.reserved})
    notes = ["estimated: memtune's trace of the step on fake tensors, replayed through its model of the caching "
             "allocator (no snapshot was recorded; `memtune validate --snapshot` records one on a GPU)"]
    if est and abs(t.peak_allocated - est["peak_allocated_bytes"]) > 0.01 * est["peak_allocated_bytes"]:
        notes.append("this replay comes from the current estimator, whose peak differs from the recorded estimate "
                     "by more than 1 %")
    return Timeline(frame=frame, source="estimate", x_label="allocation events (warm-up step, then the estimated step)",
                    limit_bytes=limit, limit_label=label, notes=tuple(notes))

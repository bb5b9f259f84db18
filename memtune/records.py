"""What one stage hands the next, as it is written to disk: the parts of a record the report reads and no stage
recomputes.

A plan result (``memtune plan --json``, a run's ``plan.json``), a validation record (``validation.json``) and a
run's ``run.json`` are JSON objects; each carries ``schema`` (``SCHEMA_VERSION``). A validation record also
carries ``estimated_timeline``: allocated and reserved bytes after every allocation and free of the plan's traced
step, replayed through the caching-allocator model (``EstimatedTimeline``).

``memtune.report`` draws from these and never estimates: ``memtune.reporting`` gives it the plan's exports to
other tools (``Export``) and, for a record without one, the estimated timeline, when the report is made on a
machine that can compute them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

SCHEMA_VERSION = 2
"""1: records before ``schema`` was written; 2: ``ranks`` as ``StepMeasurement``, a validation's
``estimated_timeline``."""

MAX_TIMELINE_POINTS = 1500
"""A timeline keeps at most this many points (each the highest of its bucket of events), so its SVG stays small."""


class ValidationMode(StrEnum):
    GPU = "gpu"
    """Measured on the target GPU itself."""
    EMULATED = "emulated"
    """Measured on a larger GPU capped to the target's memory."""
    DRY_RUN = "dry-run"
    """Traced on fake tensors on the CPU: nothing measured."""


@dataclass(frozen=True, kw_only=True, slots=True)
class EstimatedTimeline:
    """Memory over the traced step (a warm-up step, which creates the optimizer states, then the estimated step)."""

    x: tuple[int, ...]
    """Allocation event index of each point."""
    allocated: tuple[int, ...]
    reserved: tuple[int, ...]
    peak_allocated: int
    peak_reserved: int

    def to_json(self) -> dict:
        return {"x": list(self.x), "allocated": list(self.allocated), "reserved": list(self.reserved),
                "peak_allocated": self.peak_allocated, "peak_reserved": self.peak_reserved}

    @classmethod
    def from_json(cls, d: dict | None) -> EstimatedTimeline | None:
        """None for a record without one or with a malformed one."""
        try:
            return cls(x=tuple(int(v) for v in d["x"]), allocated=tuple(int(v) for v in d["allocated"]),
                       reserved=tuple(int(v) for v in d["reserved"]), peak_allocated=int(d["peak_allocated"]),
                       peak_reserved=int(d["peak_reserved"]))
        except (TypeError, KeyError, ValueError):
            return None


@dataclass(frozen=True, kw_only=True, slots=True)
class Export:
    """The plan in another tool's words."""

    title: str
    text: str
    """The command or settings; or why the tool cannot express the plan (``lang`` ``note``)."""
    lang: str
    """``shell``, ``json`` or ``note``."""

    def to_json(self) -> dict:
        return {"title": self.title, "text": self.text, "lang": self.lang}


def bucket_max(x: list, allocated: list[int], reserved: list[int],
               points: int = MAX_TIMELINE_POINTS) -> tuple[list, list[int], list[int]]:
    """At most ``points`` points: each bucket of consecutive events (event i in bucket ``i * points // n``) keeps
    its first x and its largest allocated and reserved bytes, so no peak is lost."""
    n = len(x)
    if n <= points:
        return list(x), list(allocated), list(reserved)
    out_x, out_a, out_r = [], [], []
    for b in range(points):
        lo, hi = -(-b * n // points), -(-(b + 1) * n // points)
        if hi > lo:
            out_x.append(x[lo])
            out_a.append(max(allocated[lo:hi]))
            out_r.append(max(reserved[lo:hi]))
    return out_x, out_a, out_r


@dataclass(frozen=True, kw_only=True, slots=True)
class StepMeasurement:
    """One rank's measured training steps (``memtune.validate.probe.measure_plan``: one warm-up step, then
    ``steps`` timed ones), as a validation record keeps it under ``ranks``. Memory fields are None off CUDA; an
    out-of-memory run has ``error`` ``oom`` and the high-water marks it reached."""

    device: str = ""
    weights: str = ""
    """``random init``, or the folder the weights were loaded from."""
    steps: int = 0
    error: str | None = None
    message: str | None = None
    step_time_s: float | None = None
    host_enqueue_s: float | None = None
    """The host's time to issue a step: close to ``step_time_s`` when the host, not the GPU, sets the pace."""
    tokens_per_s: float | None = None
    phase_times_s: dict[str, float] | None = None
    warmup_loss: float | None = None
    losses: tuple[float, ...] = ()
    measured_peak_allocated_bytes: int | None = None
    measured_peak_reserved_bytes: int | None = None
    measured_peak_active_bytes: int | None = None
    measured_phases: dict[str, int] | None = None
    """Peak allocated bytes per phase."""
    measured_categories: dict[str, dict[str, int]] | None = None
    """Parameters, gradients and optimizer states at the start of each phase."""
    measured_steady_bytes: int | None = None
    num_alloc_retries: int | None = None
    num_ooms: int | None = None
    nvml_used_bytes: int | None = None
    reserved_at_nvml_read_bytes: int | None = None
    extra: dict | None = None
    """What else a rank reported (a dry run's traced phases and world size)."""

    @property
    def oom(self) -> bool:
        return self.error == "oom"

    def to_json(self) -> dict:
        out = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "extra"}
        out["losses"] = list(self.losses)
        return {**{k: v for k, v in out.items() if v is not None and v != []}, **(self.extra or {})}

    @classmethod
    def from_json(cls, d: dict) -> StepMeasurement:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__ and k != "extra"}
        if "losses" in known:
            known["losses"] = tuple(known["losses"])
        extra = {k: v for k, v in d.items() if k not in cls.__dataclass_fields__}
        return cls(**known, extra=extra or None)


def metric_rows(path: Path) -> list[tuple[str, dict]]:
    """The rows of a run's metrics file (``metrics.jsonl``) with their lines; a line that is not a JSON object with a
    whole ``step`` (a torn last line from a killed run, or a damaged file) is left out, and no file has no rows."""
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and not isinstance(row["step"], bool):
            rows.append((line, row))
    return rows

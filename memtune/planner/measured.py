"""Step times memtune measured itself, kept per GPU model, and what they teach the planner.

``memtune tune`` runs a few real training steps of its best candidates on the GPU it plans for; each such
measurement is appended here. The planner then uses them two ways (``apply``):

* a plan measured on that GPU gets the measured speed instead of the time model's guess;
* every other plan's estimated step time is multiplied by ``correction(gpu)``, the median of measured / estimated
  step time over the plans measured there, so a GPU the time model misjudges is judged better next time.

Both scale the time model's estimate by a measured ratio rather than replacing it outright: a validation runs
full-length batches of random tokens, while the planner's cost describes the run's own data (length-grouped padded
batches are shorter on average, and only their real tokens count). For packed data the two are the same, and the
planner's figure for a measured plan is the measurement itself.

The store lives next to the trace cache: ``$MEMTUNE_CACHE/measured/`` (default ``~/.cache/memtune/measured/``), one
JSON-lines file per GPU. Lines that cannot be read (a crash mid-write, a file edited by hand, a plan field that no
longer exists) are skipped; a store that cannot be written is reported by ``record`` returning False, never by an
exception, since losing a measurement must not stop a fine-tune.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import statistics
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from memtune.errors import ConfigError, MemtuneError
from memtune.plan import Plan

if TYPE_CHECKING:  # named for readers and type checkers only: the planner itself calls into this module
    from memtune.planner import PlanResult
    from memtune.planner.cost import CostEstimate
    from memtune.specs.gpu import GpuSpec
    from memtune.specs.model import ModelSpec
    from memtune.validate.run import ValidationRecord

MIN_CORRECTION = 0.5
MAX_CORRECTION = 2.0
"""``correction`` stays within these bounds: a time model off by more than a factor of two on a GPU points at a
broken measurement (another job on the card, a throttled clock) more likely than at the model."""


@dataclass(frozen=True, kw_only=True)
class Measurement:
    """The measured speed of one plan of one model on one GPU model, next to what the time model expected.

    Both step times are for the batches validation runs: ``batch_size`` full sequences of ``seq_len`` tokens,
    ``grad_accum`` micro-batches per optimizer step, per GPU (the slowest rank under FSDP).
    """

    gpu: str
    """The GPU profile's name (``GpuSpec.name``), e.g. ``H200-141GB``."""
    model: str
    """The model's name (``ModelSpec.name``)."""
    plan: dict
    """The plan, as ``Plan.to_dict()``."""
    step_time_s: float
    """Measured seconds per optimizer step."""
    tokens_per_s: float
    """Measured tokens per second per GPU (every token of the full-length batches)."""
    estimated_step_time_s: float
    """The time model's seconds per optimizer step for the same batches (``steptime.estimated_cost`` at the plan's
    shape)."""
    when: str
    """When it was measured (ISO 8601, UTC)."""

    def __post_init__(self) -> None:
        if not isinstance(self.gpu, str) or not self.gpu or not isinstance(self.model, str) or not self.model:
            raise ConfigError("a measurement needs the GPU's and the model's name")
        for name in ("step_time_s", "tokens_per_s", "estimated_step_time_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                    or value <= 0:
                raise ConfigError(f"a measurement's {name} must be a positive number, not {value!r}")
        if not isinstance(self.plan, dict):
            raise ConfigError(f"a measurement's plan must be a table of plan fields, not {self.plan!r}")
        # The plan is kept in its canonical form (every field, defaults included) so equal plans compare equal.
        object.__setattr__(self, "plan", Plan.from_dict(self.plan).to_dict())

    @property
    def ratio(self) -> float:
        """Measured / estimated step time: above 1 when the step ran slower than the time model said."""
        return self.step_time_s / self.estimated_step_time_s

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Measurement:
        """Raises ConfigError (or InvalidPlanError, for a plan field that is not known) for a malformed record."""
        if not isinstance(data, dict):
            raise ConfigError(f"a measurement is a JSON object, not {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - set(data))
        if missing:
            raise ConfigError(f"a measurement lacks {', '.join(missing)}")
        return cls(**{k: data[k] for k in names})


def from_validation(record: ValidationRecord, spec: ModelSpec, gpu: GpuSpec) -> Measurement | None:
    """The measurement in a validation record of ``spec`` on ``gpu``, or None when the record measured no speed of
    that GPU: a dry run, a run capped to emulate another card, or one that ran out of memory.

    The step time is the slowest rank's (FSDP ranks wait for each other); tokens/s follows from it.
    """
    from memtune.planner.steptime import estimated_cost

    if record.mode != "gpu" or record.oom:
        return None
    times = [r.step_time_s for r in record.ranks]
    if not times or any(not isinstance(t, int | float) or t <= 0 for t in times):
        return None
    plan = record.plan
    step_time = max(times)
    tokens = plan.batch_size * plan.seq_len * plan.grad_accum
    return Measurement(gpu=gpu.name, model=spec.name, plan=plan.to_dict(), step_time_s=step_time,
                       tokens_per_s=tokens / step_time,
                       estimated_step_time_s=estimated_cost(spec, plan, gpu).step_time_s,
                       when=datetime.now(UTC).isoformat(timespec="seconds"))


# --- the store ---------------------------------------------------------------------------------------------

def store_dir() -> Path:
    """``measured/`` under memtune's cache folder (``$MEMTUNE_CACHE``, default ``~/.cache/memtune``), next to
    the trace cache."""
    from memtune.profiles import cache_root

    return cache_root() / "measured"


def store_file(gpu: str) -> Path:
    """The file of one GPU's measurements: its name with every character other than letters, digits, ``.``,
    ``_`` and ``-`` replaced by ``_`` (names that collide that way share a file; each record keeps its GPU)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", gpu).strip(".") or "_"
    return store_dir() / f"{safe}.jsonl"


def record(measurement: Measurement) -> bool:
    """Append ``measurement`` to its GPU's file. Returns False, without raising, when the store cannot be written
    (a read-only home, a full disk): the caller decides whether to say so."""
    path = store_file(measurement.gpu)
    line = json.dumps(measurement.to_json(), sort_keys=True) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a+b") as f:
            # A line cut short by a crash stays malformed on its own rather than swallowing this one.
            if f.tell() > 0:
                f.seek(-1, 2)
                if f.read(1) != b"\n":
                    line = "\n" + line
            f.write(line.encode())
    except OSError:
        return False
    return True


def measurements(gpu: str) -> list[Measurement]:
    """Every readable measurement of ``gpu``, oldest first (the order they were recorded in)."""
    try:
        text = store_file(gpu).read_text(encoding="utf-8", errors="replace")
    except OSError:  # no file yet, or one that cannot be read: nothing measured
        return []
    found = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            m = Measurement.from_json(json.loads(line))
        except (ValueError, TypeError, MemtuneError):
            continue
        if m.gpu == gpu:
            found.append(m)
    return found


def same_model(a: str | None, b: str | None) -> bool:
    """Whether two model names are one model: equal, or paths to the same folder or ``config.json`` (``tune`` names
    a run file's model by its absolute path, ``plan --model`` by the path as given)."""
    if a is None or b is None:
        return False
    if a == b:
        return True
    try:
        pa, pb = Path(a).expanduser(), Path(b).expanduser()
        return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
    except OSError:
        return False


def lookup(gpu: str, model: str, plan: Plan) -> Measurement | None:
    """The latest measurement of exactly this plan of ``model`` on ``gpu``, or None."""
    wanted = plan.to_dict()
    return next((m for m in reversed(measurements(gpu)) if same_model(m.model, model) and m.plan == wanted), None)


def correction(gpu: str) -> float:
    """The factor ``plan`` applies to this GPU's estimated step times: the median of measured / estimated step time
    over the plans measured on it (the latest measurement of each model and plan, so one plan measured often does
    not outvote the rest), within ``MIN_CORRECTION`` .. ``MAX_CORRECTION``; 1.0 when nothing was measured."""
    latest = {}
    for m in measurements(gpu):
        latest[(m.model, json.dumps(m.plan, sort_keys=True))] = m
    if not latest:
        return 1.0
    return min(MAX_CORRECTION, max(MIN_CORRECTION, statistics.median(m.ratio for m in latest.values())))


# --- what the planner does with them -----------------------------------------------------------------------

def scaled(cost: CostEstimate, factor: float) -> CostEstimate:
    """``cost`` with its step taking ``factor`` times as long: tokens/s divided by it, every
    other figure (the compute and communication split, utilization) as the time model gave it."""
    return dataclasses.replace(cost, step_time_s=cost.step_time_s * factor, tokens_per_s=cost.tokens_per_s / factor)


def apply(result: PlanResult, gpu: str) -> PlanResult:
    """The planner's ``result`` with what was measured on ``gpu``: each candidate whose exact plan
    was measured is marked (``Candidate.measured``) and its cost scaled by that measurement's measured / estimated
    ratio; every other costed candidate's cost is scaled by ``correction(gpu)``.

    The chosen candidate stays the chosen one (the same plan; the planner's ranking decides which): only the
    figures change. Apply it once, to the planner's own estimates - a second pass would scale them again.
    """
    factor = correction(gpu)
    found = measurements(gpu)
    by_plan = {}
    for m in found:  # later lines overwrite earlier ones: the latest measurement of each plan wins
        if same_model(m.model, result.model):
            by_plan[json.dumps(m.plan, sort_keys=True)] = m

    def updated(c):
        if c.cost is None:
            return c
        m = by_plan.get(json.dumps(c.plan.to_dict(), sort_keys=True))
        if m is not None:
            return dataclasses.replace(c, measured=m, cost=scaled(c.cost, m.ratio))
        return dataclasses.replace(c, cost=scaled(c.cost, factor))

    new = {id(c): updated(c) for c in result.candidates}
    chosen = result.chosen
    if chosen is not None:
        chosen = new[id(chosen)] if id(chosen) in new else updated(chosen)
    return dataclasses.replace(result, candidates=tuple(new[id(c)] for c in result.candidates), chosen=chosen)

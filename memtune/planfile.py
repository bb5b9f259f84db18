"""Plan files: the run config memtune writes and ``validate``, ``check`` and ``launch`` read (TOML, or the same
keys in JSON).

    model = "llama-guard-3-1b"
    gpu = "L4-24GB"

    [plan]
    precision = "bf16"
    checkpointing = "full"
    ...

    [[fallback]]            # optional, in order: plans to fall back to after an out-of-memory error; a field
    checkpointing = "full"  # left out keeps the main plan's value

    [run]                   # optional: what ``launch`` needs besides the plan (``memtune.runconfig.RunConfig``)
    dataset = "train.jsonl"
    ...
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

from memtune.errors import ConfigError, InvalidPlanError
from memtune.runconfig import RunConfig
from memtune.plan import Plan

_KEYS = ("model", "gpu", "plan", "fallback", "run")


@dataclass(frozen=True, kw_only=True, slots=True)
class PlanFile:
    model: str
    gpu: str
    plan: Plan
    fallbacks: tuple[Plan, ...] = ()
    """Plans to switch to, in order, when the run runs out of memory."""
    run: RunConfig | None = None
    """The ``[run]`` table, if the file has one."""


def read_table_file(path: Path, kind: str) -> dict:
    """The top-level table of a TOML file (or a JSON object); ConfigError for a missing or malformed file, or a
    JSON file that holds something else."""
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {kind} file {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{kind} file {path} holds no JSON object")
    return data


def read_plan_file(path: str | Path) -> PlanFile:
    """Raises ConfigError for a missing or malformed file (InvalidPlanError for bad plan values)."""
    path = Path(path)
    data = read_table_file(path, "plan")
    missing = [k for k in ("model", "gpu", "plan") if k not in data]
    if missing:
        raise ConfigError(f"plan file {path} lacks {', '.join(missing)}; it needs model, gpu and a [plan] table")
    unknown = sorted(set(data) - set(_KEYS))
    if unknown:
        raise ConfigError(f"plan file {path} has unknown key(s) {', '.join(unknown)}; known: {', '.join(_KEYS)}")
    plan = Plan.from_dict(data["plan"])
    tables = data.get("fallback", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"plan file {path}: fallbacks are [[fallback]] tables")
    fallbacks = []
    for i, table in enumerate(tables, 1):
        try:
            fallbacks.append(Plan.from_dict({**plan.to_dict(), **table}))
        except InvalidPlanError as e:
            raise InvalidPlanError([f"fallback {i}: {r}" for r in e.reasons]) from None
    run = RunConfig.from_dict(data["run"]) if "run" in data else None
    return PlanFile(model=model_beside(path, str(data["model"])), gpu=str(data["gpu"]), plan=plan,
                    fallbacks=tuple(fallbacks), run=run)


def model_beside(path: Path, model: str) -> str:
    """A file's ``model``: a path relative to the file's folder where one is there (one rule for ``check``,
    ``validate --plan-file``, ``launch`` and ``tune``), else as written (a profile name, a Hub id, a path from the
    working directory)."""
    beside = path.resolve().parent / model
    return str(beside) if beside.exists() else model


def write_plan_file(path: str | Path, plan_file: PlanFile) -> None:
    lines = [f"model = {toml_value(plan_file.model)}", f"gpu = {toml_value(plan_file.gpu)}", "", "[plan]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in plan_file.plan.to_dict().items()]
    for fallback in plan_file.fallbacks:
        lines += ["", "[[fallback]]"] + [f"{k} = {toml_value(v)}" for k, v in fallback.to_dict().items()]
    if plan_file.run is not None:
        lines += ["", "[run]"] + [f"{k} = {toml_value(v)}" for k, v in plan_file.run.to_dict().items() if v is not None]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")


def check_writable(path: str | Path, option: str = "--out") -> None:
    """Raises ConfigError (one line) where a file cannot be written at ``path`` (its folder is created if
    needed): checked before the work whose result it will hold."""
    import os

    from memtune.errors import ConfigError

    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{option} {path} cannot be written ({e.strerror or e}): choose another path") from None
    if target.is_dir() or not os.access(target.parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise ConfigError(f"{option} {path} cannot be written (a folder, or no permission): choose another path")


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string

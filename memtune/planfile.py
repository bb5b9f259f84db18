"""Plan files: the run config memtune writes and ``validate`` reads (TOML, or the same keys in JSON).

    model = "llama-guard-3-1b"
    gpu = "L4-24GB"

    [plan]
    precision = "bf16"
    checkpointing = "full"
    ...
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

from memtune.errors import ConfigError
from memtune.plan import Plan


@dataclass(frozen=True, kw_only=True, slots=True)
class PlanFile:
    model: str
    gpu: str
    plan: Plan


def read_plan_file(path: str | Path) -> PlanFile:
    """Raises ConfigError for a missing or malformed file (InvalidPlanError for bad plan values)."""
    path = Path(path)
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read plan file {path}: {e}") from None
    missing = [k for k in ("model", "gpu", "plan") if k not in data]
    if missing:
        raise ConfigError(f"plan file {path} lacks {', '.join(missing)}; it needs model, gpu and a [plan] table")
    unknown = sorted(set(data) - {"model", "gpu", "plan"})
    if unknown:
        raise ConfigError(f"plan file {path} has unknown key(s) {', '.join(unknown)}")
    return PlanFile(model=str(data["model"]), gpu=str(data["gpu"]), plan=Plan.from_dict(data["plan"]))


def write_plan_file(path: str | Path, plan_file: PlanFile) -> None:
    lines = [f"model = {_toml(plan_file.model)}", f"gpu = {_toml(plan_file.gpu)}", "", "[plan]"]
    lines += [f"{k} = {_toml(v)}" for k, v in plan_file.plan.to_dict().items()]
    Path(path).write_text("\n".join(lines) + "\n")


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string

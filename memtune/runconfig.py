"""RunConfig: everything about a fine-tune that is not a memory knob (the ``[run]`` table of a plan file).

    [run]
    dataset = "data/toxicchat-mini.jsonl"   # relative paths are relative to the plan file
    format = "llama-guard"
    prompt_field = "user_input"
    label_field = "toxicity"
    eval_split = 0.1
    max_steps = 60
    lr = 1e-3
    warmup_steps = 5
"""

from __future__ import annotations

import math

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from memtune.errors import ConfigError
from memtune.plan import literal_mismatches

Format = Literal["text", "instruction", "llama-guard"]
Schedule = Literal["cosine", "linear", "constant"]
OnOom = Literal["fallback", "stop"]

_PATH_FIELDS = ("dataset", "eval_dataset", "tokenizer", "output_dir")


@dataclass(frozen=True, kw_only=True, slots=True)
class RunConfig:
    dataset: str
    """A local .jsonl, .json, .csv or .parquet file (read with ``datasets``)."""
    format: Format = "text"
    """text: every token of ``text_field`` is a target. instruction: ``prompt_field``, ``separator``, then
    ``response_field``; only the response is a target. llama-guard: ``prompt_field`` inside the Llama Guard 3 prompt;
    the target is the guard's answer, ``safe`` or ``unsafe`` (and a line of categories), from ``label_field``."""
    text_field: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    separator: str = "\n"
    """Between prompt and response (instruction format)."""
    label_field: str = "label"
    """llama-guard: 1/true/"unsafe" for an unsafe prompt, 0/false/"safe" for a safe one."""
    category_field: str | None = None
    """llama-guard: a column with the violated categories of unsafe prompts (e.g. ``S1,S10``)."""
    unsafe_categories: str = ""
    """llama-guard: the categories line for every unsafe prompt when there is no ``category_field`` (empty: the
    answer is ``unsafe`` alone)."""
    train_on_prompt: bool = False
    """Make the prompt tokens targets too (instruction and llama-guard)."""
    tokenizer: str | None = None
    """A local tokenizer folder; default: the model folder."""
    eval_dataset: str | None = None
    """A separate held-out file (same format); otherwise ``eval_split`` of ``dataset`` is held out."""
    eval_split: float = 0.0
    """Share of ``dataset`` held out for evaluation when there is no ``eval_dataset`` (0: no evaluation)."""
    eval_every: int = 0
    """Evaluate every this many steps (0: only at the end)."""
    epochs: int = 1
    max_steps: int | None = None
    """Optimizer steps to run; replaces ``epochs`` (the data repeats as needed)."""
    lr: float = 1e-4
    """Peak learning rate."""
    schedule: Schedule = "cosine"
    """Decay after the warm-up: cosine or linear down to ``min_lr_ratio`` x lr, or constant."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to ``lr``."""
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW) of every trainable parameter."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0: no clipping; the norm is logged either way)."""
    log_every: int = 1
    checkpoint_every: int = 0
    """Save a sharded checkpoint every this many steps (0: only when interrupted and at the end)."""
    keep_checkpoints: int = 2
    """Keep the newest this many checkpoints."""
    seed: int = 0
    """Seeds the random init, LoRA init, dropout and data order."""
    random_init: bool = False
    """Start from a random init of the model's config instead of its weights (which then need not exist)."""
    output_dir: str | None = None
    """Default for ``--output-dir``."""
    on_oom: OnOom = "fallback"
    """fallback: after an out-of-memory error, restart from the last checkpoint with the next plan of the plan file
    (its ``[[fallback]]`` tables, in order). stop: end the run."""

    def __post_init__(self) -> None:
        errors = [f"run {name} must be one of {', '.join(allowed)}, not {value!r}"
                  for name, allowed, value in literal_mismatches(self)]
        if not self.dataset:
            errors.append("run dataset is empty: give a .jsonl, .json, .csv or .parquet file")
        if not 0.0 <= self.eval_split < 1.0:
            errors.append("run eval_split must be in [0, 1)")
        for name in ("epochs", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                errors.append(f"run {name} must be at least 1")
        for name in ("eval_every", "checkpoint_every", "warmup_steps"):
            if getattr(self, name) < 0:
                errors.append(f"run {name} must be 0 or more")
        if self.max_steps is not None and self.max_steps < 1:
            errors.append("run max_steps must be at least 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            errors.append(f"run lr must be a positive number, not {self.lr!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            errors.append("run min_lr_ratio must be in [0, 1]")
        for name in ("weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                errors.append(f"run {name} must be a number of 0 or more, not {value!r}")
        if errors:
            raise ConfigError("; ".join(errors))

    @property
    def clip_norm(self) -> float | None:
        return self.max_grad_norm or None

    def to_dict(self) -> dict:
        """All fields; None where unset (TOML writers drop those)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """Build from a mapping (a TOML table or JSON object); unknown keys and a missing dataset are errors."""
        if not isinstance(d, dict):
            raise ConfigError("[run] must be a table")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown run field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        if "dataset" not in d:
            raise ConfigError("[run] needs dataset = PATH (a .jsonl, .json, .csv or .parquet file)")
        wrong = []
        for f in dataclasses.fields(cls):
            if f.name in d and not _has_type(d[f.name], f.type):
                wrong.append(f"run {f.name} must be {_TYPE_NAMES.get(f.type, 'a string')}, not {d[f.name]!r}")
        if wrong:
            raise ConfigError("; ".join(wrong))
        return cls(**d)

    def resolved(self, base: str | Path) -> "RunConfig":
        """Relative paths made absolute against ``base`` (the plan file's folder)."""
        base = Path(base)
        changes = {}
        for name in _PATH_FIELDS:
            value = getattr(self, name)
            if value and not Path(value).expanduser().is_absolute():
                changes[name] = str((base / value).resolve())
            elif value:
                changes[name] = str(Path(value).expanduser())
        return dataclasses.replace(self, **changes)


_TYPE_NAMES = {"int": "an integer", "int | None": "an integer", "float": "a number", "float | None": "a number",
               "bool": "true or false"}


def _has_type(value, type_name: str) -> bool:
    if value is None:
        return type_name.endswith("| None")
    if type_name.startswith("bool"):
        return isinstance(value, bool)
    if type_name.startswith("int"):
        return isinstance(value, int) and not isinstance(value, bool)
    if type_name.startswith("float"):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, str)

"""Errors memtune raises for bad input. The CLI prints each as one line and exits with code 2."""

from __future__ import annotations


class MemtuneError(Exception):
    """Base class: the message says what went wrong and what to do about it."""


class ConfigError(MemtuneError):
    """A model config, plan file or option value that cannot be used."""


class UnknownModelError(MemtuneError):
    """A ``--model`` that is neither a profile, a path, nor a local Hugging Face cache entry."""


class UnknownGpuError(MemtuneError):
    """A ``--gpu`` that is not in ``profiles/gpus.toml``."""


class InvalidPlanError(MemtuneError):
    """A combination of knobs that cannot run (or cannot run on the chosen GPU)."""

    def __init__(self, reasons: list[str]):
        self.reasons = reasons
        super().__init__("; ".join(reasons))

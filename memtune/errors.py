"""Errors memtune raises. The CLI prints each as one line and exits with its ``exit_code``: 2 for bad input, 1 for a
plan that does not fit or a run that could not finish."""

from __future__ import annotations


class MemtuneError(Exception):
    """Base class: the message says what went wrong and what to do about it."""

    exit_code = 2


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


class PlanDoesNotFitError(MemtuneError):
    """Nothing the search may choose fits the GPU: an answer, not bad input."""

    exit_code = 1


class RunFailedError(MemtuneError):
    """A validation or run that started could not finish (a timeout, a crashed worker)."""

    exit_code = 1

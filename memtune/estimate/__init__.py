"""The estimator: per-rank peak memory of one training step of a plan on a GPU.

``estimate(model, plan, gpu)`` traces the real training step on fake tensors (``memtune.estimate.trace``) at the
model's full depth, or with ``fast=True`` four periods of layer types extended period by period to the model's depth
(``memtune.estimate.compose``), and adds what the trace cannot see (cuBLAS workspaces, runtime overhead;
``memtune.estimate.overhead``). ``memtune.estimate.screen`` is the closed-form screen the planner searches with.
"""

from __future__ import annotations

from memtune.estimate.breakdown import MemoryBreakdown
from memtune.estimate.categories import MemCategory, Phase

__all__ = ["MemCategory", "MemoryBreakdown", "Phase", "estimate", "sdpa_backend"]


def __getattr__(name: str):
    """``estimate`` and ``sdpa_backend`` on first use: they bring torch and transformers, which commands that only
    show memory (``gpus``, ``models``, ``report``) do not need."""
    if name in ("estimate", "sdpa_backend"):
        from memtune.estimate import compose

        return getattr(compose, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

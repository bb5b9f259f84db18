"""The estimator: per-rank peak memory of one training step of a plan on a GPU.

``estimate(model, plan, gpu)`` traces the real training step on fake tensors (``memtune.estimate.trace``) at the
model's full depth, or with ``fast=True`` four periods of layer types extended period by period to the model's depth
(``memtune.estimate.compose``), and adds what the trace cannot see (cuBLAS workspaces, runtime overhead;
``memtune.estimate.overhead``). ``memtune.estimate.screen`` is the closed-form screen the planner searches with.
"""

from __future__ import annotations

from memtune.estimate.breakdown import MemoryBreakdown
from memtune.estimate.categories import MemCategory, Phase
from memtune.estimate.compose import estimate, sdpa_backend

__all__ = ["MemCategory", "MemoryBreakdown", "Phase", "estimate", "sdpa_backend"]

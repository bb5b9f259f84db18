"""The estimator: per-rank peak memory of one training step of a plan on a GPU.

``estimate(model, plan, gpu)`` traces the real training step on fake tensors at two reduced depths
(``memtune.estimate.trace``), extrapolates each phase's landmarks linearly to the model's depth, and adds what the
trace cannot see (cuBLAS workspaces, runtime overhead; ``memtune.estimate.overhead``).
"""

from __future__ import annotations

from memtune.estimate.breakdown import MemoryBreakdown
from memtune.estimate.categories import MemCategory, Phase
from memtune.estimate.compose import estimate, sdpa_backend

__all__ = ["MemCategory", "MemoryBreakdown", "Phase", "estimate", "sdpa_backend"]

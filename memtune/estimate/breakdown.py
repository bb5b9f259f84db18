"""MemoryBreakdown: the estimate of one plan on one GPU, per rank, by category and phase."""

from __future__ import annotations

from dataclasses import dataclass

from memtune.estimate.categories import MemCategory, Phase, Verdict
from memtune.plan import Plan


@dataclass(frozen=True, kw_only=True, slots=True)
class MemoryBreakdown:
    model: str
    gpu: str
    plan: Plan
    phases: dict[Phase, dict[MemCategory, int]]
    """Allocated bytes by category at each phase's peak (PyTorch's pool, cuBLAS workspaces included)."""
    peak_reserved_bytes: int
    """What the caching allocator holds from the driver at the peak (allocated plus its cache), with no memory
    limit: what ``max_memory_reserved`` shows on a large GPU."""
    gpu_reserved_bytes: int | None
    """Peak reserved on the target GPU (within the safety margin), where the allocator releases its cache and
    retries when a new segment would not fit; None when the step runs out of memory there even so."""
    runtime_overhead_bytes: int
    """Memory outside PyTorch's pool: CUDA context, kernels, NCCL."""
    device_usable_bytes: int
    """The GPU's memory as the driver reports it."""
    margin_bytes: int
    """Safety margin kept free for the ``fits`` verdict."""
    verdict: Verdict
    """``fits``: the pool fits the card with the safety margin to spare, with no pressure on the allocator.
    ``borderline``: it fits only once the allocator releases its cache under pressure (where fragmentation is the
    least predictable), or only without the margin - validate it. ``does not fit``: out of memory even so."""
    verdict_reason: str
    calibration: str | None = None
    """The calibration file applied (``profiles/calibration``), if any."""
    method: str = "trace"
    """``trace``: the training step traced on fake tensors and replayed through the allocator model; ``screen``:
    the closed-form screen the planner uses to order and prune candidates (``memtune.estimate.screen``)."""
    traced_layers: int | None = None
    """Decoder layers the trace ran: the model's depth, or fewer for the fast path (four periods of layer types,
    extended to the full depth)."""

    def phase_peak(self, phase: Phase) -> int:
        return sum(self.phases[phase].values())

    @property
    def peak_phase(self) -> Phase:
        return max(self.phases, key=self.phase_peak)

    @property
    def peak_allocated_bytes(self) -> int:
        return self.phase_peak(self.peak_phase)

    @property
    def components(self) -> dict[MemCategory, int]:
        """Categories at the overall peak, plus the allocator cache and the runtime overhead."""
        at_peak = dict(self.phases[self.peak_phase])
        at_peak[MemCategory.ALLOCATOR_CACHE] = self.peak_reserved_bytes - self.peak_allocated_bytes
        at_peak[MemCategory.RUNTIME] = self.runtime_overhead_bytes
        return at_peak

    @property
    def fits(self) -> bool:
        return self.verdict == Verdict.FITS

    @property
    def required_bytes(self) -> int:
        """Device memory the process needs: its pool on the target GPU (unconstrained when it does not fit there)
        plus the runtime overhead."""
        pool = self.gpu_reserved_bytes if self.gpu_reserved_bytes is not None else self.peak_reserved_bytes
        return pool + self.runtime_overhead_bytes

    @property
    def usable_bytes(self) -> int:
        """The GPU's memory less the safety margin: what ``required_bytes`` must stay within."""
        return self.device_usable_bytes - self.margin_bytes

    @property
    def headroom_bytes(self) -> int:
        return self.usable_bytes - self.required_bytes

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "gpu": self.gpu,
            "plan": self.plan.to_dict(),
            "peak_allocated_bytes": self.peak_allocated_bytes,
            "peak_reserved_bytes": self.peak_reserved_bytes,
            "gpu_reserved_bytes": self.gpu_reserved_bytes,
            "runtime_overhead_bytes": self.runtime_overhead_bytes,
            "required_bytes": self.required_bytes,
            "device_usable_bytes": self.device_usable_bytes,
            "margin_bytes": self.margin_bytes,
            "headroom_bytes": self.headroom_bytes,
            "fits": self.fits,
            "verdict": self.verdict,
            "verdict_reason": self.verdict_reason,
            "peak_phase": self.peak_phase.value,
            "calibration": self.calibration,
            "method": self.method,
            "traced_layers": self.traced_layers,
            "components": {c.value: v for c, v in self.components.items()},
            "phases": {p.value: self.phase_peak(p) for p in self.phases},
            "phase_components": {p.value: {c.value: v for c, v in cats.items()} for p, cats in self.phases.items()},
        }

"""The estimated memory timeline of a plan: its traced step's allocations and frees replayed through the
caching-allocator model (``memtune.estimate.allocator``), cuBLAS workspaces included."""

from __future__ import annotations

from memtune.errors import MemtuneError
from memtune.plan import Plan
from memtune.records import EstimatedTimeline, bucket_max
from memtune.specs.gpu import GpuSpec
from memtune.specs.model import ModelSpec


def estimated_timeline(spec: ModelSpec, plan: Plan, gpu: GpuSpec) -> EstimatedTimeline | None:
    """Allocated and reserved bytes after every allocation and free of the full-depth trace (one warm-up step, then
    the step the estimate is taken from); None when the plan cannot be traced for this model and GPU."""
    from memtune.estimate import overhead
    from memtune.estimate.allocator import CachingAllocatorModel
    from memtune.estimate.compose import cached_trace, sdpa_backend

    try:
        plan.check_model(spec)
        plan.check_gpu(gpu)
        trace = cached_trace(spec, plan, spec.num_layers, sdpa_backend(spec, plan, gpu))
    except MemtuneError:
        return None
    workspace = overhead.cublas_workspace_bytes(gpu.compute_capability)
    allocator, blocks = CachingAllocatorModel(), {}
    allocated, reserved = [], []
    for op, uid, nbytes, stream in trace.events:
        if op:
            blocks[uid] = allocator.malloc(nbytes, stream)
        else:
            allocator.free(blocks.pop(uid))
        allocated.append(allocator.allocated + workspace)
        reserved.append(allocator.reserved + workspace)
    x, a, r = bucket_max(list(range(len(allocated))), allocated, reserved)
    return EstimatedTimeline(x=tuple(x), allocated=tuple(a), reserved=tuple(r),
                             peak_allocated=max(allocated, default=0), peak_reserved=max(reserved, default=0))

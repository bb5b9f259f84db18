"""Compose a MemoryBreakdown from traces of the training step.

By default the step is traced at the model's full depth: every allocation of the real step is replayed through
the caching-allocator model, which gives both the allocated peak and the reserved bytes.

``fast=True`` traces two reduced depths a < b instead (for screening many plans). Every landmark of a step (the
peak inside the embeddings, the first and last decoder layer, and the head, in each phase) holds a fixed part plus
a part per decoder layer, so its bytes are linear in the depth L:
``m(L) = m(a) + (L - a) * (m(b) - m(a)) / (b - a)``. The peak of a phase is the largest of its landmarks at the
model's depth (the layers in between lie on the line between the first and the last). Fragmentation does not
follow a line, so the fast path takes the allocator cache of depth b as it is.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

from memtune.errors import InvalidPlanError
from memtune.estimate import overhead
from memtune.estimate.breakdown import MemoryBreakdown
from memtune.estimate.categories import MemCategory, Phase
from memtune.estimate.trace import PhasePeak, TraceResult
from memtune.plan import Plan
from memtune.specs.gpu import GpuSpec
from memtune.specs.model import ModelSpec

DEFAULT_MARGIN = 0.02
"""Share of the GPU's memory kept free for the ``fits`` verdict."""

TRACE_FORMAT = 1


def sdpa_backend(spec: ModelSpec, plan: Plan, gpu: GpuSpec) -> str:
    """The kernel PyTorch's SDPA dispatch picks on this GPU (``aten/src/ATen/native/transformers/cuda/sdp_utils``).

    Flash attention needs fp16/bf16, compute capability 8.0+ and head_dim <= 256. Memory-efficient attention takes
    any dtype but not grouped-query attention (``enable_gqa``). Otherwise SDPA runs the math kernel, which
    materializes the s x s attention matrix.
    """
    if plan.attention != "sdpa":
        return "eager"
    low_precision = plan.precision != "fp32"
    if low_precision and gpu.compute_capability >= (8, 0) and spec.head_dim <= 256:
        return "flash"
    if spec.num_key_value_heads == spec.num_attention_heads:
        return "efficient"
    return "math"


def trace_depths(spec: ModelSpec) -> tuple[int, int]:
    """Two depths that keep the pattern of layer types (e.g. Gemma-2's alternating sliding/global attention)."""
    types = spec.config.get("layer_types")
    period = 1
    if isinstance(types, list) and types:
        period = next(p for p in range(1, len(types) + 1) if all(types[i] == types[i % p] for i in range(len(types))))
    a = max(2, period)
    return (a, 2 * a) if 2 * a <= spec.num_layers else (spec.num_layers, spec.num_layers)


def estimate(spec: ModelSpec, plan: Plan, gpu: GpuSpec, *, margin: float = DEFAULT_MARGIN,
             fast: bool = False) -> MemoryBreakdown:
    """Per-rank peak memory of one steady-state training step of ``plan`` for ``spec`` on ``gpu``.

    Raises:
        InvalidPlanError: the plan cannot run for this model or on this GPU.
    """
    plan.check_model(spec)
    plan.check_gpu(gpu)
    backend = sdpa_backend(spec, plan, gpu)
    workspace = overhead.cublas_workspace_bytes(gpu.compute_capability)
    depths = trace_depths(spec) if fast else (spec.num_layers, spec.num_layers)
    phases, reserved = _compose([cached_trace(spec, plan, d, backend) for d in sorted(set(depths))], spec.num_layers)
    for cats in phases.values():
        cats[MemCategory.WORKSPACE] = workspace
    return MemoryBreakdown(
        model=spec.name, gpu=gpu.name, plan=plan, phases=phases, peak_reserved_bytes=reserved + workspace,
        runtime_overhead_bytes=overhead.runtime_overhead_bytes(plan.world_size),
        device_usable_bytes=gpu.memory_bytes, margin_bytes=int(margin * gpu.memory_bytes),
    )


def _compose(traces: list[TraceResult], depth: int) -> tuple[dict[Phase, dict[MemCategory, int]], int]:
    """Per-phase categories at each phase's peak and the reserved bytes, at ``depth`` layers."""
    ta, tb = traces[0], traces[-1]
    a, b = ta.num_layers, tb.num_layers

    def at_depth(va: int, vb: int) -> int:
        return va if a == b else max(0, round(va + (depth - a) * (vb - va) / (b - a)))

    phases = {}
    for phase in Phase:
        best = {c: 0 for c in MemCategory if c not in (MemCategory.ALLOCATOR_CACHE, MemCategory.RUNTIME)}
        for key in ta.landmarks.keys() & tb.landmarks.keys():
            if key[0] != phase or (a != b and key[1] == "mid"):
                continue
            la, lb = ta.landmarks[key], tb.landmarks[key]
            cats = {c: at_depth(la.by_category[c], lb.by_category[c]) for c in best}
            if sum(cats.values()) > sum(best.values()):
                best = cats
        phases[phase] = best
    allocated = max(sum(c.values()) for c in phases.values())
    cache_b = tb.peak_reserved - max(tb.phase_peak(p) for p in Phase)
    return phases, max(allocated, allocated + cache_b if a != b else tb.peak_reserved)


# --- trace cache ----------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    return Path(os.environ.get("MEMTUNE_CACHE", Path.home() / ".cache" / "memtune")) / "traces"


def _trace_key(spec: ModelSpec, plan: Plan, depth: int, backend: str) -> str:
    import torch
    import transformers

    ident = {"format": TRACE_FORMAT, "config": spec.config_json, "plan": plan.to_dict(), "depth": depth,
             "sdpa": backend, "torch": torch.__version__.split("+")[0], "transformers": transformers.__version__}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


@functools.lru_cache(maxsize=4096)
def cached_trace(spec: ModelSpec, plan: Plan, depth: int, backend: str) -> TraceResult:
    """``trace_step`` results, cached in memory and on disk (``$MEMTUNE_CACHE``, default ``~/.cache/memtune``)."""
    path = cache_dir() / f"{_trace_key(spec, plan, depth, backend)}.json"
    if path.is_file():
        try:
            return _from_json(json.loads(path.read_text()))
        except (ValueError, KeyError):
            path.unlink(missing_ok=True)
    from memtune.estimate.trace import trace_step

    try:
        result = trace_step(spec, plan, depth, sdpa_backend="math" if backend == "math" else "flash")
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:
        raise InvalidPlanError([f"cannot trace this plan for {spec.name}: {type(e).__name__}: {e}"]) from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(_to_json(result)))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home only costs the next run a new trace
    return result


def _to_json(r: TraceResult) -> dict:
    return {"num_layers": r.num_layers, "peak_reserved": r.peak_reserved,
            "landmarks": [[p.value, seg, v.total, {c.value: n for c, n in v.by_category.items()}]
                          for (p, seg), v in r.landmarks.items()]}


def _from_json(d: dict) -> TraceResult:
    return TraceResult(num_layers=d["num_layers"], peak_reserved=d["peak_reserved"], landmarks={
        (Phase(p), seg): PhasePeak(total=total, by_category={MemCategory(c): n for c, n in cats.items()})
        for p, seg, total, cats in d["landmarks"]})

"""Compose a MemoryBreakdown from traces of the training step.

By default the step is traced at the model's full depth: every allocation of the real step is replayed through
the caching-allocator model, which gives both the allocated peak and the reserved bytes.

``fast=True`` traces four periods of layer types instead (four layers of a uniform stack; for screening many plans),
after a quick warm-up (the optimizer states made from zero gradients, which stand for an earlier micro-batch's under
gradient accumulation). Every landmark of a step (the peak inside the embeddings, the first and last decoder layer,
and the head, in each phase) holds a fixed part plus what each layer keeps there, so its bytes are linear in the
depth L: ``m(L) = m(4p) + (L - 4p) / p x s`` for a period of p layer types, where ``s`` is what one inner period
clear of the running layer (and of the one FSDP2 prefetches) holds at that landmark - its weights, gradients and
optimizer states by the module that owns them, its activations by the layer that made them
(``TraceResult.per_layer``). The peak of a phase is the largest of its landmarks at the model's depth (the layers in
between lie on the line between the first and the last). Fragmentation does not follow a line, so the fast path
takes the allocator cache of the traced depth as it is.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
from pathlib import Path

from memtune.errors import InvalidPlanError
from memtune.estimate import overhead
from memtune.estimate.breakdown import MemoryBreakdown
from memtune.estimate.categories import MemCategory, Phase, Verdict
from memtune.estimate.traced import OpRecord, PhasePeak, TraceResult
from memtune.profiles import cache_root, write_cached
from memtune.plan import Plan
from memtune.specs.gpu import GpuSpec
from memtune.specs.model import ModelSpec

DEFAULT_MARGIN = 0.02
"""Share of the GPU's memory kept free for the ``fits`` verdict."""

TRACE_FORMAT = 24
MAX_FULL_DEPTH = 64
"""Deeper models (Llama-3-70B's 80 layers, 405B's 126) are estimated by the fast path unless ``full_depth`` asks for
every layer: their full trace takes a minute or more on a laptop core (405B: 77 s), the fast one seconds, within
about 2 % of it. ``MemoryBreakdown.traced_layers`` says which it was."""


def sdpa_backend(spec: ModelSpec, plan: Plan, gpu: GpuSpec) -> str:
    """The kernel PyTorch's SDPA dispatch picks on this GPU (``aten/src/ATen/native/transformers/cuda/sdp_utils``).

    Flash attention needs fp16/bf16, compute capability 8.0+ and head_dim <= 256. Memory-efficient attention takes
    any dtype (bf16 from compute capability 8.0) but not grouped-query attention (``enable_gqa``). Otherwise SDPA runs the math kernel, which
    materializes the s x s attention matrix. k-bit plans with ``kbit_upcast`` run their activations in fp32 (peft's
    ``prepare_model_for_kbit_training`` upcasts the norms, and bitsandbytes' layers return their input's dtype), so
    attention sees fp32 queries - unless autocast (amp-*) casts them to the compute dtype: a QLoRA plan under amp-bf16
    runs flash attention (Llama-3.1-8B at 2 x 2,048 tokens measured 48.03 GB on an H200, the estimate with the math
    kernel said 86.06 GB, with flash 48.03 GB).
    """
    if plan.attention != "sdpa":
        return "eager"
    low_precision = plan.precision != "fp32" and (not plan.fp32_residual or plan.is_amp)
    if low_precision and gpu.compute_capability >= (8, 0) and spec.head_dim <= 256:
        return "flash"
    if spec.num_key_value_heads == spec.num_attention_heads and (gpu.bf16 or "bf16" not in plan.precision):
        return "efficient"  # below compute capability 8.0 it takes no bf16 (llama-cookbook's bf16 on a V100)
    return "math"


def fast_depth(spec: ModelSpec) -> int:
    """The depth the fast estimate traces: four periods of layer types (the first and the last, and two inner ones,
    one of which is clear of the running layer and of the one FSDP2 prefetches at every landmark, so its memory
    stands for each layer the model adds), or the whole model."""
    return min(4 * spec.layer_period, spec.num_layers)


def calibration_factors(spec: ModelSpec, gpu: GpuSpec) -> tuple[float, float, str] | None:
    """(allocated, reserved, source) from ``profiles/calibration``: the largest measured/estimated ratio of the
    model's architecture family, never below 1 (calibration only ever adds). The GPU's own file is preferred;
    otherwise another GPU's (the estimator's errors come from the software stack more than from the card)."""
    from memtune.profiles import calibrations

    for name, data in calibrations(gpu.name):
        family = data["families"].get(spec.model_type)
        if family:
            return (max(1.0, family["allocated"]["max"]), max(1.0, family["reserved"]["max"]), name)
    return None


def estimate(spec: ModelSpec, plan: Plan, gpu: GpuSpec, *, margin: float = DEFAULT_MARGIN,
             fast: bool = False, calibrated: bool = False, full_depth: bool = False) -> MemoryBreakdown:
    """Per-rank peak memory of one steady-state training step of ``plan`` for ``spec`` on ``gpu``.

    ``calibrated=True`` scales the result by the measured/estimated ratios of ``calibration_factors`` (when the
    model's family has been measured). ``fast=True`` traces ``fast_depth`` layers and extends them; so does a model
    deeper than ``MAX_FULL_DEPTH`` unless ``full_depth=True``.

    Raises:
        InvalidPlanError: the plan cannot run for this model or on this GPU.
    """
    plan.check_model(spec)
    plan.check_gpu(gpu)
    fast = fast or (spec.num_layers > MAX_FULL_DEPTH and not full_depth)
    backend = sdpa_backend(spec, plan, gpu)
    workspace = overhead.cublas_workspace_bytes(gpu.compute_capability)
    # CPU offload: the same step with the sharded state on the host - traced on the device, then taken off it.
    traced = dataclasses.replace(plan, offload=False) if plan.offload else plan
    trace = cached_trace(spec, traced, fast_depth(spec) if fast else spec.num_layers, backend)
    phases, reserved = _compose(trace, spec.num_layers, offload=trace if plan.offload else None)
    factors = calibration_factors(spec, gpu) if calibrated else None
    scale_alloc, scale_res = factors[:2] if factors else (1.0, 1.0)
    if factors:
        phases = {p: {c: round(v * scale_alloc) for c, v in cats.items()} for p, cats in phases.items()}
        reserved = max(round(reserved * scale_res), max(sum(c.values()) for c in phases.values()))
    for cats in phases.values():
        cats[MemCategory.WORKSPACE] = workspace
    runtime = overhead.runtime_overhead_bytes(plan.has_process_group)
    margin_bytes = int(margin * gpu.memory_bytes)
    capacity = gpu.memory_bytes - runtime - workspace
    whole = trace.num_layers == spec.num_layers and not plan.offload  # a trace of every layer can be replayed
    verdict, reason, gpu_reserved = _verdict(trace if whole else None, reserved,
                                             capacity, margin_bytes, scale_res, plan.expandable_segments)
    return MemoryBreakdown(
        model=spec.name, gpu=gpu.name, plan=plan, phases=phases, peak_reserved_bytes=reserved + workspace,
        gpu_reserved_bytes=None if gpu_reserved is None else gpu_reserved + workspace,
        runtime_overhead_bytes=runtime, device_usable_bytes=gpu.memory_bytes, margin_bytes=margin_bytes,
        verdict=verdict, verdict_reason=reason, calibration=factors[2] if factors else None,
        traced_layers=trace.num_layers,
    )


def _verdict(trace: TraceResult | None, reserved: int, capacity: int, margin: int,
             scale: float, expandable: bool = False) -> tuple[str, str, int | None]:
    """(verdict, reason, pool bytes on the GPU) for a pool of ``reserved`` bytes without a limit and ``capacity``
    bytes left to PyTorch on the card. ``trace`` (full depth) lets the allocator be replayed under the limit."""

    def replayed(limit: int) -> int | None:
        if trace is None:
            return None  # the fast path has no full-depth allocation sequence to replay
        outcome = _replay(trace, int(limit / scale), expandable)
        return round(outcome.peak_reserved * scale) if outcome.fits else None

    if reserved <= capacity - margin:
        return Verdict.FITS, "the allocator's pool fits with the safety margin to spare", reserved
    squeezed = replayed(capacity - margin)
    if squeezed is not None and expandable:
        return (Verdict.FITS, "fits with the safety margin once the allocator unmaps free pages (expandable segments "
                "strand no memory to fragmentation)", squeezed)
    if squeezed is not None:
        return (Verdict.BORDERLINE, "fits only once the allocator releases its cache under memory pressure, where "
                "fragmentation is least predictable: validate it on the card", squeezed)
    if reserved <= capacity or replayed(capacity) is not None:
        return Verdict.BORDERLINE, "fits only without the safety margin: validate it on the card", None
    return Verdict.DOES_NOT_FIT, "out of memory even after the allocator releases its cache", None


@functools.lru_cache(maxsize=256)
def _replay(trace: TraceResult, capacity: int, expandable: bool = False):
    """The step's allocations replayed under the memory a smaller card leaves to PyTorch's pool."""
    from memtune.estimate.allocator import replay

    return replay(list(trace.events), capacity, expandable=expandable)


def _landmarks(t: TraceResult, depth: int) -> dict[tuple[Phase, str], dict[MemCategory, int]]:
    """Every landmark's bytes by category at ``depth`` layers: the trace's, plus, for each period of layers beyond
    the traced ones, what one period of layers holds there (``TraceResult.per_layer``)."""
    periods = (depth - t.num_layers) / t.period
    out = {}
    for key, peak in t.landmarks.items():
        if periods and key[1] == "mid":
            continue
        slope = (t.per_layer or {}).get(key, {})
        out[key] = {c: peak.by_category[c] + round(periods * slope.get(c, 0))
                    for c in MemCategory if c not in (MemCategory.ALLOCATOR_CACHE, MemCategory.RUNTIME)}
    return out


def _peaks(landmarks: dict[tuple[Phase, str], dict[MemCategory, int]]) -> dict[Phase, dict[MemCategory, int]]:
    """Each phase's largest landmark."""
    empty = {c: 0 for c in MemCategory if c not in (MemCategory.ALLOCATOR_CACHE, MemCategory.RUNTIME)}
    return {phase: max((cats for (p, _), cats in landmarks.items() if p == phase), key=lambda c: sum(c.values()),
                       default=empty) for phase in Phase}


def _cache(trace: TraceResult) -> int:
    """The allocator cache at the end of a trace: reserved beyond its largest allocated peak."""
    return trace.peak_reserved - max(trace.phase_peak(p) for p in Phase)


HOST_CATEGORIES = (MemCategory.PARAMETERS, MemCategory.GRADIENTS, MemCategory.OPTIMIZER_STATES)


def _on_device(landmarks: dict[tuple[Phase, str], dict[MemCategory, int]]):
    """The landmarks without what FSDP2's CPU offload keeps on the host: sharded weights, their gradients, the
    optimizer states, and in the optimizer step its temporaries and gradient shards (the step runs on the CPU)."""
    out = {}
    for (phase, segment), cats in landmarks.items():
        cats = {**cats, **{c: 0 for c in HOST_CATEGORIES}}
        if phase == Phase.OPTIMIZER_STEP:
            cats[MemCategory.TEMPORARIES] = cats[MemCategory.FSDP_BUFFERS] = 0
        out[(phase, segment)] = cats
    return out


def _finish(landmarks, reserved_of, offload: TraceResult | None) -> tuple[dict[Phase, dict[MemCategory, int]], int]:
    """Phase peaks and reserved bytes from ``landmarks``; ``reserved_of(allocated)`` gives the reserved bytes of the
    traced step. With CPU offload (``offload``: the deepest trace) the step keeps only what stays on the device, and
    the allocator the cache of that trace's allocations replayed without the host-resident ones."""
    phases = _peaks(landmarks)
    if offload is None:
        return phases, reserved_of(max(sum(c.values()) for c in phases.values()))
    moved = _peaks(_on_device(landmarks))
    return moved, max(sum(c.values()) for c in moved.values()) + _offload_cache(offload)


@functools.lru_cache(maxsize=64)
def _offload_cache(trace: TraceResult) -> int:
    """The allocator cache of ``trace``'s step as CPU offload runs it: what stays on the host is left out of the
    replay, and each gradient shard is freed as soon as it is made (FSDP2 copies it to the host after the
    reduce-scatter)."""
    from memtune.estimate.allocator import replay

    outcome = replay(offloaded_events(trace))
    return max(0, outcome.peak_reserved - outcome.peak_allocated)


def offloaded_events(trace: TraceResult) -> list[tuple[int, int, int, str]]:
    """``trace``'s allocations as the device sees them under CPU offload."""
    kept = []
    for event in trace.events:
        op, uid = event[0], event[1]
        if uid in trace.host_resident or (uid in trace.gradients and not op):
            continue
        kept.append(event)
        if uid in trace.gradients:
            kept.append((0, uid, 0, ""))
    return kept


def _compose(trace: TraceResult, depth: int, *,
             offload: TraceResult | None = None) -> tuple[dict[Phase, dict[MemCategory, int]], int]:
    """Per-phase categories at each phase's peak and the reserved bytes, at ``depth`` layers (``offload``: see
    ``_finish``)."""
    if trace.num_layers == depth:
        return _finish(_landmarks(trace, depth), lambda allocated: max(allocated, trace.peak_reserved), offload)
    return _finish(_landmarks(trace, depth), lambda allocated: allocated + max(0, _cache(trace)), offload)


# --- trace cache ----------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    return cache_root() / "traces"


def _trace_key(spec: ModelSpec, plan: Plan, depth: int, backend: str) -> str:
    from importlib.metadata import version

    # Batching only decides seq_len (and the cost): the same step whether the sequences were padded or packed.
    fields = {k: v for k, v in plan.to_dict().items() if k != "batching"}
    fields["grad_accum"] = min(plan.grad_accum, 2)
    ident = {"format": TRACE_FORMAT, "config": spec.config_json, "plan": fields, "depth": depth,
             "quick_warmup": depth < spec.num_layers,
             "sdpa": backend, "torch": version("torch").split("+")[0], "transformers": version("transformers")}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


@functools.lru_cache(maxsize=4096)
def cached_trace(spec: ModelSpec, plan: Plan, depth: int, backend: str) -> TraceResult:
    """``trace_step`` results of ``plan.recipe_plan``, cached in memory and on disk (``$MEMTUNE_CACHE``, default
    ``~/.cache/memtune``)."""
    plan = plan.recipe_plan
    path = cache_dir() / f"{_trace_key(spec, plan, depth, backend)}.json"
    if path.is_file():
        try:
            return _from_json(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError, IndexError):
            path.unlink(missing_ok=True)
    from memtune.estimate.trace import trace_step

    # An op the stack cannot run raises below, and is reported there in one line; fake tensors would log it first.
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        result = trace_step(spec, plan, depth, sdpa_backend="math" if backend == "math" else "flash",
                            quick_warmup=depth < spec.num_layers)
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        hint = ("; a kernel of this model takes bf16 only: use --precision bf16" if "BF16" in first
                and plan.precision != "bf16" else "")
        raise InvalidPlanError([f"cannot trace this plan for {spec.name}: {type(e).__name__}: {first}{hint}"]) from None
    finally:
        fake_log.setLevel(level)
    write_cached(path, _to_json(result))
    return result


def _to_json(r: TraceResult) -> dict:
    streams = sorted({e[3] for e in r.events})
    return {"num_layers": r.num_layers, "peak_reserved": r.peak_reserved,
            "landmarks": [[p.value, seg, v.total, {c.value: n for c, n in v.by_category.items()}]
                          for (p, seg), v in r.landmarks.items()],
            "streams": streams,
            "events": [x for op, uid, n, st in r.events for x in (op, uid, n, streams.index(st))],
            "host_resident": sorted(r.host_resident), "gradients": sorted(r.gradients), "period": r.period,
            "per_layer": [[p.value, seg, {c.value: n for c, n in v.items() if n}]
                          for (p, seg), v in (r.per_layer or {}).items()],
            "ops": [list(op) for op in r.ops]}


def _from_json(d: dict) -> TraceResult:
    flat, streams = d["events"], d["streams"]
    events = tuple((flat[i], flat[i + 1], flat[i + 2], streams[flat[i + 3]]) for i in range(0, len(flat), 4))
    per_layer = {(Phase(p), seg): {MemCategory(c): n for c, n in cats.items()} for p, seg, cats in d["per_layer"]}
    ops = tuple(OpRecord(*op) for op in d["ops"])
    return TraceResult(num_layers=d["num_layers"], peak_reserved=d["peak_reserved"], events=events, ops=ops,
                       host_resident=frozenset(d["host_resident"]), gradients=frozenset(d["gradients"]),
                       period=d["period"], per_layer=per_layer, landmarks={
        (Phase(p), seg): PhasePeak(total=total, by_category={MemCategory(c): n for c, n in cats.items()})
        for p, seg, total, cats in d["landmarks"]})

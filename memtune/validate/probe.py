"""Run a few real training steps of a plan on the local device and measure its memory, per phase.

Follows PyTorch's own tracker tests: warm up (step 0 creates the optimizer states), ``gc.collect()``, reset the
peak statistics, then record peak allocated/reserved/active bytes per phase over the next steps, plus allocation
retries and OOMs (as torchtitan's ``DeviceMemoryMonitor`` does). The steps run as in ``memtune launch``, Python's
garbage collector kept out of them (``recipe.collection_between_steps``), and their time is the median step. On a
CPU device the steps run (for structure and time) but there is no allocator to read: memory fields are None.
"""

from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path

import torch

from memtune.estimate.categories import MemCategory, Phase
from memtune.plan import Plan
from memtune.specs.model import ModelSpec
from memtune.train import recipe


def measure_plan(spec: ModelSpec, plan: Plan, *, steps: int = 2, mesh=None, device: torch.device | None = None,
                 memory_cap_bytes: int | None = None, snapshot_path: Path | None = None,
                 sdpa_backend: str | None = None, load_weights: bool = False) -> dict:
    """Memory and time of ``steps`` steady-state training steps of ``plan`` (after one warm-up step).

    Args:
        memory_cap_bytes: cap PyTorch's pool at this many bytes (``set_per_process_memory_fraction``), to stand in
            for a smaller card.
        snapshot_path: dump a CUDA memory snapshot of the measured steps there (``torch.cuda.memory``).
        sdpa_backend: the SDPA kernel the emulated GPU picks for causal attention (``flash``, ``efficient`` or
            ``math``): attention is limited to the kernels that GPU has.
        load_weights: start from ``spec.weights_dir`` instead of a random init.

    Returns:
        ``measured_peak_allocated_bytes``, ``measured_peak_reserved_bytes``, ``measured_peak_active_bytes``,
        ``measured_phases`` (peak allocated per phase), ``measured_categories`` (parameters, gradients, optimizer
        states, per phase), ``num_alloc_retries``, ``num_ooms``, ``step_time_s`` (the median of ``step_times_s``,
        each step's time on the GPU; ``mean_step_time_s`` is the steps' wall time over their number),
        ``tokens_per_s`` (at the median step), ``host_enqueue_s`` (the host's time to issue a step: close to the
        step's when the host, not the GPU, sets the pace), ``phase_times_s`` (GPU time per phase), ``warmup_loss``
        (the loss of the untouched weights), ``losses``;
        or ``error: "oom"`` with the high-water marks when the plan ran out of memory.
    """
    device = device or torch.device("cuda", torch.cuda.current_device())
    cuda = device.type == "cuda"
    if cuda and memory_cap_bytes is not None:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, memory_cap_bytes / total), device)
    recipe.use_plan_allocator(plan, device)
    try:
        with _sdpa_kernel(sdpa_backend):
            return _measure(spec, plan, steps=steps, mesh=mesh, device=device, snapshot_path=snapshot_path,
                            load_weights=load_weights)
    finally:
        if cuda and memory_cap_bytes is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, device)


def _sdpa_kernel(backend: str | None):
    """Limit SDPA to the kernels the emulated card has, ``backend`` being what it picks for a causal call
    (``compose.sdpa_backend``): with flash, the three; without, the memory-efficient and math kernels. The dispatcher
    then chooses per call as on that card: an explicit mask (a sliding window shorter than the sequence) rules flash
    out there too."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernels = {"flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
               "efficient": [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
               "math": [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]}
    return sdpa_kernel(kernels[backend]) if backend in kernels else contextlib.nullcontext()


def _measure(spec: ModelSpec, plan: Plan, *, steps: int, mesh, device: torch.device, snapshot_path: Path | None,
             load_weights: bool) -> dict:
    cuda = device.type == "cuda"
    model = optimizer = batch = None
    try:
        model = recipe.build_model(spec, plan, device=device, mesh=mesh, load_weights=load_weights)
        optimizer = recipe.build_optimizer(model, plan)
        scaler = torch.amp.GradScaler(device.type) if plan.precision == "amp-fp16" and cuda else None
        batch = recipe.make_batch(spec, plan, device)
        warmup_loss = float(recipe.train_step(model, optimizer, batch, plan, scaler=scaler))
        _sync(device)
        gc.collect()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        params = _tensor_bytes([*model.parameters(), *model.buffers()], device)
        phases = {p.value: 0 for p in Phase}
        categories = {p.value: {} for p in Phase}
        state = {"phase": None, "reserved": 0, "active": 0}

        events: list[tuple[str, torch.cuda.Event]] = []

        def mark(phase: str) -> None:
            # The caching allocator counts on the host, in the order ops are enqueued: its statistics need no
            # synchronization, and the GPU keeps running while the host goes ahead (as in a real run). One read of
            # them per phase boundary keeps the measurement's own host work out of the steps it times.
            if cuda and state["phase"] is not None:
                stats = torch.cuda.memory_stats(device)
                phases[state["phase"]] = max(phases[state["phase"]], stats.get("allocated_bytes.all.peak", 0))
                state["active"] = max(state["active"], stats.get("active_bytes.all.peak", 0))
                state["reserved"] = max(state["reserved"], stats.get("reserved_bytes.all.peak", 0))
            state["phase"] = None if phase == "end" else phase
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                events.append((phase, event))

        def size(phase: str) -> None:
            """What each phase starts with (the last micro-batch's), in a step that is not timed: walking every
            parameter, gradient and optimizer state costs host time (for k-bit weights, through bitsandbytes'
            ``__torch_function__``) that a timed step would pay."""
            if phase in categories:
                categories[phase] = {
                    MemCategory.PARAMETERS.value: params,
                    MemCategory.GRADIENTS.value: _tensor_bytes([p.grad for p in model.parameters()], device),
                    MemCategory.OPTIMIZER_STATES.value: _tensor_bytes(
                        [v for st in optimizer.state.values() for v in st.values()], device),
                }

        if cuda and snapshot_path is not None:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        _sync(device)
        losses, issued = [], []
        with recipe.collection_between_steps():
            start = time.perf_counter()
            for _ in range(steps):
                losses.append(recipe.train_step(model, optimizer, batch, plan, scaler=scaler, on_phase=mark))
                issued.append(time.perf_counter())
            enqueued = (time.perf_counter() - start) / steps
            _sync(device)
            elapsed = (time.perf_counter() - start) / steps
        step_times = _step_times(events) if cuda else [b - a for a, b in zip([start, *issued], issued)]
        step_time = statistics.median(step_times)
        losses = [float(x) for x in losses]
        if cuda and snapshot_path is not None:
            torch.cuda.memory._dump_snapshot(str(snapshot_path))
            torch.cuda.memory._record_memory_history(enabled=None)
        recipe.train_step(model, optimizer, batch, plan, scaler=scaler, on_phase=size)
        result = {
            "device": str(device),
            "weights": spec.weights_dir if load_weights and spec.weights_dir else "random init",
            "steps": steps,
            "measured_categories": categories,
            "step_time_s": step_time,
            "step_times_s": step_times,
            "mean_step_time_s": elapsed,
            "host_enqueue_s": enqueued,
            "phase_times_s": _phase_times(events, steps),
            "tokens_per_s": plan.batch_size * plan.seq_len * plan.grad_accum / step_time,
            "warmup_loss": warmup_loss,
            "losses": losses,
        }
        if cuda:
            stats = torch.cuda.memory_stats(device)
            result.update({
                "measured_peak_allocated_bytes": max(phases.values()),
                "measured_peak_reserved_bytes": state["reserved"],
                "measured_peak_active_bytes": state["active"],
                "measured_phases": phases,
                "measured_steady_bytes": params + categories["forward"].get(MemCategory.OPTIMIZER_STATES.value, 0),
                "num_alloc_retries": stats.get("num_alloc_retries", 0),
                "num_ooms": stats.get("num_ooms", 0),
                "nvml_used_bytes": _nvml_used_bytes(device),
                "reserved_at_nvml_read_bytes": torch.cuda.memory_reserved(device),
            })
        return result
    except torch.OutOfMemoryError as e:
        return {"error": "oom", "message": (str(e).splitlines() or ["out of memory"])[0],
                "measured_peak_allocated_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
                "measured_peak_reserved_bytes": torch.cuda.max_memory_reserved(device) if cuda else None}
    finally:
        del model, optimizer, batch
        gc.collect()
        if cuda:
            if snapshot_path is not None:
                torch.cuda.memory._record_memory_history(enabled=None)
            torch.cuda.empty_cache()


def _step_times(events: list) -> list[float]:
    """Seconds of each step on the GPU, from its first phase's event to its ``end`` event: where the host sets the
    pace, the GPU reaches a step's first event only once the host has issued it, and the step's span is the host's
    time to issue it."""
    times, first = [], None
    for phase, event in events:
        if first is None:
            first = event
        if phase == "end":
            times.append(first.elapsed_time(event) / 1e3)
            first = None
    return times


def _phase_times(events: list, steps: int) -> dict[str, float]:
    """Seconds of GPU time per phase and step, from the events recorded at each phase boundary (empty on the CPU)."""
    totals: dict[str, float] = {}
    for (phase, start), (_, end) in zip(events, events[1:]):
        if phase != "end":
            totals[phase] = totals.get(phase, 0.0) + start.elapsed_time(end) / 1e3 / steps
    return totals


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tensor_bytes(tensors, device: torch.device) -> int:
    """Bytes of the distinct storages on ``device`` behind ``tensors`` (local shards for DTensors)."""
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        t = getattr(t, "_local_tensor", t)
        if t.device.type != device.type:
            continue
        st = t.untyped_storage()
        key = (st.data_ptr(), st.nbytes()) if device.type == "cuda" else id(st)
        if key not in seen:
            seen.add(key)
            total += st.nbytes()
    return total


def _nvml_used_bytes(device: torch.device) -> int | None:
    """Memory in use on the device as the driver sees it (all processes), or None without NVML."""
    try:
        return int(torch.cuda.device_memory_used(device))
    except Exception:  # noqa: BLE001 - NVML is optional; any failure means "not available"
        return None

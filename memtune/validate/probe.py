"""Run a few real training steps of a plan on the local GPU and measure its memory, per phase.

Follows PyTorch's own tracker tests: warm up (step 0 creates the optimizer states), ``gc.collect()``, reset the
peak statistics, then record peak allocated/reserved per phase over the next steps, plus allocation retries and
OOMs (as torchtitan's ``DeviceMemoryMonitor`` does).
"""

from __future__ import annotations

import gc
import time

import torch

from memtune.estimate.categories import Phase
from memtune.plan import Plan
from memtune.specs.model import ModelSpec
from memtune.train import recipe


def measure_plan(spec: ModelSpec, plan: Plan, *, steps: int = 2, mesh=None,
                 device: torch.device | None = None) -> dict:
    """Peak memory and time of ``steps`` steady-state training steps of ``plan`` (after one warm-up step).

    Returns a dict with ``measured_peak_allocated_bytes``, ``measured_peak_reserved_bytes``, per-phase peaks
    (``measured_phases``), the bytes held between steps (``measured_steady_bytes``), ``num_alloc_retries``,
    ``num_ooms``, ``step_time_s`` and ``tokens_per_s``; or ``{"error": "oom", ...}`` on a CUDA OOM.
    """
    device = device or torch.device("cuda", torch.cuda.current_device())
    model = optimizer = batch = None
    try:
        model = recipe.build_model(spec, plan, device=device, mesh=mesh)
        optimizer = recipe.build_optimizer(model, plan)
        scaler = torch.amp.GradScaler(device.type) if plan.precision == "amp-fp16" else None
        batch = recipe.make_batch(spec, plan, device)
        recipe.train_step(model, optimizer, batch, plan, scaler=scaler)
        torch.cuda.synchronize(device)
        gc.collect()
        torch.cuda.reset_peak_memory_stats(device)
        steady = torch.cuda.memory_allocated(device)
        categories = {"parameters": _tensor_bytes([*model.parameters(), *model.buffers()]),
                      "optimizer_states": _tensor_bytes([v for st in optimizer.state.values() for v in st.values()])}
        phases = {p.value: 0 for p in Phase}
        state = {"phase": None, "reserved": 0}

        def mark(phase: str) -> None:
            torch.cuda.synchronize(device)
            if state["phase"] is not None:
                phases[state["phase"]] = max(phases[state["phase"]], torch.cuda.max_memory_allocated(device))
            state["reserved"] = max(state["reserved"], torch.cuda.max_memory_reserved(device))
            state["phase"] = None if phase == "end" else phase
            torch.cuda.reset_peak_memory_stats(device)

        start = time.perf_counter()
        for _ in range(steps):
            recipe.train_step(model, optimizer, batch, plan, scaler=scaler, on_phase=mark)
        torch.cuda.synchronize(device)
        elapsed = (time.perf_counter() - start) / steps
        stats = torch.cuda.memory_stats(device)
        nvml_used = _nvml_used_bytes(device)
        return {
            "measured_categories": categories,
            "nvml_used_bytes": nvml_used,
            "reserved_at_nvml_read_bytes": torch.cuda.memory_reserved(device),
            "measured_peak_allocated_bytes": max(phases.values()),
            "measured_peak_reserved_bytes": state["reserved"],
            "measured_phases": phases,
            "measured_steady_bytes": steady,
            "num_alloc_retries": stats.get("num_alloc_retries", 0),
            "num_ooms": stats.get("num_ooms", 0),
            "step_time_s": elapsed,
            "tokens_per_s": plan.batch_size * plan.seq_len / elapsed,
        }
    except torch.OutOfMemoryError as e:
        return {"error": "oom", "message": str(e).splitlines()[0],
                "measured_peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
                "measured_peak_reserved_bytes": torch.cuda.max_memory_reserved(device)}
    finally:
        del model, optimizer, batch
        gc.collect()
        torch.cuda.empty_cache()


def _tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages on the GPU behind ``tensors`` (local shards for DTensors)."""
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        t = getattr(t, "_local_tensor", t)
        if t.device.type != "cuda":
            continue
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def _nvml_used_bytes(device: torch.device) -> int | None:
    """Memory in use on the device as the driver sees it (all processes), or None without NVML."""
    try:
        return int(torch.cuda.device_memory_used(device))
    except Exception:  # noqa: BLE001 - NVML is optional; any failure means "not available"
        return None

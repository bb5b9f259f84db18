"""Memory that the training step does not allocate itself but that still counts against the GPU.

* cuBLAS workspaces: PyTorch allocates one per (handle, stream) inside its caching allocator, so they show in
  ``max_memory_allocated``. A training step uses two handles (the forward runs on the main thread, autograd's
  backward on its device thread). Size per handle (``aten/src/ATen/cuda/CublasHandlePool.cpp``,
  ``getChosenWorkspaceSize``): 32 MiB on compute capability 9.x (``:4096:8``), 8 MiB + 128 KiB elsewhere
  (``:4096:2:16:8``). Measured on an H200: 64 MiB after one forward/backward (``bench/results/accuracy.jsonl``,
  ``workspace_bytes_before``).
* Outside PyTorch's pool (CUDA context, loaded kernels, NCCL buffers): NVML's used memory minus
  ``memory_reserved``, read after the steps of each configuration of the accuracy grid on an H200
  (``bench/results/raw/*.jsonl``, ``nvml_used_bytes - reserved_at_nvml_read_bytes``): 1.349-1.357 GiB for one
  process (35 configurations), 2.176-2.180 GiB per rank with NCCL (FSDP2, 2 GPUs, 9 configurations). The largest
  value is used for every GPU; a card with fewer multiprocessors than the H200's 132 loads less, so this errs on
  the safe side.
"""

from __future__ import annotations

from memtune.units import GiB, KiB, MiB

CUBLAS_HANDLES_PER_STEP = 2
CONTEXT_BYTES = int(1.36 * GiB)
CONTEXT_WITH_NCCL_BYTES = int(2.18 * GiB)


def cublas_workspace_bytes(compute_capability: tuple[int, int]) -> int:
    per_handle = 32 * MiB if compute_capability[0] >= 9 else 2 * 4096 * KiB + 8 * 16 * KiB
    return CUBLAS_HANDLES_PER_STEP * per_handle


def runtime_overhead_bytes(process_group: bool) -> int:
    """``Plan.has_process_group``: NCCL adds its buffers to the CUDA context."""
    return CONTEXT_WITH_NCCL_BYTES if process_group else CONTEXT_BYTES

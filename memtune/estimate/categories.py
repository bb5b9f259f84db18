"""The one vocabulary of memory categories and step phases, shared by estimates and measurements."""

from __future__ import annotations

from enum import StrEnum


class MemCategory(StrEnum):
    PARAMETERS = "parameters"
    """Weights held by this rank: full, sharded (FSDP) or quantized; frozen ones included."""
    GRADIENTS = "gradients"
    """``.grad`` of the trainable parameters (sharded under FSDP)."""
    OPTIMIZER_STATES = "optimizer_states"
    """AdamW exp_avg/exp_avg_sq (or 8-bit states); none for plain SGD."""
    ACTIVATIONS = "activations"
    """Tensors the forward saves for backward (and recomputed ones under checkpointing)."""
    LOGITS = "logits_loss"
    """b x s x vocab tensors: logits, their fp32 upcast, log-softmax and their gradients."""
    TEMPORARIES = "temporaries"
    """Short-lived buffers: intermediate results, foreach optimizer temporaries, dequantized weights."""
    FSDP_BUFFERS = "fsdp_buffers"
    """FSDP2 unsharded parameters, all-gather and reduce-scatter buffers."""
    WORKSPACE = "cuda_workspace"
    """cuBLAS/cuBLASLt workspaces that PyTorch allocates inside its own memory pool."""
    ALLOCATOR_CACHE = "allocator_cache"
    """Reserved but not allocated: the caching allocator's rounding and fragmentation."""
    RUNTIME = "runtime_overhead"
    """Outside PyTorch's pool: CUDA context, kernels, NCCL buffers."""


class Phase(StrEnum):
    FORWARD = "forward"
    BACKWARD = "backward"
    OPTIMIZER_STEP = "optimizer_step"


# Categories that make up PyTorch's peak *allocated* bytes (the rest are reserved or outside the pool).
ALLOCATED_CATEGORIES = tuple(c for c in MemCategory if c not in (MemCategory.ALLOCATOR_CACHE, MemCategory.RUNTIME))


class Verdict(StrEnum):
    """Whether a plan's step fits the card (``MemoryBreakdown.verdict``)."""

    FITS = "fits"
    """The allocator's pool fits with the safety margin to spare, with no pressure on the allocator."""
    BORDERLINE = "borderline"
    """It fits only once the allocator releases its cache under pressure, or only without the margin."""
    DOES_NOT_FIT = "does not fit"
    """Out of memory even after the allocator releases its cache."""

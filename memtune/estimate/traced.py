"""What a trace of the training step leaves (``memtune.estimate.trace``), in types that need no torch: a cached
trace is read back and composed into an estimate without importing it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from memtune.estimate.categories import MemCategory, Phase


@dataclass(frozen=True, slots=True)
class PhasePeak:
    total: int
    by_category: dict[MemCategory, int]


class OpRecord(NamedTuple):
    """One op of the traced step, as the step-time model needs it."""

    micro_batch: int
    """0 for the first micro-batch's forward and backward (and the optimizer step), 1 for the second."""
    phase: str
    layer: int | None
    kind: str
    """``mm`` (matmuls), ``gmm`` (grouped matmuls: a mixture-of-experts' tokens times their experts' weights),
    ``attn`` / ``attn_bwd`` (fused causal attention forward / backward), ``attn_masked`` / ``attn_masked_bwd``
    (fused attention given an explicit mask, e.g. a sliding window shorter than the sequence), ``mem`` (any other
    kernel:
    element-wise, reductions, copies, foreach and fused optimizer ops), ``view`` (no kernel: views, metadata),
    ``comm`` (collectives), ``frame`` (a checkpointed region is entered: no kernel, host work), ``region`` (a
    selectively recomputed region, ``recipe.recompute``, is entered: no kernel, host work) and from the k-bit
    stand-ins (``memtune.train.quant``): ``sync`` (the host waits for the GPU: bitsandbytes reads a result back),
    ``kbit`` / ``kbit_bwd`` (a call into a bitsandbytes layer's forward - the module and its autograd function - or
    into the function's backward: host work), ``kbit8_tail`` (LLM.int8's Python path from its second sync to its
    product: host work the GPU waits for), ``mm8`` (an int8
    matmul), ``nf4`` / ``q8`` / ``dq8`` (bitsandbytes' NF4 dequantization, int8 quantization, int32 product's
    dequantization) and ``cast`` (PyTorch's non-vectorized casts)."""
    flops: float
    bytes: int
    """Bytes read and written (inputs plus outputs; for attention, q, k, v and the output)."""
    itemsize: int
    """Bytes per element of the op's first floating-point input (picks the matmul rate)."""
    tensors: int
    """Tensors a foreach op works on (1 for others)."""
    selective: bool
    """Dispatched through selective checkpointing's modes (host work per op)."""


@dataclass(frozen=True, slots=True, eq=False)
class TraceResult:
    num_layers: int
    peak_reserved: int
    """Peak of the caching allocator model's reserved bytes over the whole trace."""
    landmarks: dict[tuple[Phase, str], PhasePeak]
    """Peak of each (phase, segment): segments are ``pre`` (embeddings), ``first``/``mid``/``last`` decoder
    layer (by layer index) and ``post`` (final norm, lm_head, loss). Each is linear in the number of layers."""
    events: tuple[tuple[int, int, int, str], ...] = ()
    """Every allocation (1) and free (0) as ``(op, id, bytes, stream)``, to replay under a smaller card's capacity."""
    host_resident: frozenset[int] = frozenset()
    """Ids of the events' storages FSDP2's CPU offload keeps on the host: weights and optimizer states, and whatever
    the optimizer step allocates (it runs on the CPU)."""
    gradients: frozenset[int] = frozenset()
    """Ids of the gradient (shard) storages: under CPU offload they pass through the device, copied to the host as
    soon as they are reduced."""
    per_layer: dict[tuple[Phase, str], dict[MemCategory, int]] | None = None
    """At each landmark, the bytes one more period of decoder layers would add: what is live there of the layers
    farthest from the running one (the last ones before they run, the first ones after; FSDP2's prefetch and the
    running layer's own memory stay with the layers the trace has)."""
    period: int = 1
    """Layers per repetition of the stack's layer types (``ModelSpec.layer_period``): ``per_layer`` is one period's
    bytes."""
    ops: tuple[OpRecord, ...] = ()
    """What the traced step runs, op by op in order, for its time (``memtune.planner.steptime``)."""

    def phase_peak(self, phase: Phase) -> int:
        return max((v.total for (p, _), v in self.landmarks.items() if p == phase), default=0)

"""Trace one training step of the real model code on fake tensors and record what it allocates.

The model is built from its config with a reduced number of decoder layers, materialized under ``FakeTensorMode`` on
the CPU (no weights, no GPU), and run for a warm-up step that creates the optimizer states
(``memtune.train.recipe.train_step``, or a quick one from zero gradients) and the traced step. A
``TorchDispatchMode`` sees every tensor an op creates; a weak reference to its storage tells when it is freed. Sizes
are replayed through a model of the CUDA caching allocator (``memtune.estimate.allocator``), which also gives the
reserved bytes. FSDP2 plans run with the ``fake`` process group of the plan's world size; FSDP2 allocates and frees
unsharded parameters by resizing storages, which the tracer follows by wrapping ``alloc_storage``/``free_storage``.

At the end each storage gets a category (``MemCategory``) and the peak of each phase of the second step is split
into categories.

Known limitations: the trace runs CPU kernels, so device-specific choices are modelled explicitly (the foreach
AdamW that CUDA picks by default; autocast follows the CPU policy, which casts matmuls like the CUDA one; the
workspaces CUDA kernels allocate inside an op, ``cuda_workspace_bytes``); temporaries created inside DTensor's own
dispatch are not seen; bitsandbytes is replaced by the memory-equivalent stand-ins of ``memtune.train.quant``.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from memtune.estimate.allocator import Block, CachingAllocatorModel
from memtune.estimate.categories import MemCategory, Phase
from memtune.estimate.traced import OpRecord, PhasePeak, TraceResult
from memtune.plan import Plan
from memtune.specs.model import ModelSpec
from memtune.train import quant, recipe


@dataclass(slots=True, eq=False)
class _Storage:
    block: Block | None
    uid: int
    phase: str
    category: MemCategory | None = None
    freed_in: str | None = None
    layer: int | None = None
    """The decoder layer it belongs to: the one that owns the weight (its gradient, its optimizer states), or the
    one running when it was made; None outside the layers."""

    @property
    def size(self) -> int:
        return self.block.size if self.block is not None else 0


class _Tracker(TorchDispatchMode):
    """Sees every tensor an op creates, books its storage into the caching-allocator model, frees it when the
    storage dies, and keeps, for each (phase, segment), the live storages at its highest point."""

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True  # skips a plain mode's per-op compile checks, several times the cost of the op on fake tensors

    def __init__(self, vocab_size: int, logits_numel: int, *, expandable_segments: bool = False):
        super().__init__()
        self.vocab_size, self.logits_numel = vocab_size, logits_numel
        self.live: dict[int, _Storage] = {}
        self._refs: dict[int, weakref.ref] = {}
        self.allocator = CachingAllocatorModel(expandable=expandable_segments)
        self.events: list[tuple[int, int, int, str]] = []
        self._uids = itertools.count()
        self.phase = "setup"
        self.stream = "default"
        self.segment = "pre"
        self.recording = False
        self.peaks: dict[tuple[str, str], int] = {}
        self.snapshots: dict[tuple[str, str], list[tuple[_Storage, int]]] = {}
        self.forward_records: list[_Storage] = []
        self.records: list[_Storage] = []
        self.layer: int | None = None
        self.owners: dict[int, int] = {}  # id(weight storage) -> its decoder layer
        self.ops: list[OpRecord] = []
        self.micro_batch = -1

    # --- bookkeeping -------------------------------------------------------------------------------------
    def track(self, t: torch.Tensor, category: MemCategory | None = None, layer: int | None = None) -> None:
        if not isinstance(t, torch.Tensor):
            return
        t = _local(t)
        st = t.untyped_storage()
        key = id(st)
        rec = self.live.get(key)
        if rec is not None:
            if category is not None and rec.category is None:
                rec.category = category
            if layer is not None:
                rec.layer = layer
            return
        if category is None and t.dim() >= 2 and t.shape[-1] == self.vocab_size and t.numel() >= self.logits_numel:
            category = MemCategory.LOGITS
        uid = next(self._uids)
        owner = layer if layer is not None else self.owners.get(key, self.layer)
        rec = _Storage(block=self._malloc(st.nbytes(), uid), uid=uid, phase=self.phase, category=category,
                       layer=owner)
        self.records.append(rec)
        self.live[key] = rec
        self._refs[key] = weakref.ref(st, lambda _r, k=key: self._free(k))
        self._add()
        if self.phase == Phase.FORWARD:
            self.forward_records.append(rec)

    def resized(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        rec = self.live.get(id(st))
        if rec is None:
            self.track(t, MemCategory.FSDP_BUFFERS)
            return
        rec.category = rec.category or MemCategory.FSDP_BUFFERS
        self._release(rec)
        rec.block = self._malloc(st.nbytes(), rec.uid)
        self._add()

    def _malloc(self, nbytes: int, uid: int) -> Block | None:
        if nbytes == 0:
            return None
        self.events.append((1, uid, nbytes, self.stream))
        return self.allocator.malloc(nbytes, self.stream)

    def _release(self, rec: _Storage) -> None:
        if rec.block is not None:
            self.events.append((0, rec.uid, 0, ""))
            self.allocator.free(rec.block)
            rec.block = None

    def _free(self, key: int) -> None:
        rec = self.live.pop(key, None)
        self._refs.pop(key, None)
        if rec is not None:
            self._release(rec)
            rec.freed_in = self.phase

    def _add(self) -> None:
        total = self.allocator.allocated
        key = (self.phase, self.segment)
        if self.recording and total > self.peaks.get(key, -1):
            self.peaks[key] = total
            self.snapshots[key] = [(r, r.size) for r in self.live.values()]

    def set_segment(self, segment: str, layer: int | None = None) -> None:
        self.segment, self.layer = segment, layer
        self._add()

    def layer_of(self, t: torch.Tensor) -> int | None:
        """The layer of the storage behind ``t`` (a weight, or anything tracked), if known."""
        key = id(_local(t).untyped_storage())
        rec = self.live.get(key)
        return rec.layer if rec is not None else self.owners.get(key)

    def set_phase(self, phase: str) -> None:
        if phase == Phase.FORWARD and self.recording:
            self.micro_batch += 1
        if phase == Phase.BACKWARD:
            # Everything the forward made and still holds is saved for backward.
            for rec in self.forward_records:
                if rec.freed_in is None and rec.category is None:
                    rec.category = MemCategory.ACTIVATIONS
            self.forward_records = []
        self.phase = phase
        # The loss is computed at the end of the forward; the backward starts there too.
        self.segment = "post" if phase == Phase.BACKWARD else "pre"
        self.layer = None
        if phase != "end":
            self._add()

    def transient(self, nbytes: int) -> None:
        """A workspace allocated and freed inside one op, after its outputs (see ``cuda_workspace_bytes``)."""
        uid = next(self._uids)
        key = -1 - uid  # no storage's id is negative
        self.live[key] = _Storage(block=self._malloc(nbytes, uid), uid=uid, phase=self.phase,
                                  category=MemCategory.TEMPORARIES)
        self._add()
        self._free(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        comm = func.namespace in ("fsdp", "c10d", "_c10d_functional")
        category = MemCategory.FSDP_BUFFERS if comm else None
        outs = tree_flatten(out)[0]
        made = len(self.records)
        # A foreach op makes one output per weight (e.g. the optimizer's temporaries): each belongs to that weight's
        # layer.
        foreach = func.__name__.startswith("_foreach_") and args and isinstance(args[0], (list, tuple))
        weights = args[0] if foreach else ()
        for i, t in enumerate(outs):
            like = weights[i] if i < len(weights) else None
            self.track(t, category, layer=self.layer_of(like) if isinstance(like, torch.Tensor) else None)
        workspace = cuda_workspace_bytes(func, args)
        if workspace:
            self.transient(workspace)
        if self.recording:
            self.ops.append(self._op_record(func, args, kwargs, outs, comm, new_storage=len(self.records) > made))
        return out

    def _op_record(self, func, args, kwargs, outs, comm: bool, new_storage: bool) -> OpRecord:
        name, kind, foreach, mutable, written = _op_info(func)
        selective = recipe.in_selective_region()
        if comm:
            return OpRecord(self.micro_batch, self.phase, self.layer, "comm", 0.0, 0, 4, 1, selective)
        if kind is None and not (new_storage or mutable):
            kind = "view"
        if kind in ("view", "no kernel"):
            return OpRecord(self.micro_batch, self.phase, self.layer, "view", 0.0, 0, 4, 1, selective)
        inputs = _tensors(args)
        floating = next((t for t in inputs if t.is_floating_point()), None)
        itemsize = floating.element_size() if floating is not None else 4
        if kind in ("attn", "attn_bwd"):
            q, k = (args[1], args[2]) if kind == "attn_bwd" else (args[0], args[1])
            b, h, s, d = q.shape
            flops = 4.0 * b * h * s * k.shape[-2] * d  # QK^T and PV
            if (kwargs or {}).get("attn_mask") is None:
                flops /= 2  # causal: the kernel skips the blocks above the diagonal
            else:  # a masked kernel (cuDNN's or the memory-efficient one; flash takes no mask) runs every block
                kind = "attn_masked" if kind == "attn" else "attn_masked_bwd"
            nbytes = sum(t.numel() * t.element_size() for t in inputs[:3]) * 2
            return OpRecord(self.micro_batch, self.phase, self.layer, kind, flops, nbytes, itemsize, 1, selective)
        flops = _matmul_flops(name, args, outs) if kind in ("mm", "gmm") else 0.0
        writes = [t for t in outs if isinstance(t, torch.Tensor)]
        if not writes:  # an in-place op that returns nothing (foreach, fused optimizers) writes its mutated inputs
            kwargs = kwargs or {}
            if name.startswith("_fused_adam") and kwargs.get("grad_scale") is None:
                written = tuple(i for i in written if i != 1)  # the gradients: unscaled in place under a GradScaler
            writes = _tensors([args[i] if i < len(args) else kwargs.get(func._schema.arguments[i].name)
                               for i in written])
        nbytes = sum(t.numel() * t.element_size() for t in inputs) + sum(t.numel() * t.element_size() for t in writes)
        tensors = len(args[0]) if foreach and args and isinstance(args[0], (list, tuple)) else 1
        return OpRecord(self.micro_batch, self.phase, self.layer, kind or "mem", flops, nbytes, itemsize, tensors,
                        selective)

    def note(self, kind: str, flops: float, nbytes: int, itemsize: int = 2) -> None:
        """A kernel a stand-in stands for (``memtune.train.quant``): its FLOPs and bytes, for the step time."""
        if self.recording:  # a note without a kernel (bitsandbytes' Python layer, a sync) is no dispatched op
            selective = recipe.in_selective_region() and kind not in ("kbit", "kbit_bwd", "kbit8_tail", "sync")
            self.ops.append(OpRecord(self.micro_batch, self.phase, self.layer, kind, flops, nbytes, itemsize, 1,
                                     selective))

    # --- result ------------------------------------------------------------------------------------------
    def result(self, num_layers: int, period: int = 1) -> TraceResult:
        landmarks, per_layer = {}, {}
        for (phase, segment), total in self.peaks.items():
            if phase not in tuple(Phase):
                continue
            by_cat = {c: 0 for c in MemCategory}
            far = set(_far_layers(Phase(phase), segment, num_layers, period))
            slope = {c: 0 for c in MemCategory}
            for rec, size in self.snapshots[(phase, segment)]:
                by_cat[rec.category or MemCategory.TEMPORARIES] += size
                if rec.layer in far:
                    slope[rec.category or MemCategory.TEMPORARIES] += size
            landmarks[(Phase(phase), segment)] = PhasePeak(total=total, by_category=by_cat)
            per_layer[(Phase(phase), segment)] = slope
        host = (MemCategory.PARAMETERS, MemCategory.OPTIMIZER_STATES)
        gradients = frozenset(r.uid for r in self.records if r.category == MemCategory.GRADIENTS)
        host_resident = frozenset(r.uid for r in self.records if r.uid not in gradients
                                  and (r.category in host or r.phase == Phase.OPTIMIZER_STEP))
        return TraceResult(num_layers=num_layers, peak_reserved=self.allocator.peak_reserved, landmarks=landmarks,
                           events=tuple(self.events), host_resident=host_resident, gradients=gradients,
                           per_layer=per_layer, period=period, ops=tuple(self.ops))


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose storage holds ``t``'s data on this rank: a DTensor's local shard, or ``t`` itself."""
    local = getattr(t, "_local_tensor", None)
    return local if local is not None else t


_MATMULS = frozenset({"mm", "addmm", "bmm", "baddbmm"})
_NO_KERNEL = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh",
                        "set_", "resize_", "_has_compatible_shallow_copy_type"})
_ATTENTION = frozenset({"_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"})
_ATTENTION_BACKWARD = frozenset({f"{n}_backward" for n in _ATTENTION})


@functools.cache
def _op_info(func) -> tuple[str, str | None, bool, bool, tuple[int, ...]]:
    """(name, kind where the op alone decides it, foreach, mutates an input, positions of the arguments it writes)
    of an ATen op, once per op."""
    name = func.__name__.split(".")[0]
    kind = ("mm" if name in _MATMULS else "gmm" if name == "_grouped_mm" else "attn" if name in _ATTENTION
            else "attn_bwd" if name in _ATTENTION_BACKWARD
            else "no kernel" if func.is_view or name in _NO_KERNEL else None)
    written = tuple(i for i, a in enumerate(func._schema.arguments)
                    if a.alias_info is not None and a.alias_info.is_write)
    return name, kind, name.startswith(("_foreach_", "_fused_")), func._schema.is_mutable, written


def _tensors(args) -> list[torch.Tensor]:
    """The tensors among an op's arguments, those in lists (foreach ops) included."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(t for t in a if isinstance(t, torch.Tensor))
    return out


def _matmul_flops(name: str, args, outs) -> float:
    """2 m n k (times the batch of a batched matmul): the output's elements times twice the inner dimension. A
    grouped matmul (mixture-of-experts: each token's rows times its expert's weight) that makes one matrix per group
    (the weights' gradient) sums over the groups' rows once, not once per group."""
    a = args[1] if name in ("addmm", "baddbmm") else args[0]
    out = outs[0]
    flops = 2.0 * out.numel() * a.shape[-1]
    if name == "_grouped_mm" and out.dim() == 3 and a.dim() == 2:
        flops /= out.shape[0]
    return flops


def _checkpoint_frames(tracker: _Tracker, model) -> None:
    """Record each entry into a checkpointed or recomputed region (host work the step-time model counts)."""
    def record(kind):
        return lambda m, args: tracker.ops.append(OpRecord(tracker.micro_batch, tracker.phase, tracker.layer,
                                                           kind, 0.0, 0, 0, 1, False)) if tracker.recording else None

    for module in model.modules():
        if type(module).__name__ == "CheckpointWrapper":
            module.register_forward_pre_hook(record("frame"))
        elif getattr(module, recipe.RECOMPUTED, False):
            module.register_forward_pre_hook(record("region"))


def _far_layers(phase: Phase, segment: str, num_layers: int, period: int) -> range:
    """An inner period of layers (not the first or the last, whose inputs or outputs differ) away from where
    ``segment`` is in the order the phase runs the layers: the later one when the landmark comes at the start of
    the phase, the earlier one when it comes at the end (a depth of four periods keeps either clear of the running
    layer and of the one FSDP2 prefetches)."""
    early, late = range(period, 2 * period), range(num_layers - 2 * period, num_layers - period)
    if phase == Phase.FORWARD:
        return late if segment in ("pre", "first") else early
    if phase == Phase.BACKWARD:  # runs the layers from the last to the first
        return early if segment in ("post", "last") else late
    return early  # the optimizer step: every layer alike


def cuda_workspace_bytes(func, args) -> int:
    """Bytes the CUDA kernel of ``func`` allocates and frees inside the op beyond its outputs, where the CPU kernel
    the trace runs does not (measured op by op on an H200 by ``bench/op_memory.py``:
    ``bench/results/op_memory/v100-amp-fp16-ac-4096.txt``, math SDPA in amp-fp16 at 4,096 tokens, 2 and 0.5 GiB):

    * ``_softmax_backward_data``: ``tmp = grad * output`` before the reduction (``softmax_backward_cuda_out`` in
      ``aten/src/ATen/native/cuda/SoftMax.cu``), the size of the gradient in the promoted dtype. Eager attention
      and math SDPA both differentiate their softmax with it; flash and memory-efficient SDPA do not.
    * ``_safe_softmax`` (math SDPA's softmax): the mask of fully masked rows, one byte per element.
    """
    if func is torch.ops.aten._softmax_backward_data.default:
        grad, output = args[0], args[1]
        return grad.numel() * torch.promote_types(grad.dtype, output.dtype).itemsize
    if func is torch.ops.aten._safe_softmax.default:
        return args[0].numel()
    return 0


def _owners(tracker: _Tracker, model) -> None:
    """Which decoder layer each weight's storage belongs to."""
    from memtune.specs.model import decoder_layers

    shared = set()
    for i, layer in enumerate(decoder_layers(model)):
        for t in [*layer.parameters(), *layer.buffers()]:  # buffers: k-bit weights' quantization constants
            key = id(_local(t).untyped_storage())
            if tracker.owners.setdefault(key, i) != i:
                shared.add(key)
    for key in shared:  # a storage more than one layer holds belongs to none of them
        del tracker.owners[key]


def _segment_hooks(tracker: _Tracker, model) -> None:
    """Mark where each decoder layer's forward and backward start, so peaks are kept per layer position."""
    from memtune.specs.model import decoder_layers

    layers = decoder_layers(model)
    last = len(layers) - 1

    def name(i: int) -> str:
        return "first" if i == 0 else "last" if i == last else "mid"

    for i, layer in enumerate(layers):
        def pre(module, args, kwargs, i=i):
            if tracker.phase != Phase.FORWARD:
                return
            tracker.set_segment(name(i), i)
            hidden = args[0] if args else kwargs.get("hidden_states")
            if i == 0 and isinstance(hidden, torch.Tensor) and hidden.requires_grad:
                hidden.register_hook(lambda g: tracker.set_segment("pre"))

        def post(module, args, kwargs, output, i=i):
            if tracker.phase != Phase.FORWARD:
                return
            if i == last:
                tracker.set_segment("post", None)
            else:
                tracker.set_segment(name(i + 1), i + 1)
            out = output[0] if isinstance(output, tuple) else output
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(lambda g: tracker.set_segment(name(i), i))

        layer.register_forward_pre_hook(pre, with_kwargs=True)
        layer.register_forward_hook(post, with_kwargs=True)


@contextlib.contextmanager
def _fsdp_storage_hooks(tracker: _Tracker):
    from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group

    orig_alloc, orig_free = _fsdp_param.alloc_storage, _fsdp_param.free_storage

    def alloc(t):
        orig_alloc(t)
        tracker.resized(t)

    def free(t):
        orig_free(t)
        tracker.resized(t)

    # FSDP2 runs all-gathers and reduce-scatters under ``device_handle.stream(s)`` on their own CUDA streams, and
    # the caching allocator pools each stream's blocks apart. On the CPU that context is a no-op; the tracer uses it
    # to know which stream an allocation belongs to.
    streams: dict[int, str] = {}

    @contextlib.contextmanager
    def stream(s):
        previous = tracker.stream
        tracker.stream = streams.setdefault(id(s), f"stream{len(streams)}")
        try:
            yield
        finally:
            tracker.stream = previous

    patched = [(_fsdp_param, "alloc_storage", alloc), (_fsdp_param, "free_storage", free),
               (_fsdp_param_group, "alloc_storage", alloc), (torch.cpu, "stream", stream)]
    saved = [(m, n, getattr(m, n)) for m, n, _ in patched if hasattr(m, n)]
    for m, n, f in patched:
        if hasattr(m, n):
            setattr(m, n, f)
    try:
        yield
    finally:
        for m, n, f in saved:
            setattr(m, n, f)


@contextlib.contextmanager
def _collect_only_the_trace():
    """Python's cyclic collector skips what existed before the trace (the imported libraries and their caches,
    hundreds of thousands of objects it would otherwise walk on each full collection the trace's many small
    objects trigger: a fifth of a cold trace's time); what the trace makes is collected as usual."""
    if gc.get_freeze_count():  # the caller froze the heap already (and will unfreeze it)
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def _fake_process_group(plan: Plan):
    """A ``fake`` process group of the plan's world size (rank 0) and the FSDP mesh, or nothing without FSDP."""
    if plan.sharding == "none":
        yield None
        return
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialized; trace FSDP plans in a separate process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=plan.world_size)
    try:
        if plan.sharding == "hsdp":
            mesh = init_device_mesh("cpu", (plan.nodes, plan.num_gpus), mesh_dim_names=("replicate", "shard"))
        else:
            mesh = init_device_mesh("cpu", (plan.world_size,))
        yield mesh
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _cuda_kernel_choices(sdpa_backend: str):
    """Make CPU kernels allocate what the CUDA kernels of the real step allocate.

    * Dropout: CUDA runs the fused ``native_dropout`` and saves a 1-byte mask; the CPU path saves a noise tensor
      in the input's dtype. The trace calls ``native_dropout`` (same autograd formula as on CUDA).
    * SDPA: the CPU flash kernel saves what CUDA's flash and memory-efficient kernels save (output and
      log-sum-exp). Where CUDA falls back to the math kernel (see ``sdpa_backend``), the trace does too.
    * Packed-sequence detection: transformers looks at the position ids to tell whether a batch is packed; on fake
      tensors it cannot read them and assumes it is, building a full attention mask (and repeating K/V for grouped
      attention). The trace's batches are plain padded sequences, so the detection answers "not packed".
    """
    from torch.nn import functional
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import masking_utils

    original = functional.dropout
    original_packed = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = lambda position_ids: None

    def fused_dropout(input, p=0.5, training=True, inplace=False):
        if not training or p == 0.0:
            return input
        return torch.ops.aten.native_dropout(input, p, True)[0]

    functional.dropout = fused_dropout
    try:
        with sdpa_kernel(SDPBackend.MATH) if sdpa_backend == "math" else contextlib.nullcontext():
            yield
    finally:
        functional.dropout = original
        masking_utils.find_packed_sequence_indices = original_packed


def trace_step(spec: ModelSpec, plan: Plan, num_layers: int, *, sdpa_backend: str = "flash",
               quick_warmup: bool = False) -> TraceResult:
    """Per-phase peak bytes (allocator-rounded) of one steady-state training step of a ``num_layers`` model.

    ``sdpa_backend`` is the kernel CUDA would pick for this GPU and plan (``flash``, ``efficient`` or ``math``).
    Every storage is attributed to a decoder layer (``TraceResult.per_layer``), so that the fast estimate can add
    layers to a four-layer trace. The traced step follows a warm-up step that creates the optimizer states, as in a
    real run; ``quick_warmup``
    creates them from zero gradients instead (half the tracing time; the allocator's cache then takes a different
    shape, so only the screening estimates use it). With gradient accumulation the traced step is two micro-batches
    (gradients held across the second's forward); under ``quick_warmup`` the warm-up's zero gradients are kept
    and stand for the first micro-batch's, so one micro-batch is traced.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    tokens = plan.batch_size * plan.seq_len
    tracker = _Tracker(spec.vocab_size, logits_numel=tokens * spec.vocab_size // 2,
                       expandable_segments=plan.expandable_segments)
    with _collect_only_the_trace(), _fake_process_group(plan) as mesh:
        model = recipe.build_model(spec, plan, device="meta", num_layers=num_layers, mesh=mesh, emulate_quant=True)
        with FakeTensorMode(allow_non_fake_inputs=True):
            model.to_empty(device="cpu")
            _retie(model)
            with tracker, _fsdp_storage_hooks(tracker), _cuda_kernel_choices(sdpa_backend), quant.kernel_notes(tracker.note):
                _owners(tracker, model)
                for t in [*model.parameters(), *model.buffers()]:
                    tracker.track(t, MemCategory.PARAMETERS)
                optimizer = recipe.build_optimizer(model, plan, foreach=True, emulate_8bit=True)
                batch = recipe.make_batch(spec, plan, "cpu")
                mark = _phase_marker(tracker, model, optimizer)
                _segment_hooks(tracker, model)
                _checkpoint_frames(tracker, model)
                micro_batches = min(plan.grad_accum, 2)
                if quick_warmup:
                    for p in model.parameters():
                        if p.requires_grad:
                            p.grad = torch.zeros_like(p)
                            tracker.track(p.grad, MemCategory.GRADIENTS, layer=tracker.layer_of(p))
                    optimizer.step()
                    for p, state in optimizer.state.items():
                        for v in state.values():
                            if isinstance(v, torch.Tensor):
                                tracker.track(v, MemCategory.OPTIMIZER_STATES, layer=tracker.layer_of(p))
                    if micro_batches == 1:
                        optimizer.zero_grad(set_to_none=True)
                    else:
                        micro_batches = 1  # the zero gradients stand for the previous micro-batch's
                else:
                    recipe.train_step(model, optimizer, batch, plan, on_phase=mark, micro_batches=micro_batches)
                tracker.recording = True
                # Two micro-batches (or one over kept gradients) show everything more would: gradients held
                # across the next forward.
                recipe.train_step(model, optimizer, batch, plan, on_phase=mark, micro_batches=micro_batches)
    return tracker.result(num_layers, spec.layer_period)


def _phase_marker(tracker: _Tracker, model, optimizer):
    def mark(phase: str) -> None:
        if phase == Phase.OPTIMIZER_STEP:
            for p in model.parameters():
                if p.grad is not None:
                    tracker.track(p.grad, MemCategory.GRADIENTS, layer=tracker.layer_of(p))
        if phase == "end":
            for p, state in optimizer.state.items():
                for v in state.values():
                    if isinstance(v, torch.Tensor):
                        tracker.track(v, MemCategory.OPTIMIZER_STATES, layer=tracker.layer_of(p))
        tracker.set_phase(phase)

    return mark


def _retie(model) -> None:
    """``to_empty`` materializes each module's parameters separately, which unties shared weights."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "tie_word_embeddings", False):
        base.tie_weights()

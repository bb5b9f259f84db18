"""A training step's time from its trace: every op the fake-tensor trace saw gets a GPU time and a host time.

The trace (``memtune.estimate.trace.OpRecord``) lists every op of one micro-batch's forward and backward
(recomputation included) and of the optimizer step, in order, with its FLOPs and the bytes it reads and writes.

GPU time of an op (the roofline of PyTorch's ``torch.distributed._tools.runtime_estimator``, with efficiencies
measured on an H200 by ``bench/timing.py kernels`` and fitted by ``bench/step_time.py``):

* matmuls: ``t0 + flops / (peak(dtype) x e_max)``, at least their bytes over the bandwidth: a product pays a fixed
  time (tiles, waves, the launch) and then runs at a share of the dtype's peak;
* fused attention: the same form with its own ``e_max`` and ``t0``, backward ``attn_bwd_factor`` times the
  forward's FLOPs; given an explicit mask (a sliding window shorter than the sequence) CUDA runs the
  masked kernel (cuDNN's on the H200, else the memory-efficient one) over every block, with its own
  ``masked_attn_*`` constants;
* grouped matmuls (a mixture-of-experts' tokens times their experts' weights): their own ``gmm_e_max``, ``gmm_t0``;
* a matmul whose rows are not 16-byte aligned (LLM.int8's product over its outlier columns): ``mm_unaligned_e_max``;
* every other kernel: ``bytes / (bandwidth x mem_efficiency) + kernel_s`` (``kernel_s x sqrt(n)`` for a foreach op
  over n tensors, which launches several kernels);
* a k-bit layer (bitsandbytes) is the kernels it launches (``memtune.train.quant``): NF4's dequantization and a
  bf16 product; LLM.int8's outlier check, quantization, int8 product (``t = mm8_t0 + flops / (int8 peak x
  mm8_e_max)``), dequantization and casts, and in backward the weight's dequantization and a bf16 product;
  bitsandbytes' memory-bound kernels (NF4's dequantization, LLM.int8's quantization and its product's
  dequantization) and PyTorch's non-vectorized casts (int8 or fp16 into bf16, a bf16 tensor scaled in place by an
  fp32 one) each run at their own share of the bandwidth (``nf4_efficiency``, ``q8_efficiency``,
  ``dq8_efficiency``, ``cast_efficiency``), measured by ``bench/timing.py kernels-kbit``;
* bitsandbytes' 8-bit AdamW: ``elements / adam8bit_rate`` (scaled by bandwidth) and ``adam8bit_tensor_s`` of host
  work per tensor;
* views, collectives (``memtune.planner.cost`` prices communication), checkpoint frames, recomputed regions,
  bitsandbytes' Python layers and syncs: no GPU time.

Host time of an op (Python, autograd, the dispatcher and the launch): ``host_op_s`` per kernel, ``host_view_s`` per
view, ``host_frame_s`` per checkpointed region, ``host_region_s`` per selectively recomputed region (an autograd
node and its backward's re-entry into autograd), ``host_selective_s`` more per op that passes through selective
checkpointing's modes, ``host_tensor_s`` per tensor of a foreach op, ``host_kbit_s`` (``host_kbit8_s``) per
call into a 4-bit (8-bit) layer's forward (bitsandbytes' module, its checks and quantization state, its autograd
function), ``host_kbit_bwd_s`` per call into that function's backward, ``host_kbit8_tail_s`` per LLM.int8 call
from its second sync to its product, and ``sync_s`` per sync (the host's return from the wait); fitted on whole
steps.

The host issues the ops in order and the GPU runs each once it is issued and the previous one is done:
``host += h; gpu = max(gpu, host) + g`` - a step is host-bound where its kernels are short (a 1B model at a few
thousand tokens per micro-batch on an H200 is) and GPU-bound where they are long. At a sync the host waits for the
GPU (``host = max(host, gpu)``), after which the GPU waits for the host's next launch: LLM.int8 syncs twice per
layer call, which makes it pay the host's time in every step however long its kernels. A step is ``grad_accum``
micro-batches and the optimizer step, the last kernel's end. Layers the fast trace leaves out are counted by
repeating an inner period of layers; optimizer ops over all weights grow with the weights they cover.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np

from memtune.plan import Plan
from memtune.specs.gpu import GpuSpec
from memtune.specs.model import ModelSpec

H200_BANDWIDTH_GBS = 4800.0
"""The calibration card's bandwidth: rates measured there scale with a card's bandwidth."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Calibration:
    """The step-time model's constants (see the module docstring); ``profiles/calibration/<GPU>.json`` holds the
    fitted ones under ``step_time``."""

    mm_e_max: float = 0.75
    mm_t0: float = 1.5e-5
    mm_unaligned_e_max: float = 0.15
    attn_e_max: float = 0.6
    attn_t0: float = 2e-5
    attn_bwd_factor: float = 2.5
    masked_attn_e_max: float = 0.3
    masked_attn_t0: float = 2e-5
    masked_attn_bwd_factor: float = 2.5
    gmm_e_max: float = 0.75
    gmm_t0: float = 1.5e-5
    mem_efficiency: float = 0.85
    kernel_s: float = 2.5e-6
    mm8_e_max: float = 0.6
    mm8_t0: float = 2e-5
    nf4_efficiency: float = 0.4
    q8_efficiency: float = 0.25
    dq8_efficiency: float = 0.6
    cast_efficiency: float = 0.25
    adam8bit_rate: float = 33e9
    adam8bit_tensor_s: float = 1e-4
    host_op_s: float = 15e-6
    host_view_s: float = 4e-6
    host_frame_s: float = 3e-4
    host_region_s: float = 5e-5
    host_selective_s: float = 12e-6
    host_tensor_s: float = 2e-6
    host_kbit_s: float = 4e-5
    host_kbit8_s: float = 4e-5
    host_kbit_bwd_s: float = 4e-5
    host_kbit8_tail_s: float = 4e-5
    sync_s: float = 1e-5

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@functools.cache
def calibration(gpu_name: str) -> Calibration:
    """The fitted constants for ``gpu_name``, else the first GPU's that has them (the efficiencies are a proxy
    there: only the H200 was measured), else the defaults."""
    from memtune.profiles import calibrations

    for _, data in calibrations(gpu_name):
        fitted = data.get("step_time")
        if fitted:
            known = {f.name for f in dataclasses.fields(Calibration)}
            return Calibration(**{k: v for k, v in fitted["constants"].items() if k in known})
    return Calibration()


@dataclass(frozen=True, kw_only=True, slots=True)
class StepTime:
    step_s: float
    """One optimizer step: ``grad_accum`` micro-batches and the optimizer step."""
    micro_batch_s: float
    optimizer_s: float
    gpu_s: float
    """GPU time of the step's kernels, busy or not."""
    host_s: float
    """Host time to issue the step."""

    @property
    def host_bound(self) -> bool:
        return self.host_s > self.gpu_s

    def to_json(self) -> dict:
        return {"step_s": self.step_s, "micro_batch_s": self.micro_batch_s, "optimizer_s": self.optimizer_s,
                "gpu_s": self.gpu_s, "host_s": self.host_s}


def _peak_flops(gpu: GpuSpec, plan: Plan, itemsize: int) -> float:
    return gpu.peak_flops("fp32" if itemsize >= 4 else "bf16" if "bf16" in plan.low_precision else "fp16")


_BANDWIDTH_KINDS = {"nf4": "nf4_efficiency", "q8": "q8_efficiency", "dq8": "dq8_efficiency",
                    "cast": "cast_efficiency"}
"""Memory-bound kernels of the k-bit stand-ins (``memtune.train.quant``) with a measured bandwidth share of their
own, by trace kind."""
_TIMED_KINDS = ("view", "frame", "region", "comm", "mm", "mm_unaligned", "gmm", "attn", "attn_bwd", "attn_masked", "attn_masked_bwd",
                "kbit", "kbit_bwd", "kbit8_tail", "mm8", "sync", *_BANDWIDTH_KINDS)
"""The trace's op kinds (``OpRecord.kind``) with a time of their own; every other op is 8-bit AdamW's update of a
tensor (in the optimizer step of an adamw-8bit plan) or an ``other`` kernel, timed by its bytes."""
_CODE = {k: i for i, k in enumerate((*_TIMED_KINDS, "adam8", "other"))}


@dataclass(frozen=True)
class _OpTable:
    """What ``op_times`` needs of each op, as arrays (the calibration is applied to them in one go)."""

    code: np.ndarray
    flops: np.ndarray
    bytes: np.ndarray
    itemsize: np.ndarray
    tensors: np.ndarray
    peak: np.ndarray
    selective: np.ndarray
    repeat: np.ndarray
    opt: np.ndarray


def _op_table(ops, spec: ModelSpec, plan: Plan, gpu: GpuSpec, depth: int, period: int) -> _OpTable:
    n = len(ops)
    code, repeat, opt = np.zeros(n, dtype=np.int64), np.ones(n), np.zeros(n, dtype=bool)
    extra_periods = (spec.num_layers - depth) / period
    inner = range(period, 2 * period)
    weights_scale = _optimizer_scale(spec, plan, depth)
    peaks = {size: _peak_flops(gpu, plan, size) for size in {op.itemsize for op in ops} | {2}}
    peaks["mm8"] = gpu.peak_flops("int8")
    peak = np.zeros(n)
    for i, op in enumerate(ops):
        if op.phase == "optimizer_step":
            opt[i] = True
            repeat[i] = weights_scale
        elif op.layer in inner and extra_periods > 0:
            repeat[i] = 1 + extra_periods
        kind = op.kind
        if kind not in _TIMED_KINDS:
            kind = "adam8" if opt[i] and plan.optimizer == "adamw-8bit" else "other"
        code[i] = _CODE[kind]
        peak[i] = peaks["mm8" if kind == "mm8" else op.itemsize]
    return _OpTable(code=code, flops=np.array([op.flops for op in ops], dtype=float),
                    bytes=np.array([op.bytes for op in ops], dtype=float),
                    itemsize=np.array([op.itemsize for op in ops], dtype=float),
                    tensors=np.array([op.tensors for op in ops], dtype=float), peak=peak,
                    selective=np.array([bool(op.selective) for op in ops]), repeat=repeat, opt=opt)


def op_times(ops, spec: ModelSpec, plan: Plan, gpu: GpuSpec, cal: Calibration, *, depth: int,
             period: int, table: _OpTable | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(host seconds, GPU seconds, repeat, is-optimizer) per op: ``repeat`` counts the op once per layer it stands
    for at the model's full depth. ``table``: ``_op_table`` of the same arguments, made once for many calibrations."""
    t = table if table is not None else _op_table(ops, spec, plan, gpu, depth, period)
    c = {k: t.code == i for k, i in _CODE.items()}
    bandwidth = gpu.bandwidth_gbs * 1e9
    host, gpu_s = np.zeros(len(t.code)), np.zeros(len(t.code))
    host[c["view"]] = cal.host_view_s
    host[c["frame"]] = cal.host_frame_s
    host[c["region"]] = cal.host_region_s
    host[c["comm"]] = cal.host_op_s
    for kind, t0, e_max in (("mm", cal.mm_t0, cal.mm_e_max), ("mm_unaligned", cal.mm_t0, cal.mm_unaligned_e_max),
                            ("gmm", cal.gmm_t0, cal.gmm_e_max)):
        m = c[kind]
        gpu_s[m] = np.maximum(t0 + t.flops[m] / (t.peak[m] * e_max), t.bytes[m] / bandwidth)
        host[m] = cal.host_op_s
    for kind, t0, e_max, factor in (
            ("attn", cal.attn_t0, cal.attn_e_max, 1.0), ("attn_bwd", cal.attn_t0, cal.attn_e_max, cal.attn_bwd_factor),
            ("attn_masked", cal.masked_attn_t0, cal.masked_attn_e_max, 1.0),
            ("attn_masked_bwd", cal.masked_attn_t0, cal.masked_attn_e_max, cal.masked_attn_bwd_factor)):
        m = c[kind]
        gpu_s[m] = t0 + t.flops[m] * factor / (t.peak[m] * e_max)
        host[m] = cal.host_op_s
    host[c["kbit"]] = cal.host_kbit8_s if plan.quantization == "8bit" else cal.host_kbit_s
    host[c["kbit_bwd"]] = cal.host_kbit_bwd_s
    host[c["kbit8_tail"]] = cal.host_kbit8_tail_s
    host[c["sync"]] = cal.sync_s
    for kind, efficiency in _BANDWIDTH_KINDS.items():
        m = c[kind]
        gpu_s[m] = t.bytes[m] / (bandwidth * getattr(cal, efficiency)) + cal.kernel_s
        host[m] = cal.host_op_s
    m = c["mm8"]
    gpu_s[m] = np.maximum(cal.mm8_t0 + t.flops[m] / (t.peak[m] * cal.mm8_e_max), t.bytes[m] / bandwidth)
    host[m] = cal.host_op_s
    m = c["adam8"]  # the stand-in's in-place update of one tensor (weight and gradient read, weight written)
    elements = t.bytes[m] / (3 * t.itemsize[m])
    gpu_s[m] = elements / (cal.adam8bit_rate * bandwidth / (H200_BANDWIDTH_GBS * 1e9)) + cal.kernel_s
    host[m] = cal.adam8bit_tensor_s
    m = c["other"]
    gpu_s[m] = t.bytes[m] / (bandwidth * cal.mem_efficiency) + cal.kernel_s * t.tensors[m] ** 0.5
    host[m] = cal.host_op_s + cal.host_tensor_s * (t.tensors[m] - 1)
    host[t.selective] += cal.host_selective_s
    return host, gpu_s, t.repeat, t.opt


def _optimizer_scale(spec: ModelSpec, plan: Plan, depth: int) -> float:
    """How many times the optimizer's work over a ``depth``-layer model the full model's is: trainable weights of
    the layers grow with the depth, the others (embeddings, head) do not."""
    if depth >= spec.num_layers:
        return 1.0
    from memtune.estimate.screen import layer_params

    if plan.peft != "none":
        return spec.num_layers / depth
    per_layer = layer_params(spec)
    rest = max(0, spec.num_params - spec.num_layers * per_layer)
    return (rest + spec.num_layers * per_layer) / (rest + depth * per_layer)


def _run(host: np.ndarray, gpu: np.ndarray, start_host: float, start_gpu: float) -> tuple[float, float]:
    """Issue ops in order: ``host += h; gpu = max(gpu, host) + g``; returns both clocks at the end (vectorized:
    the GPU's end is ``G_i + max(start_gpu, max_j<=i (H_j - G_{j-1}))``)."""
    if len(host) == 0:
        return start_host, start_gpu
    h = start_host + np.cumsum(host)
    g = np.cumsum(gpu)
    before = np.concatenate(([0.0], g[:-1]))
    end = g[-1] + max(start_gpu, float(np.max(h - before)))
    return float(h[-1]), end


def _run_synced(host: np.ndarray, gpu: np.ndarray, repeat: np.ndarray, sync: np.ndarray, start_host: float,
                start_gpu: float) -> tuple[float, float]:
    """``_run`` over ops (times per op, ``repeat`` the layers each stands for) some of which are syncs, at which the
    host waits for the GPU. A stretch of ops that ends in a sync starts with both clocks equal and the GPU idle, so
    its length does not depend on what came before it: such a stretch in a layer the trace repeats counts once per
    layer it stands for (the repeat of its sync). A stretch that crosses from one layer into the next is counted at
    the repeat of the later layer; over the periodic layers of a trace (``fast_depth``: repeat-1 layers after the
    repeated ones) the tails cancel and the total is that of the layers written out."""
    cuts = np.flatnonzero(sync)
    if len(cuts) == 0:
        return _run(host * repeat, gpu * repeat, start_host, start_gpu)
    first = cuts[0]
    h, g = _run(host[:first] * repeat[:first], gpu[:first] * repeat[:first], start_host, start_gpu)
    clock = max(h, g) + host[first] * repeat[first]
    for a, b in zip(cuts[:-1] + 1, cuts[1:]):
        h, g = _run(host[a:b], gpu[a:b], 0.0, 0.0)
        clock += (max(h, g) + host[b]) * repeat[b]
    last = cuts[-1] + 1
    return _run(host[last:] * repeat[last:], gpu[last:] * repeat[last:], clock, clock)


_TABLES: dict = {}
"""Op tables of the traces timed last (by trace; the trace is kept with its table, so that no other trace can
take its id while the entry lasts)."""


def step_time(spec: ModelSpec, plan: Plan, gpu: GpuSpec, trace, cal: Calibration | None = None) -> StepTime:
    """The step time of ``plan`` from its ``trace`` (a ``TraceResult`` with ops, at any depth)."""
    cal = cal or calibration(gpu.name)
    key = (id(trace), spec.name, plan, gpu.name)
    if key not in _TABLES:
        ops = [op for op in trace.ops if op.micro_batch <= 0 or op.phase == "optimizer_step"]
        if len(_TABLES) >= 256:
            _TABLES.pop(next(iter(_TABLES)))
        _TABLES[key] = (trace, _op_table(ops, spec, plan, gpu, trace.num_layers, trace.period))
    table = _TABLES[key][1]
    host, gpu_s, repeat, opt = op_times((), spec, plan, gpu, cal, depth=trace.num_layers, period=trace.period,
                                        table=table)
    mb = ~opt
    micro_batch = (host[mb], gpu_s[mb], repeat[mb], table.code[mb] == _CODE["sync"])
    clock_host, clock_gpu = _run_synced(*micro_batch, 0.0, 0.0)
    first_end = clock_gpu
    for _ in range(plan.grad_accum - 1):
        clock_host, clock_gpu = _run_synced(*micro_batch, clock_host, clock_gpu)
    micro_end = clock_gpu
    host, gpu_s = host * repeat, gpu_s * repeat
    clock_host, clock_gpu = _run(host[opt], gpu_s[opt], clock_host, clock_gpu)
    return StepTime(step_s=clock_gpu, micro_batch_s=first_end, optimizer_s=clock_gpu - micro_end,
                    gpu_s=float(plan.grad_accum * gpu_s[mb].sum() + gpu_s[opt].sum()),
                    host_s=float(plan.grad_accum * host[mb].sum() + host[opt].sum()))


def measured_error(gpu_name: str, plan: Plan | None = None) -> float:
    """The step-time model's largest error on held-out plans (``bench/results/step_time.json``), as calibrated for
    ``gpu_name`` or the GPU whose constants stand in for it: for ``plan``'s class (k-bit weights or not) where the
    calibration has it, else over all plans; 0.15 before any calibration."""
    from memtune.profiles import calibrations

    for _, data in calibrations(gpu_name):
        fitted = data.get("step_time") or {}
        by_class = fitted.get("heldout_by_class") or {}
        held = by_class.get(error_class(plan)) if plan is not None else None
        error = (held or fitted.get("heldout") or {}).get("max_abs_err")
        if isinstance(error, int | float) and error > 0:
            return float(error)
    return 0.15


def error_class(plan: Plan) -> str:
    """The class whose held-out error stands for ``plan``'s: ``kbit`` (bitsandbytes weights) or ``other``."""
    return "kbit" if plan.quantization != "none" else "other"


def traced_cost(spec: ModelSpec, plan: Plan, gpu: GpuSpec, *, padding_efficiency: float = 1.0,
                mean_seq_len: float | None = None, network_gbs: float | None = None):
    """``memtune.planner.cost.step_cost`` with the compute part from the plan's (fast, cached) trace: the trace's
    step time at ``plan.seq_len``, scaled to the mean padded length as the closed form scales, plus CPU offload's
    copies and host step; communication as the closed form prices it, overlapped with compute."""
    from memtune.estimate.compose import cached_trace, fast_depth, sdpa_backend
    from memtune.planner import cost

    extra = {} if network_gbs is None else {"network_gbs": network_gbs}
    closed = cost.step_cost(spec, plan, gpu, padding_efficiency=padding_efficiency, mean_seq_len=mean_seq_len,
                            **extra)
    at_max = cost.step_cost(spec, plan, gpu, **extra) if mean_seq_len is not None else closed
    traced_plan = dataclasses.replace(plan, offload=False) if plan.offload else plan
    trace = cached_trace(spec, traced_plan, fast_depth(spec), sdpa_backend(spec, traced_plan, gpu))
    offload = cost.offload_s(spec, plan, gpu)
    compute = step_time(spec, plan, gpu, trace).step_s
    compute *= (closed.compute_s - offload) / max(at_max.compute_s - offload, 1e-12)
    compute += offload
    step = max(compute, closed.communication_s)
    return dataclasses.replace(closed, step_time_s=step, compute_s=compute,
                               tokens_per_s=closed.tokens_per_s * closed.step_time_s / step, method="trace")


def host_per_layer(spec: ModelSpec, plan: Plan, gpu: GpuSpec, trace, cal: Calibration) -> float:
    """Host seconds one inner decoder layer takes to issue per micro-batch (forward, backward and recomputation):
    what the closed-form cost model adds per layer where the host sets the pace."""
    ops = [op for op in trace.ops if op.micro_batch <= 0 and op.phase != "optimizer_step"]
    host, _, _, _ = op_times(ops, spec, plan, gpu, cal, depth=trace.num_layers, period=trace.period)
    inner = range(trace.period, 2 * trace.period)
    return float(sum(h for h, op in zip(host, ops) if op.layer in inner)) / trace.period


def host_layer_key(plan: Plan) -> str:
    """The key of ``host_per_layer_s`` in the calibration: the kind of fine-tune and the checkpointing."""
    kind = "full" if plan.peft == "none" else "lora" if plan.quantization == "none" else "kbit"
    return f"{kind}/{plan.checkpointing}"


def estimated_cost(spec: ModelSpec, plan: Plan, gpu: GpuSpec, *, padding_efficiency: float = 1.0,
                   mean_seq_len: float | None = None, network_gbs: float | None = None):
    """``traced_cost`` where the plan can be traced, else the closed form (``cost.step_cost``) of the same shape."""
    from memtune.errors import InvalidPlanError
    from memtune.planner import cost

    shape = {"padding_efficiency": padding_efficiency, "mean_seq_len": mean_seq_len}
    try:
        return traced_cost(spec, plan, gpu, network_gbs=network_gbs, **shape)
    except InvalidPlanError:
        return cost.step_cost(spec, plan, gpu, **shape, **({} if network_gbs is None else {"network_gbs": network_gbs}))

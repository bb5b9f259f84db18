"""k-bit base weights and 8-bit optimizer states.

On a GPU these are bitsandbytes' ``Linear4bit`` (NF4, double quantization), ``Linear8bitLt`` (LLM.int8) and
``AdamW8bit``. Under fake tensors (the estimator's trace, where bitsandbytes' kernels cannot run) memtune uses
memory-equivalent stand-ins that allocate what bitsandbytes allocates (bitsandbytes 0.4x ``MatMul4Bit`` and
``MatMul8bitLt`` autograd functions, ``Optimizer2State.init_state``):

* NF4: 0.5 B/param packed weight + one uint8 absmax per 64 weights + one fp32 absmax per 256 of those (double
  quantization). ``Linear4bit`` casts its input to the compute dtype and its output back to the input's dtype;
  forward (inside the ``gemm_4bit`` op, not an aten matmul) and backward each dequantize the weight into a
  temporary; nothing but the packed weight is saved.
* LLM.int8: 1 B/param + one fp32 scale per output row. Forward checks an fp16 copy of the input for outliers
  (its magnitude and a boolean mask), quantizes it to int8, multiplies into int32, dequantizes to fp16 and casts
  to the input's dtype; the input is saved for backward, which dequantizes the weight in that dtype.
* AdamW8bit: two uint8 states per parameter plus one fp32 absmax per 256-value block, for tensors of at least
  4096 elements (smaller ones keep fp32 states); the update is one fused kernel without temporaries.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

NF4_BLOCK = 64
OUTLIER_THRESHOLD = 6.0
"""LLM.int8's outlier threshold (``Linear8bitLt(threshold=6.0)``, as memtune builds it)."""
NF4_DOUBLE_QUANT_BLOCK = 256
ADAM8BIT_BLOCK = 256
ADAM8BIT_MIN_SIZE = 4096


_note: Callable[..., None] | None = None


@contextlib.contextmanager
def kernel_notes(sink: Callable[..., None]):
    """Tell ``sink(kind, flops, nbytes, itemsize)`` about the kernels the stand-ins stand for (the trace's step
    time): a k-bit matmul's dequantization, quantization and product, which the stand-in only allocates for."""
    global _note
    previous, _note = _note, sink
    try:
        yield
    finally:
        _note = previous


def _nf4_blocks(numel: int) -> int:
    """NF4's quantization blocks over ``numel`` weights: one uint8 absmax each (an fp32 one once restored)."""
    return math.ceil(numel / NF4_BLOCK)


def nf4_kernels(m: int, n: int, k: int, size: int, phase: str) -> tuple[tuple[str, float, int, int], ...]:
    """The kernels of an NF4 layer's forward (``phase``) or backward over ``m`` rows, ``n`` x ``k`` weight, compute
    dtype of ``size`` bytes, as (kind, FLOPs, bytes, itemsize): the double-quantized statistics restored (one
    uint8 and one fp32 absmax per 64 weights: ``kDequantizeBlockwise`` and the offset's add), the weight dequantized
    into a temporary (``kDequantizeBlockwise``: 0.5 B read and ``size`` written per weight), and, in forward, the
    product (cuBLAS). The backward's product is an aten matmul the trace sees. This is bitsandbytes' path past a
    few hundred rows on the H200 (``gemm_4bit``'s fallback); below, its fused kernel replaces dequantization and
    product."""
    blocks = _nf4_blocks(n * k)
    dequantize = (("nf4", 0.0, 5 * blocks, 4), ("mem", 0.0, 8 * blocks, 4),
                  ("nf4", 0.0, n * k // 2 + n * k * size, size))
    if phase == "forward":
        return (("kbit", 0.0, 0, size), *dequantize, ("mm", 2.0 * m * n * k, (m * k + n * k + m * n) * size, size))
    return (("kbit_bwd", 0.0, 0, size), *dequantize)


def llm_int8_kernels(m: int, n: int, k: int, dtype: torch.dtype, phase: str,
                     outlier_columns: int = 0) -> tuple[tuple[str, float, int, int], ...]:
    """The kernels of an LLM.int8 layer's forward (``phase``) or backward over ``m`` rows of ``dtype`` input,
    ``n`` x ``k`` int8 weight, as (kind, FLOPs, bytes, itemsize) (bitsandbytes' ``int8_vectorwise_quant`` and
    ``int8_scaled_mm``, threshold 6). Forward: the input cast to fp16 (unless it is fp16), its magnitude, the
    outlier mask and its ``any`` (read by Python: the host waits), the int8 quantization (``kInt8VectorQuant``),
    the outlier columns zeroed (an empty index, but the scalar 0 is copied from the host: it waits again), the
    Python path from there to the product (``kbit8_tail``: host work the idle GPU waits for - on a profiled H200 step
    the GPU's longest waits in an LLM.int8 call follow the second sync, `bench/results/timing/gaps.json`), the int8
    product into int32 (CUTLASS), its dequantization to fp16 (``kdequant_mm_int32_fp16``) and the cast to the
    input's dtype. Backward: the weight copied to the input's dtype and scaled per row in place (PyTorch's
    non-vectorized element-wise path, as the casts are), then an aten matmul the trace sees.

    ``outlier_columns``: the input's columns that hold a value of at least the threshold (``outlier_columns``).
    They are gathered from the input (kept for backward) and from the int8 weight, whose columns are dequantized
    (fp32) and cast to the input's dtype, and ``output.addmm(sub_input, sub_weight)`` adds their product: a bf16
    matmul over that many columns, whose rows are not 16-byte aligned unless the count is a multiple of 8 (cuBLAS
    then runs slower kernels: ``mm_unaligned``)."""
    size = dtype.itemsize
    cast = dtype != torch.float16
    if phase == "forward":
        return (("kbit", 0.0, 0, size), *((("cast", 0.0, m * k * (size + 2), 2),) if cast else ()),
                ("mem", 0.0, 4 * m * k, 2), ("mem", 0.0, 3 * m * k, 2), ("mem", 0.0, m * k, 1), ("sync", 0.0, 0, 1),
                ("q8", 0.0, 3 * m * k + 4 * m, 2), ("sync", 0.0, 0, 1), ("kbit8_tail", 0.0, 0, 1),
                ("mm8", 2.0 * m * n * k, m * k + n * k + 4 * m * n, 1), ("dq8", 0.0, 6 * m * n, 4),
                *((("cast", 0.0, m * n * (2 + size), 2),) if cast else ()),
                *outlier_kernels(m, n, outlier_columns, size))
    return (("kbit_bwd", 0.0, 0, size), ("cast", 0.0, n * k * (1 + size), size), ("mem", 0.0, 8 * n, 4),
            ("cast", 0.0, 2 * n * k * size, size))


def outlier_kernels(m: int, n: int, c: int, size: int) -> tuple[tuple[str, float, int, int], ...]:
    """LLM.int8's outlier product over ``c`` columns (``int8_mixed_scaled_mm``): the input's columns gathered, the
    weight's gathered, dequantized and cast, and the ``addmm`` into the m x n output."""
    if not c:
        return ()
    product = "mm" if c % 8 == 0 else "mm_unaligned"  # rows of c elements: cuBLAS's aligned kernels need 16 bytes
    return (("mem", 0.0, 2 * m * c * size, size), ("mem", 0.0, 2 * n * c, 1), ("mem", 0.0, 5 * n * c, 4),
            ("cast", 0.0, n * c * (4 + size), size),
            (product, 2.0 * m * n * c, (m * c + n * c + 2 * m * n) * size, size))


@functools.lru_cache(maxsize=256)
def outlier_probability(std: float, activation: str, gated: bool, threshold: float = OUTLIER_THRESHOLD) -> float:
    """The chance that one element of an MLP's down-projection input reaches LLM.int8's threshold in magnitude at
    random init: the up and gate projections of a unit-RMS (normalized) input are N(0, std^2) with ``std`` =
    initializer_range x sqrt(hidden size); the input is ``act(g) * u`` (``gated``) or ``act(g)``, so
    P = E_g[2 Q(threshold / (|act(g)| std))] (Q: the normal tail) or P(|act(g)| >= threshold)."""
    if std <= 0:
        return 0.0
    z = np.linspace(-12.0, 12.0, 4801)
    weight = np.exp(-z * z / 2) / math.sqrt(2 * math.pi) * (z[1] - z[0])
    a = np.abs(_activation(activation)(z * std))
    if not gated:
        return float(weight[a >= threshold].sum())
    with np.errstate(divide="ignore"):
        ratio = np.where(a > 0, threshold / (a * std + 1e-300), np.inf)
    tail = np.array([math.erfc(r / math.sqrt(2)) if np.isfinite(r) else 0.0 for r in ratio])
    return float((weight * tail).sum())


def _activation(name: str):
    name = (name or "silu").lower()
    if "gelu" in name:
        return lambda x: x * 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    if name == "relu":
        return lambda x: np.maximum(x, 0.0)
    return lambda x: x / (1 + np.exp(-x))  # silu / swish


def outlier_columns(m: int, k: int, p: float) -> int:
    """Expected columns of an ``m`` x ``k`` input with at least one element past the threshold, each element past
    it with chance ``p``: k (1 - (1 - p)^m)."""
    if p <= 0 or m <= 0:
        return 0
    return round(k * -math.expm1(m * math.log1p(-min(p, 1 - 1e-12))))


class _KbitMatmul(torch.autograd.Function):
    """The allocations of bitsandbytes' ``MatMul4Bit`` (via ``Linear4bit``) and ``MatMul8bitLt``; the kernels they
    launch (``nf4_kernels``, ``llm_int8_kernels``) are told to the trace (``kernel_notes``)."""

    @staticmethod
    def forward(ctx, x, packed, out_features, in_features, bits, compute_dtype, outlier_p=0.0):
        ctx.shape, ctx.bits, ctx.compute_dtype, ctx.input_dtype = (out_features, in_features), bits, compute_dtype, x.dtype
        rows = x.shape[:-1]
        m = x.numel() // in_features
        if bits == 4:
            # Linear4bit casts the input to the compute dtype; bitsandbytes' gemm_4bit op restores the fp32
            # statistics (two temporaries), dequantizes the weight into a temporary and multiplies (cuBLAS, past a
            # few hundred rows); the result is cast back to the input's dtype. Nothing is saved but the packed
            # weight, and no aten matmul is dispatched: selective checkpointing (which saves matmul outputs)
            # recomputes it (op by op on an H200, bench/results/op_memory/).
            x = x.to(compute_dtype)
            _notes(nf4_kernels(m, out_features, in_features, compute_dtype.itemsize, "forward"))
            absmax = [torch.empty(_nf4_blocks(out_features * in_features), dtype=torch.float32, device=x.device)
                      for _ in range(2)]
            weight = torch.empty(ctx.shape, dtype=compute_dtype, device=x.device)
            out = torch.empty((*rows, out_features), dtype=compute_dtype, device=x.device)
            del absmax, weight
            return out.to(ctx.input_dtype)
        # LLM.int8: the input's fp16 copy; the int8 input and its row scales, the input's magnitude and outlier
        # mask; the int32 product, its fp16 dequantization and the output in the input's dtype (no copies where
        # the input is fp16). The input is kept on the autograd context (``ctx.tensors`` in bitsandbytes), not
        # through save_for_backward: activation checkpointing neither frees it nor recomputes the layer for it.
        # Outlier columns (``outlier_columns``): the input's are gathered and kept with it, the weight's gathered,
        # dequantized to fp32 and cast; after the int8 product, ``addmm`` writes a new output.
        c = outlier_columns(m, in_features, outlier_p)
        keep = any(ctx.needs_input_grad[:2])
        ctx.kept_input = x if keep else None
        _notes(llm_int8_kernels(m, out_features, in_features, x.dtype, "forward", c))
        half = torch.empty(x.shape, dtype=torch.float16, device=x.device) if x.dtype != torch.float16 else x
        scales = torch.empty(rows, dtype=torch.float32, device=x.device)
        quantized = torch.empty(x.shape, dtype=torch.int8, device=x.device)
        magnitude = torch.empty_like(half)
        outliers = torch.empty(x.shape, dtype=torch.bool, device=x.device)
        del magnitude, outliers, half
        sub_weight = None
        if c:
            sub_input = torch.empty((m, c), dtype=x.dtype, device=x.device)
            ctx.kept_outliers = sub_input if keep else None
            gathered = torch.empty((out_features, c), dtype=torch.int8, device=x.device)
            dequantized_columns = torch.empty((out_features, c), dtype=torch.float32, device=x.device)
            del gathered
            sub_weight = torch.empty((out_features, c), dtype=x.dtype, device=x.device)
            del dequantized_columns, sub_input
        product = torch.empty((*rows, out_features), dtype=torch.int32, device=x.device)
        dequantized = torch.empty((*rows, out_features), dtype=torch.float16, device=x.device)
        out = dequantized if x.dtype == torch.float16 else torch.empty_like(dequantized, dtype=x.dtype)
        del product, dequantized, quantized, scales
        if c:
            out = torch.empty_like(out)  # addmm's result; the int8 product's output is freed
        del sub_weight
        return out

    @staticmethod
    def backward(ctx, grad):
        out_features, in_features = ctx.shape
        dtype = ctx.compute_dtype if ctx.bits == 4 else ctx.input_dtype
        m = grad.numel() // out_features
        if ctx.bits == 4:  # dequantize_4bit: the fp32 statistics restored (in place), then the weight
            _notes(nf4_kernels(m, out_features, in_features, dtype.itemsize, "backward"))
            statistics = torch.empty(_nf4_blocks(out_features * in_features), dtype=torch.float32, device=grad.device)
            weight = torch.empty(ctx.shape, dtype=dtype, device=grad.device)
        else:  # the int8 weight copied to the input's dtype, then scaled in place by the per-row scales / 127
            _notes(llm_int8_kernels(m, out_features, in_features, dtype, "backward"))
            weight = torch.empty(ctx.shape, dtype=dtype, device=grad.device)
            statistics = torch.empty(out_features, dtype=torch.float32, device=grad.device)
        del statistics
        return (grad.to(dtype) @ weight).to(ctx.input_dtype), None, None, None, None, None, None


def _notes(kernels) -> None:
    """Tell the trace (``kernel_notes``) about kernels the stand-in does not run: (kind, FLOPs, bytes, itemsize)."""
    if _note is not None:
        for kernel in kernels:
            _note(*kernel)


class EmulatedKbitLinear(nn.Linear):
    """A frozen k-bit linear layer with bitsandbytes' memory footprint (see the module docstring)."""

    def __init__(self, linear: nn.Linear, bits: int, compute_dtype: torch.dtype, outlier_p: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.bits = linear.in_features, linear.out_features, bits
        self.outlier_p = outlier_p  # chance that an input element is an LLM.int8 outlier (outlier_probability)
        self.compute_dtype = compute_dtype
        numel = self.in_features * self.out_features
        device = linear.weight.device
        self.weight = nn.Parameter(torch.empty((numel * bits // 8, 1), dtype=torch.uint8, device=device),
                                   requires_grad=False)
        if bits == 4:
            blocks = _nf4_blocks(numel)
            self.register_buffer("absmax", torch.empty(blocks, dtype=torch.uint8, device=device))
            self.register_buffer("absmax2", torch.empty(math.ceil(blocks / NF4_DOUBLE_QUANT_BLOCK),
                                                        dtype=torch.float32, device=device))
        else:
            self.register_buffer("scale", torch.empty(self.out_features, dtype=torch.float32, device=device))
        self.bias = linear.bias

    def forward(self, x):
        out = _KbitMatmul.apply(x, self.weight, self.out_features, self.in_features, self.bits, self.compute_dtype,
                                self.outlier_p)
        return out if self.bias is None else out + self.bias


def quantize_decoder_linears(model: nn.Module, plan, *, emulate: bool) -> None:
    """Replace every ``nn.Linear`` of the decoder layers (not the lm_head) by its k-bit version, in place."""
    from memtune.specs.model import decoder_layers

    bits = 4 if plan.quantization == "4bit" else 8
    config = getattr(model, "config", None)
    for layer in decoder_layers(model):
        for parent in list(layer.modules()):
            for child_name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    p = down_projection_outliers(config, parent, child) if bits == 8 and emulate else 0.0
                    new = (EmulatedKbitLinear(child, bits, getattr(torch, plan.low_precision), p) if emulate
                           else _bnb_linear(child, bits, plan))
                    setattr(parent, child_name, new)


def down_projection_outliers(config, parent: nn.Module, linear: nn.Linear) -> float:
    """``outlier_probability`` for the MLP's down projection (its input is the intermediate activation: gated
    where the MLP's other projections give twice the intermediate size), 0 for every other linear layer: their
    inputs are normalized or averaged, and past 6 standard deviations almost never (on profiled H200 steps of
    three models at random init, the down projections took the outlier path in every call, the others all but
    never: ``bench/results/timing/gaps-2.json``). A pretrained model's outliers are a few columns: memtune counts
    those of the randomly initialized model it measures, more than a pretrained one has."""
    intermediate = getattr(config, "intermediate_size", None)
    hidden = getattr(config, "hidden_size", None)
    if not intermediate or not hidden or linear.in_features != intermediate or linear.out_features != hidden:
        return 0.0
    up = sum(m.out_features for m in parent.children()
             if isinstance(m, nn.Linear) and m is not linear and m.in_features == hidden)
    return down_input_outlier_probability(config.to_dict() if hasattr(config, "to_dict") else vars(config),
                                          gated=up >= 2 * intermediate)


def down_input_outlier_probability(config: dict, *, gated: bool) -> float:
    """``outlier_probability`` of the down projection's input for a model ``config`` (its hidden size, activation
    and initializer range; 0.02 where it gives none)."""
    hidden = config.get("hidden_size") or 0
    activation = config.get("hidden_activation") or config.get("hidden_act") or "silu"
    std = (config.get("initializer_range") or 0.02) * math.sqrt(hidden)
    return outlier_probability(std, str(activation), gated=gated)


def needs_bitsandbytes(plan) -> bool:
    """k-bit base weights and 8-bit AdamW run bitsandbytes' kernels."""
    return plan.quantization != "none" or plan.optimizer == "adamw-8bit"


def bitsandbytes():
    """The ``bitsandbytes`` module. Raises ConfigError (one line) where it is not installed."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        from memtune.errors import ConfigError

        raise ConfigError("this plan runs bitsandbytes (k-bit weights or 8-bit AdamW), which is not installed here: "
                          "pip install bitsandbytes, or choose --quantization none and another --optimizer") from None
    return bnb


def _bnb_linear(linear: nn.Linear, bits: int, plan) -> nn.Module:
    bnb = bitsandbytes()

    device = linear.weight.device
    data = linear.weight.data
    if bits == 4:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=getattr(torch, plan.low_precision), compress_statistics=True,
                                  quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(data.cpu(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True).to(device)
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False, threshold=OUTLIER_THRESHOLD, device="meta")
        # Int8Params quantizes when moved from the CPU to the GPU.
        layer.weight = bnb.nn.Int8Params(data.cpu(), requires_grad=False, has_fp16_weights=False).to(device)
    if linear.bias is not None:
        layer.bias = linear.bias
    return layer


def keep_fp32_states(optimizer, module: nn.Module) -> None:
    """Give ``module.weight`` 32-bit optimizer states under a bitsandbytes 8-bit optimizer (or its stand-in), as
    ``GlobalOptimManager.register_module_override(module, "weight", {"optim_bits": 32})`` does."""
    if isinstance(optimizer, EmulatedAdamW8bit):
        optimizer.fp32_states.add(module.weight)
    else:
        bitsandbytes().optim.GlobalOptimManager.get_instance().register_module_override(
            module, "weight", {"optim_bits": 32})


class EmulatedAdamW8bit(torch.optim.Optimizer):
    """bitsandbytes ``AdamW8bit``'s state layout, with an in-place update and no temporaries (fused kernel)."""

    def __init__(self, params, lr: float = 1e-4, weight_decay: float = 0.01):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        self.fp32_states: set[torch.Tensor] = set()

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    if p.numel() >= ADAM8BIT_MIN_SIZE and p not in self.fp32_states:
                        blocks = math.ceil(p.numel() / ADAM8BIT_BLOCK)
                        state["state1"] = torch.zeros_like(p, dtype=torch.uint8)
                        state["state2"] = torch.zeros_like(p, dtype=torch.uint8)
                        state["absmax1"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
                        state["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
                    else:
                        state["state1"] = torch.zeros_like(p, dtype=torch.float32)
                        state["state2"] = torch.zeros_like(p, dtype=torch.float32)
                p.add_(p.grad, alpha=-group["lr"])
        return None

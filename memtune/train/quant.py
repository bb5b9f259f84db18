"""k-bit base weights and 8-bit optimizer states.

On a GPU these are bitsandbytes' ``Linear4bit`` (NF4, double quantization), ``Linear8bitLt`` (LLM.int8) and
``AdamW8bit``. Under fake tensors (the estimator's trace, where bitsandbytes' kernels cannot run) memtune uses
memory-equivalent stand-ins that allocate what bitsandbytes allocates (bitsandbytes 0.4x ``MatMul4Bit`` and
``MatMul8bitLt`` autograd functions, ``Optimizer2State.init_state``):

* NF4: 0.5 B/param packed weight + one uint8 absmax per 64 weights + one fp32 absmax per 256 of those (double
  quantization). ``Linear4bit`` casts its input to the compute dtype and its output back to the input's dtype;
  forward (inside the ``gemm_4bit`` op, not an aten matmul) and backward each dequantize the weight into a
  temporary; nothing but the packed weight is saved.
* LLM.int8: 1 B/param + one fp32 scale per output row. Forward quantizes an fp16 copy of the input to int8 and
  returns the input's dtype; the input is saved for backward, which dequantizes the weight in that dtype.
* AdamW8bit: two uint8 states per parameter plus one fp32 absmax per 256-value block, for tensors of at least
  4096 elements (smaller ones keep fp32 states); the update is one fused kernel without temporaries.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from torch import nn

NF4_BLOCK = 64
NF4_DOUBLE_QUANT_BLOCK = 256
ADAM8BIT_BLOCK = 256
ADAM8BIT_MIN_SIZE = 4096


_note: Callable[..., None] | None = None


@contextlib.contextmanager
def kernel_notes(sink: Callable[..., None]):
    """Tell ``sink(kind, flops, nbytes, itemsize)`` about the kernels the stand-ins stand for (the trace's step
    time): a k-bit matmul's dequantization and product, which the stand-in only allocates for."""
    global _note
    previous, _note = _note, sink
    try:
        yield
    finally:
        _note = previous


def _dequantize_bytes(out_features: int, in_features: int, bits: int, dtype: torch.dtype) -> int:
    """Bytes a dequantization moves: the packed weight read, the weight written in ``dtype`` and read back."""
    numel = out_features * in_features
    return numel * bits // 8 + 2 * numel * dtype.itemsize


class _KbitMatmul(torch.autograd.Function):
    """The allocations of bitsandbytes' ``MatMul4Bit`` (via ``Linear4bit``) and ``MatMul8bitLt``."""

    @staticmethod
    def forward(ctx, x, packed, out_features, in_features, bits, compute_dtype):
        ctx.shape, ctx.bits, ctx.compute_dtype, ctx.input_dtype = (out_features, in_features), bits, compute_dtype, x.dtype
        rows = x.shape[:-1]
        if bits == 4:
            # Linear4bit casts the input to the compute dtype; bitsandbytes' gemm_4bit op makes the output and,
            # inside, dequantizes the weight into a temporary; the result is cast back to the input's dtype.
            # Nothing is saved but the packed weight, and no aten matmul runs: selective checkpointing (which
            # saves matmul outputs) recomputes it (op by op on an H200, bench/results/op_memory/).
            x = x.to(compute_dtype)
            if _note is not None:
                _note("kbit", 2.0 * x.numel() * out_features,
                      _dequantize_bytes(out_features, in_features, bits, compute_dtype), compute_dtype.itemsize)
            out = torch.empty((*rows, out_features), dtype=compute_dtype, device=x.device)
            weight = torch.empty(ctx.shape, dtype=compute_dtype, device=x.device)
            del weight
            return out.to(ctx.input_dtype)
        # LLM.int8: the input is quantized from an fp16 copy (int8 values, one scale per row), multiplied into the
        # output in the input's dtype; the input itself is saved for backward.
        ctx.save_for_backward(x)
        half = x.to(torch.float16)
        quantized = torch.empty(x.shape, dtype=torch.int8, device=x.device)
        scales = torch.empty(rows, dtype=torch.float32, device=x.device)
        del half, quantized, scales
        if _note is not None:
            _note("kbit", 2.0 * x.numel() * out_features, x.numel() * 3 + out_features * in_features,
                  torch.int8.itemsize)
        return torch.empty((*rows, out_features), dtype=x.dtype, device=x.device)

    @staticmethod
    def backward(ctx, grad):
        dtype = ctx.compute_dtype if ctx.bits == 4 else ctx.input_dtype
        if _note is not None:  # the product itself runs as an aten matmul below
            _note("kbit", 0.0, _dequantize_bytes(*ctx.shape, ctx.bits, dtype), dtype.itemsize)
        weight = torch.empty(ctx.shape, dtype=dtype, device=grad.device)
        return (grad.to(dtype) @ weight).to(ctx.input_dtype), None, None, None, None, None


class EmulatedKbitLinear(nn.Linear):
    """A frozen k-bit linear layer with bitsandbytes' memory footprint (see the module docstring)."""

    def __init__(self, linear: nn.Linear, bits: int, compute_dtype: torch.dtype):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.bits = linear.in_features, linear.out_features, bits
        self.compute_dtype = compute_dtype
        numel = self.in_features * self.out_features
        device = linear.weight.device
        self.weight = nn.Parameter(torch.empty((numel * bits // 8, 1), dtype=torch.uint8, device=device),
                                   requires_grad=False)
        if bits == 4:
            blocks = math.ceil(numel / NF4_BLOCK)
            self.register_buffer("absmax", torch.empty(blocks, dtype=torch.uint8, device=device))
            self.register_buffer("absmax2", torch.empty(math.ceil(blocks / NF4_DOUBLE_QUANT_BLOCK),
                                                        dtype=torch.float32, device=device))
        else:
            self.register_buffer("scale", torch.empty(self.out_features, dtype=torch.float32, device=device))
        self.bias = linear.bias

    def forward(self, x):
        out = _KbitMatmul.apply(x, self.weight, self.out_features, self.in_features, self.bits, self.compute_dtype)
        return out if self.bias is None else out + self.bias


def quantize_decoder_linears(model: nn.Module, plan, *, emulate: bool) -> None:
    """Replace every ``nn.Linear`` of the decoder layers (not the lm_head) by its k-bit version, in place."""
    from memtune.specs.model import decoder_layers

    bits = 4 if plan.quantization == "4bit" else 8
    for layer in decoder_layers(model):
        for parent in list(layer.modules()):
            for child_name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    new = (EmulatedKbitLinear(child, bits, getattr(torch, plan.low_precision)) if emulate
                           else _bnb_linear(child, bits, plan))
                    setattr(parent, child_name, new)


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
                                    has_fp16_weights=False, threshold=6.0, device="meta")
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

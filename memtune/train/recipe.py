"""One training step, built the same way for the fake-tensor trace, the GPU measurement and the real run.

Order (as in torchtitan): build on the meta device -> quantize -> LoRA (peft) -> activation checkpointing
(``checkpoint_wrapper``, non-reentrant, per decoder layer) -> FSDP2 ``fully_shard`` per decoder layer, then the root
-> materialize on the target device.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

from memtune.plan import Plan
from memtune.specs.model import ModelSpec, decoder_layers
from memtune.train import quant

PHASES = ("forward", "backward", "optimizer_step")


def param_dtype(plan: Plan) -> torch.dtype:
    """Storage dtype of the weights: fp32 for fp32 and amp-*, else the low-precision dtype."""
    if plan.precision == "fp32" or plan.is_amp:
        return torch.float32
    return getattr(torch, plan.low_precision)


def compute_dtype(plan: Plan) -> torch.dtype:
    return getattr(torch, plan.low_precision)


def build_model(spec: ModelSpec, plan: Plan, *, device: str | torch.device, num_layers: int | None = None,
                mesh=None, emulate_quant: bool = False, load_weights: bool = False) -> nn.Module:
    """The plan's model on ``device``, or on the meta device when ``device == 'meta'``.

    Args:
        num_layers: truncate the decoder stack (the estimator traces reduced depths).
        mesh: a DeviceMesh for FSDP2 plans.
        emulate_quant: use memtune's memory-equivalent k-bit linear instead of bitsandbytes (for fake tensors).
        load_weights: load ``spec.weights_dir`` instead of a random init (before LoRA; under FSDP2 each rank loads
            the full state dict on the CPU and keeps its shards).
    """
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    hf_config = spec.hf_config(num_layers=num_layers)
    dtype = param_dtype(plan) if plan.quantization == "none" else compute_dtype(plan)
    weights = spec.weights_dir if load_weights and device.type != "meta" else None
    build_on = torch.device("meta") if plan.sharding != "none" or device.type == "meta" else device
    if weights and plan.sharding == "none":
        model = AutoModelForCausalLM.from_pretrained(weights, dtype=dtype, attn_implementation=plan.attention)
        model.to(device)
    else:
        with build_on:
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation=plan.attention)
    base = model
    if plan.quantization != "none":
        quant.quantize_decoder_linears(model, plan, emulate=emulate_quant or device.type == "meta")
        if plan.kbit_upcast:
            from peft import prepare_model_for_kbit_training

            # peft's k-bit preparation: freeze the base and upcast its remaining bf16/fp16 weights (embeddings,
            # norms, lm_head) to fp32; checkpointing stays the plan's own knob.
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if plan.peft == "lora":
        model = _add_lora(model, plan)
    layers = decoder_layers(model)
    if plan.checkpointing != "none" and plan.stack == "hf":
        hf_checkpointing(model)
    elif plan.checkpointing != "none":
        for i, layer in enumerate(layers):
            layers[i] = checkpoint_layer(layer, plan.checkpointing,
                                         autocast=plan.precision.startswith("amp") and plan.sharding == "none")
    if plan.sharding != "none":
        _shard(model, layers, plan, mesh)
        if device.type != "meta":
            # CPU offload keeps the sharded parameters on the host (FSDP2 requires them there); buffers such as
            # RoPE's inverse frequencies are used in the forward and live on the compute device.
            model.to_empty(device="cpu" if plan.offload else device)
            if plan.offload:
                for module in model.modules():
                    for name, buf in module.named_buffers(recurse=False):
                        module._buffers[name] = buf.to(device)
            _init_materialized(model, device)
            if weights:
                _load_sharded(base, weights)
    model.train()
    return model


def use_plan_allocator(plan: Plan, device: torch.device) -> None:
    """The plan's caching-allocator setting in this process (processes torchrun starts get it from
    ``Plan.allocator_env``); it takes effect for the segments allocated from here on."""
    if device.type == "cuda":
        torch._C._accelerator_setAllocatorSettings(f"expandable_segments:{plan.expandable_segments}")


def hf_checkpointing(model: nn.Module) -> None:
    """What ``Trainer`` does with ``gradient_checkpointing=True`` and ``gradient_checkpointing_kwargs={"use_reentrant":
    False}``: transformers' own checkpointing of each decoder layer (and, for a model that takes ``input_ids``,
    ``enable_input_require_grads``)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


MLP_NAMES = ("mlp", "feed_forward", "block_sparse_moe")
"""What decoder layers call their feed-forward block (dense or mixture-of-experts) in transformers."""


def checkpoint_layer(layer: nn.Module, checkpointing: str, *, autocast: bool = False) -> nn.Module:
    """A decoder layer under ``full`` or ``selective`` activation checkpointing.

    ``full`` recomputes the whole layer in backward (``checkpoint_wrapper``, non-reentrant, as torchtitan).
    ``selective`` keeps what the matmuls and attention made and recomputes the cheap element-wise work:

    * each normalization module of the layer keeps only its input (not its fp32 upcast and normalized copy): the
      Llama form of RMSNorm through ``_RMSNorm`` (its gradient in closed form), any other through a ``recompute``
      region;
    * a gated MLP of the transformers form ``down(act(gate(x)) * up(x))`` keeps ``gate(x)`` and ``up(x)``, not the
      activation's output or the product: with SiLU, a plain ``nn.Linear`` down projection and no autocast
      (``autocast``: the plan's precision is amp-* without FSDP) through ``_SiluGatedDown``, which recomputes the
      product in backward for the down projection's weight gradient; with SiLU into a frozen NF4 down projection
      (QLoRA not targeting it) through ``_SiluGated``, which recomputes the activation only; otherwise through a
      ``recompute`` region that runs ``down(act(gate) * up)`` again (its matmul included);
    * any other feed-forward block keeps its matmul outputs and recomputes the rest through the op-level modes of
      ``selective_checkpoint_context``; a layer without a feed-forward block under one of ``MLP_NAMES`` gets that
      policy over the whole layer.

    Attention keeps what it keeps without checkpointing. Why closed-form functions first, then regions, and the
    op-level policy last: a step that is host-bound without checkpointing (a 1B model at a few thousand tokens per
    micro-batch on an H200) pays for every Python call per op, per region (a nested backward) and per frame
    (``bench/results/sac.json``, ``bench/results/timing/sac-variants.json``).
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    if checkpointing == "full":
        return checkpoint_wrapper(layer)
    children = dict(layer.named_children())
    mlp = next((name for name in MLP_NAMES if name in children), None)
    if mlp is None:
        return checkpoint_wrapper(layer, context_fn=selective_checkpoint_context)
    for child in children.values():
        if "Norm" in type(child).__name__:
            (_lean_rms_norm if is_llama_rms_norm(child) else _recompute_whole)(child)
    if is_gated_mlp(children[mlp]):
        _recompute_gated_tail(children[mlp], lean=not autocast and _silu_into_linear(children[mlp]))
    else:
        setattr(layer, mlp, checkpoint_wrapper(children[mlp], context_fn=selective_checkpoint_context))
    return layer


RECOMPUTED = "_memtune_recomputed"
"""Attribute set on a module whose forward runs (partly) in a ``recompute`` region (the trace counts the regions)."""


class _RMSNorm(torch.autograd.Function):
    """transformers' Llama RMSNorm, ``w * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`` in fp32, keeping only ``x``
    and the per-row ``rsqrt`` for the backward, whose gradient is in closed form (Zhang and Sennrich 2019):
    with ``n = x r`` and ``g = dL/dn``, ``dL/dx = r (g - n mean(g n))`` and ``dL/dw = sum(dy n)``. The forward
    computes what transformers computes; the gradient is autograd's to fp32 rounding."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        h = x.float()
        r = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, r)
        return weight * (h * r).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, r = ctx.saved_tensors
        n = x.float() * r
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (dy * n.to(x.dtype)).reshape(-1, dy.shape[-1]).sum(0).to(weight.dtype)
        g = (dy * weight).to(x.dtype).float()
        dx = (r * (g - n * (g * n).mean(-1, keepdim=True))).to(x.dtype)
        return dx, dw, None


_LLAMA_RMS_NORM = ("input_dtype=hidden_states.dtypehidden_states=hidden_states.to(torch.float32)variance="
                   "hidden_states.pow(2).mean(-1,keepdim=True)hidden_states=hidden_states*torch.rsqrt(variance+"
                   "self.variance_epsilon)returnself.weight*hidden_states.to(input_dtype)")


@functools.lru_cache(maxsize=None)
def _source_body(cls: type) -> tuple[str, str]:
    """A class's ``forward``: its ``def`` line, and its body without comments, docstring lines or whitespace."""
    try:
        lines = inspect.getsource(cls.forward).splitlines()
    except (OSError, TypeError):
        return "", ""
    body = "".join(line.split("#")[0] for line in lines[1:] if not line.strip().startswith(('"', "'")))
    return lines[0], "".join(body.split())


def is_llama_rms_norm(module: nn.Module) -> bool:
    """Whether ``module.forward`` is exactly transformers' ``LlamaRMSNorm.forward`` (Llama, Mistral, Qwen, Phi-3,
    OLMoE and most others; not Gemma's ``1 + w`` nor OLMo-2's product in fp32)."""
    return _source_body(type(module))[1] == _LLAMA_RMS_NORM \
        and list(inspect.signature(type(module).forward).parameters) == ["self", "hidden_states"] and isinstance(
        getattr(module, "weight", None), torch.Tensor) and hasattr(module, "variance_epsilon")


def _lean_rms_norm(module: nn.Module) -> None:
    """``module`` (a Llama RMSNorm) through ``_RMSNorm`` while gradients are recorded."""
    forward = module.forward

    def lean(hidden_states):
        if not torch.is_grad_enabled():
            return forward(hidden_states)
        return _RMSNorm.apply(hidden_states, module.weight, module.variance_epsilon)

    module.forward = lean


class _SiluGatedDown(torch.autograd.Function):
    """``down(silu(gate) * up)`` with a bias-free linear ``down`` of weight ``W``, keeping ``gate``, ``up`` and
    ``W``: the backward recomputes ``a = silu(gate)`` and, for ``dW = dy^T (a up)``, the product; then
    ``d(up) = (dy W) a`` and ``d(gate) = silu'(gate) (dy W) up`` (``aten.silu_backward``). What it does not keep
    (the activation's output and the product, two intermediate-sized tensors) is what ``_recompute_gated_tail``
    saves, without running the down projection's matmul again."""

    @staticmethod
    def forward(ctx, gate, up, weight):
        ctx.save_for_backward(gate, up, weight)
        return F.linear(F.silu(gate) * up, weight)

    @staticmethod
    def backward(ctx, dy):
        gate, up, weight = ctx.saved_tensors
        a = F.silu(gate)
        dw = None
        if ctx.needs_input_grad[2]:
            h = a * up
            dw = dy.reshape(-1, dy.shape[-1]).t() @ h.reshape(-1, h.shape[-1])
            del h  # freed before the products below: one intermediate-sized tensor less at the backward's peak
        dh = dy @ weight
        d_up = dh * a
        del a
        return torch.ops.aten.silu_backward(dh * up, gate), d_up, dw


class _SiluGated(torch.autograd.Function):
    """``silu(gate) * up`` keeping only ``gate`` and ``up``: the backward recomputes ``a = silu(gate)``, then
    ``d(up) = dh a`` and ``d(gate) = silu'(gate) dh up``. Before a down projection whose own backward keeps nothing
    of its input (a frozen NF4 layer: bitsandbytes' ``MatMul4Bit`` keeps only the packed weight), the MLP's tail
    keeps nothing intermediate-sized but the two projections' outputs, and the down projection does not run again
    in backward as in a ``recompute`` region."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        a = F.silu(gate)
        d_up = dh * a
        del a
        return torch.ops.aten.silu_backward(dh * up, gate), d_up


def _silu_into_frozen_nf4(mlp: nn.Module) -> bool:
    """The gated MLP's activation is SiLU and its down projection a frozen NF4 layer (bitsandbytes' ``Linear4bit``
    or its stand-in, not wrapped by LoRA), whose backward keeps nothing of its input: what ``_SiluGated`` is for."""
    from memtune.train.quant import EmulatedKbitLinear

    act, down = mlp.act_fn, mlp.down_proj
    silu = isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"
    bnb = sys.modules.get("bitsandbytes")  # loaded where the model has bitsandbytes layers
    nf4 = (isinstance(down, EmulatedKbitLinear) and down.bits == 4) or (
        bnb is not None and isinstance(down, bnb.nn.Linear4bit))
    return silu and nf4 and not any(p.requires_grad for p in down.parameters())


def _silu_into_linear(mlp: nn.Module) -> bool:
    """The gated MLP's activation is SiLU and its down projection a plain bias-free ``nn.Linear`` (not a LoRA or
    k-bit layer): what ``_SiluGatedDown`` computes."""
    act, down = mlp.act_fn, mlp.down_proj
    silu = isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"
    return silu and type(down) is nn.Linear and down.bias is None


class _Recompute(torch.autograd.Function):
    """``fn(*inputs)`` run without keeping anything but ``inputs``; backward runs it again and differentiates.

    The parameters ``fn`` uses are passed in explicitly (after the inputs), so that their gradients flow even where
    no input needs one (a frozen base model under LoRA), which PyTorch's reentrant checkpoint does not do. The
    autocast state of the forward is the recomputation's.
    """

    @staticmethod
    def forward(ctx, fn, num_inputs, *args):
        inputs, params = args[:num_inputs], args[num_inputs:]
        ctx.fn, ctx.params = fn, params
        ctx.autocast = [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cuda", "cpu")]
        ctx.save_for_backward(*inputs)
        with torch.no_grad():
            return fn(*inputs)

    @staticmethod
    def backward(ctx, grad):
        inputs = [x.detach().requires_grad_(x.requires_grad) for x in ctx.saved_tensors]
        with torch.enable_grad(), contextlib.ExitStack() as stack:
            for device, enabled, dtype in ctx.autocast:
                stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
            out = ctx.fn(*inputs)
        wanted = [t for t in (*inputs, *ctx.params) if t.requires_grad]
        found = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
        grads = [next(found) if t.requires_grad else None for t in (*inputs, *ctx.params)]
        if any(g is None for g, p in zip(grads[len(inputs):], ctx.params)):
            raise RuntimeError("a recomputed region did not use the parameters it was given")
        return (None, None, *grads)


def recompute(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor],
              params: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """``fn(*inputs)``, keeping only ``inputs`` for the backward, which recomputes it (``_Recompute``).
    ``params``: the trainable tensors ``fn`` uses besides its inputs."""
    return _Recompute.apply(fn, len(inputs), *inputs, *[p for p in params if p.requires_grad])


def _recompute_whole(module: nn.Module) -> None:
    """``module`` (one tensor in, one out) keeps only its input; its forward runs again in backward."""
    forward = module.forward

    def recomputed(x, *args, **kwargs):
        if args or kwargs or not torch.is_grad_enabled():
            return forward(x, *args, **kwargs)
        return recompute(forward, (x,), list(module.parameters()))

    module.forward = recomputed
    setattr(module, RECOMPUTED, True)


_GATED_FORWARD = ("down_proj=self.down_proj(self.act_fn(self.gate_proj(x))*self.up_proj(x))returndown_proj",
                  "returnself.down_proj(self.act_fn(self.gate_proj(x))*self.up_proj(x))")


def is_gated_mlp(mlp: nn.Module) -> bool:
    """Whether ``mlp.forward`` is exactly ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` (the form of Llama,
    Mistral, Qwen, Gemma and most transformers models), so that ``_recompute_gated_tail`` computes the same."""
    if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return False
    head, body = _source_body(type(mlp))
    return body in _GATED_FORWARD and "def forward(self, x)" in head


def _recompute_gated_tail(mlp: nn.Module, *, lean: bool = False) -> None:
    """A gated MLP that keeps its gate and up projections' outputs only: with ``lean`` (SiLU into a plain down
    projection, ``_silu_into_linear``) through ``_SiluGatedDown``; with SiLU into a frozen NF4 down projection
    (``_silu_into_frozen_nf4``) through ``_SiluGated`` and the down projection's own backward; otherwise - or on a
    dtype ``_SiluGatedDown`` does not compute - through a ``recompute`` region that runs ``down(act(gate) * up)``
    again."""
    product = _silu_into_frozen_nf4(mlp)

    def tail(gate, up):
        return mlp.down_proj(mlp.act_fn(gate) * up)

    def forward(x):
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        if not torch.is_grad_enabled():
            return tail(gate, up)
        if lean and gate.dtype == mlp.down_proj.weight.dtype:
            return _SiluGatedDown.apply(gate, up, mlp.down_proj.weight)
        if product:
            return mlp.down_proj(_SiluGated.apply(gate, up))
        return recompute(tail, (gate, up), list(mlp.down_proj.parameters()) + list(mlp.act_fn.parameters()))

    mlp.forward = forward
    if not (lean or product):
        setattr(mlp, RECOMPUTED, True)


def _saved_ops() -> frozenset:
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    return frozenset(getattr(aten, n).default for n in names if hasattr(aten, n))


_SELECTIVE_DEPTH = [0]


def in_selective_region() -> bool:
    """Whether the op being dispatched passes through selective checkpointing's modes (host work per op)."""
    return _SELECTIVE_DEPTH[0] > 0


class _KeepOutputs(TorchDispatchMode):
    """The forward of a selectively checkpointed layer: keeps (detached) the outputs of the ops ``keep`` says to."""

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True  # skips the per-op compile checks of a plain TorchDispatchMode (several times its cost)

    def __init__(self, ops: frozenset, keep: Callable[[object, int], bool], store: dict):
        super().__init__()
        self.ops, self.keep, self.store, self.count = ops, keep, store, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        _SELECTIVE_DEPTH[0] += 1
        try:
            out = func(*args, **(kwargs or {}))
        finally:
            _SELECTIVE_DEPTH[0] -= 1
        if func in self.ops:
            i = self.count.get(func, 0)
            self.count[func] = i + 1
            if self.keep(func, i):
                self.store[func, i] = tree_map_only(torch.Tensor, torch.Tensor.detach, out)
        return out


class _ReuseOutputs(TorchDispatchMode):
    """The recomputation in backward: the kept outputs are handed back in the order they were made; every other op
    runs again."""

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __init__(self, ops: frozenset, store: dict):
        super().__init__()
        self.ops, self.store, self.count = ops, store, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.ops:
            i = self.count.get(func, 0)
            self.count[func] = i + 1
            kept = self.store.pop((func, i), None)
            if kept is not None:
                return kept
        _SELECTIVE_DEPTH[0] += 1
        try:
            return func(*args, **(kwargs or {}))
        finally:
            _SELECTIVE_DEPTH[0] -= 1


def _keep_all(func, i: int) -> bool:
    return True


def selective_checkpoint_context(keep: Callable[[object, int], bool] = _keep_all):
    """The ``context_fn`` of selective checkpointing: matmul and attention outputs are kept, every other op of the
    layer (norms, RoPE, activation functions, casts) is recomputed in backward.

    What is kept is ``torch.utils.checkpoint.create_selective_checkpoint_contexts`` with a MUST_SAVE policy for those
    ops, as torchtitan's op-level policy keeps them; ``keep(op, i)`` may keep fewer (torchtitan recomputes every
    other matmul). These modes book only those few ops, where PyTorch's record every op for a replay; the Python
    call each op makes into a mode stays, twice per op (forward and recomputation), which is why
    ``checkpoint_layer`` puts them around the feed-forward block only (``bench/results/timing/sac-variants.json``).
    """
    ops, store = _saved_ops(), {}
    return _KeepOutputs(ops, keep, store), _ReuseOutputs(ops, store)


def every_other_matmul(func, i: int) -> bool:
    """torchtitan's policy: keep attention outputs and every other matmul (the odd ones of each layer)."""
    return func is not torch.ops.aten.mm.default or i % 2 == 1


def _load_sharded(base: nn.Module, weights: str) -> None:
    """Load a full (unsharded) checkpoint into an FSDP2-sharded model: each rank keeps its own shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(weights, dtype=next(base.parameters()).dtype).state_dict()
    # Names as the sharded model has them: checkpoint wrappers are transparent to set_model_state_dict, LoRA moves
    # a wrapped linear's weight to ``<name>.base_layer.weight``; the adapters themselves are not in the checkpoint.
    target = {}
    for name in base.state_dict():
        plain = name.replace("_checkpoint_wrapped_module.", "")
        source = plain.replace(".base_layer.", ".")
        if source in full:
            target[plain] = full[source]
    set_model_state_dict(base, target, options=StateDictOptions(full_state_dict=True, strict=False))


def _add_lora(model: nn.Module, plan: Plan) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=plan.lora_rank, lora_alpha=plan.lora_alpha, lora_dropout=plan.lora_dropout,
                        target_modules=list(plan.lora_targets), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _shard(model: nn.Module, layers: nn.ModuleList, plan: Plan, mesh) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=compute_dtype(plan), reduce_dtype=torch.float32) if plan.is_amp \
        else MixedPrecisionPolicy()
    reshard = plan.sharding != "fsdp-grad-op"
    extra = {}
    if plan.offload:
        from torch.distributed.fsdp import CPUOffloadPolicy

        # Sharded weights, gradients and optimizer states on the host (pinned where there is a GPU to copy to).
        extra["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp, **extra)
    # The root keeps embeddings, final norm and lm_head; it is gathered for the whole step anyway.
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=mp, **extra)


@torch.no_grad()
def _init_materialized(model: nn.Module, device: torch.device) -> None:
    """Random weights after ``to_empty`` and correct RoPE buffers; LoRA adapters get peft's own init (B = 0), so
    a sharded LoRA run starts from the base model's function, as an unsharded one does."""
    from peft.tuners.lora import LoraLayer

    for p in model.parameters():
        if p.is_floating_point():
            p.normal_(0.0, 0.02)
    for module in model.modules():  # normalization layers start as the identity, as transformers initializes them
        if "Norm" in type(module).__name__ and isinstance(getattr(module, "weight", None), torch.Tensor):
            module.weight.fill_(1.0)
            if isinstance(getattr(module, "bias", None), torch.Tensor):
                module.bias.zero_()
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for adapter in module.lora_A:
                module.reset_lora_parameters(adapter, init_lora_weights=True)
    for module in model.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "config"):
            fresh = type(module)(module.config).to(device)
            module.inv_freq.copy_(fresh.inv_freq)
            module.original_inv_freq.copy_(fresh.original_inv_freq)


def build_optimizer(model: nn.Module, plan: Plan, *, foreach: bool | None = None,
                    emulate_8bit: bool = False, lr: float = 1e-4,
                    weight_decay: float | None = None) -> torch.optim.Optimizer:
    """The plan's optimizer over the trainable parameters: one parameter group, or under the ``hf`` stack the
    Trainer's two (``Trainer.get_decay_parameter_names``: biases and norms without weight decay) with fp32 states
    for embeddings under bitsandbytes (``Trainer.create_optimizer`` registers that override).

    ``foreach=None`` keeps PyTorch's default (foreach on CUDA); the fake-tensor trace runs on the CPU and passes
    ``True`` to allocate what the CUDA default allocates. ``weight_decay=None`` keeps each optimizer's default
    as memtune measures it (none for SGD and AdamW, bitsandbytes' 0.01 for 8-bit AdamW).
    """
    params: list = [p for p in model.parameters() if p.requires_grad]
    if plan.stack == "hf":
        from transformers import Trainer

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        decayed = set(Trainer.get_decay_parameter_names(None, model))
        params = [{"params": [p for n, p in named if n in decayed]},
                  {"params": [p for n, p in named if n not in decayed], "weight_decay": 0.0}]
    decay = {} if weight_decay is None else {"weight_decay": weight_decay}
    if plan.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.0, foreach=foreach, **decay)
    if plan.optimizer == "adamw-8bit":
        if emulate_8bit:
            optimizer = quant.EmulatedAdamW8bit(params, lr=lr, **decay)
        else:
            optimizer = quant.bitsandbytes().optim.AdamW8bit(params, lr=lr, **decay)
        if plan.stack == "hf":
            for module in model.modules():
                if isinstance(module, nn.Embedding) and module.weight.requires_grad:
                    quant.keep_fp32_states(optimizer, module)
        return optimizer
    decay = {"weight_decay": 0.0 if weight_decay is None else weight_decay}
    if plan.optimizer == "adamw-fused":
        return torch.optim.AdamW(params, lr=lr, fused=True, **decay)
    return torch.optim.AdamW(params, lr=lr, foreach=foreach, **decay)


def build_scheduler(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int = 0,
                    schedule: str = "cosine", min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up from 0 over ``warmup_steps``, then cosine or linear decay to ``min_lr_ratio`` of the peak at
    ``total_steps`` (or a constant rate), as a ``LambdaLR`` over the optimizer's learning rate."""
    warmup_steps = min(warmup_steps, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
        return min_lr_ratio + (1.0 - min_lr_ratio) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_batch(spec: ModelSpec, plan: Plan, device: torch.device | str, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch of ``batch_size`` full-length random sequences (labels = inputs, as causal-LM fine-tuning does),
    the same for a given seed on every rank and device."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, spec.vocab_size, (plan.batch_size, plan.seq_len), generator=generator).to(device)
    return {"input_ids": ids, "labels": ids.clone()}


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor], plan: Plan, *,
               scaler=None, on_phase: Callable[[str], None] = lambda phase: None,
               micro_batches: int | None = None) -> torch.Tensor:
    """``micro_batches`` (default ``plan.grad_accum``) forward/backward passes accumulating gradients, then the
    optimizer step and ``zero_grad(set_to_none=True)``; ``on_phase`` marks the boundaries.

    amp-* without FSDP runs the forward under autocast; with FSDP the MixedPrecisionPolicy does the casting.
    """
    device_type = batch["input_ids"].device.type
    steps = micro_batches or plan.grad_accum
    for _ in range(steps):
        on_phase("forward")
        with autocast(plan, device_type):
            loss = model(**batch, use_cache=False).loss / steps
        on_phase("backward")
        (scaler.scale(loss) if scaler is not None else loss).backward()
    _optimizer_step(optimizer, scaler, on_phase)
    return loss.detach()


@dataclass(frozen=True, kw_only=True, slots=True)
class StepResult:
    loss: torch.Tensor
    """The sum of the micro-batches' (scaled) losses: this rank's share of the step's loss."""
    grad_norm: torch.Tensor
    """Total gradient norm before clipping (over all ranks' shards)."""


def train_step_on_batches(model: nn.Module, optimizer: torch.optim.Optimizer,
                          batches: Sequence[dict[str, torch.Tensor]], plan: Plan, *, num_targets: torch.Tensor,
                          scaler=None, max_grad_norm: float | None = None,
                          on_phase: Callable[[str], None] = lambda phase: None) -> StepResult:
    """``train_step`` on real data: one forward/backward per micro-batch of ``batches``, the gradient norm (clipped
    to ``max_grad_norm``), the optimizer step and ``zero_grad(set_to_none=True)``.

    Each micro-batch's loss is its summed cross-entropy over ``num_targets`` (the step's target tokens on this rank's
    share: all ranks' targets / world size), so the accumulated, rank-averaged gradient is that of the mean loss per
    target token of the whole step, however the tokens fall into micro-batches and ranks.
    """
    loss = None
    for batch in batches:
        on_phase("forward")
        with autocast(plan, batch["input_ids"].device.type):
            micro = model(**batch, use_cache=False, num_items_in_batch=num_targets).loss
        on_phase("backward")
        (scaler.scale(micro) if scaler is not None else micro).backward()
        loss = micro.detach() if loss is None else loss + micro.detach()
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm else float("inf"))
    _optimizer_step(optimizer, scaler, on_phase)
    return StepResult(loss=loss, grad_norm=norm.detach())


@contextlib.contextmanager
def collection_between_steps(every: int = 50):
    """Python's cyclic garbage collector kept out of the training steps (torchtitan's ``GarbageCollection``): one
    full collection on entry, automatic collection off inside, and ``collect(step)`` - to call after each step - runs
    a young-generation collection every ``every`` steps. An automatic collection fires whenever enough objects were
    allocated, in the middle of a step; a full one walks every Python object of torch and transformers and stalls
    the host for tens of milliseconds, which a step whose pace the host sets (a small model, k-bit layers) pays
    in full."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()

    def collect(step: int) -> None:
        if every and step % every == 0:
            gc.collect(1)

    try:
        yield collect
    finally:
        if enabled:
            gc.enable()


def autocast(plan: Plan, device_type: str):
    """Autocast for amp-* plans without FSDP (FSDP's MixedPrecisionPolicy casts instead), else a no-op."""
    amp = plan.is_amp and plan.sharding == "none"
    return torch.autocast(device_type, dtype=compute_dtype(plan)) if amp else contextlib.nullcontext()


def _optimizer_step(optimizer: torch.optim.Optimizer, scaler, on_phase: Callable[[str], None]) -> None:
    on_phase("optimizer_step")
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    on_phase("end")

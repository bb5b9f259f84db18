"""One training step, built the same way for the fake-tensor trace, the GPU measurement and the real run.

Order (as in torchtitan): build on the meta device -> quantize -> LoRA (peft) -> activation checkpointing
(``checkpoint_wrapper``, non-reentrant, per decoder layer) -> FSDP2 ``fully_shard`` per decoder layer, then the root
-> materialize on the target device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from memtune.plan import Plan
from memtune.specs.model import ModelSpec, _decoder_layers
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
        from peft import prepare_model_for_kbit_training

        quant.quantize_decoder_linears(model, plan, emulate=emulate_quant or device.type == "meta")
        # The usual QLoRA preparation: freeze the base and upcast its remaining bf16/fp16 weights (embeddings,
        # norms, lm_head) to fp32; checkpointing stays the plan's own knob.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if plan.peft == "lora":
        model = _add_lora(model, plan)
    layers = _decoder_layers(model)
    if plan.checkpointing == "full":
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, layer in enumerate(layers):
            layers[i] = checkpoint_wrapper(layer)
    if plan.sharding != "none":
        _shard(model, layers, plan, mesh)
        if device.type != "meta":
            model.to_empty(device=device)
            _init_materialized(model, device)
            if weights:
                _load_sharded(base, weights)
    model.train()
    return model


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
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
    # The root keeps embeddings, final norm and lm_head; it is gathered for the whole step anyway.
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=mp)


@torch.no_grad()
def _init_materialized(model: nn.Module, device: torch.device) -> None:
    """Random weights after ``to_empty`` and correct RoPE buffers; LoRA adapters get peft's own init (B = 0), so
    a sharded LoRA run starts from the base model's function, as an unsharded one does."""
    from peft.tuners.lora import LoraLayer

    for p in model.parameters():
        if p.is_floating_point():
            p.normal_(0.0, 0.02)
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
                    emulate_8bit: bool = False) -> torch.optim.Optimizer:
    """The plan's optimizer over the trainable parameters.

    ``foreach=None`` keeps PyTorch's default (foreach on CUDA); the fake-tensor trace runs on the CPU and passes
    ``True`` to allocate what the CUDA default allocates.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if plan.optimizer == "sgd":
        return torch.optim.SGD(params, lr=1e-4, momentum=0.0, foreach=foreach)
    if plan.optimizer == "adamw-8bit":
        if emulate_8bit:
            return quant.EmulatedAdamW8bit(params, lr=1e-4)
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-4)
    if plan.optimizer == "adamw-fused":
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, foreach=foreach)


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
    amp = plan.is_amp and plan.sharding == "none"
    steps = micro_batches or plan.grad_accum
    for _ in range(steps):
        on_phase("forward")
        with torch.autocast(device_type, dtype=compute_dtype(plan)) if amp else contextlib.nullcontext():
            loss = model(**batch, use_cache=False).loss / steps
        on_phase("backward")
        (scaler.scale(loss) if scaler is not None else loss).backward()
    on_phase("optimizer_step")
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    on_phase("end")
    return loss.detach()

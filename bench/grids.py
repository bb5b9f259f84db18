"""The configurations the accuracy benchmark measures: (model profile, plan fields) pairs."""

from __future__ import annotations


def _cfg(model: str, **plan) -> dict:
    return {"model": model, "plan": plan}


def single_gpu() -> list[dict]:
    """Full FT and LoRA, AC on/off, fp32/bf16/AMP, SDPA/eager, over five architectures, on one GPU."""
    grid = []
    for model in ("llama-guard-3-1b", "qwen2.5-0.5b"):
        for precision in ("bf16", "fp32", "amp-bf16"):
            for ac in ("none", "full"):
                grid.append(_cfg(model, precision=precision, checkpointing=ac, batch_size=2, seq_len=1024))
        grid.append(_cfg(model, precision="bf16", peft="lora", batch_size=4, seq_len=1024))
        grid.append(_cfg(model, precision="bf16", peft="lora", checkpointing="full", batch_size=4, seq_len=2048))
        grid.append(_cfg(model, precision="bf16", batch_size=1, seq_len=4096))
        grid.append(_cfg(model, precision="bf16", optimizer="sgd", batch_size=2, seq_len=512))
    grid += [
        _cfg("llama-guard-3-1b", precision="bf16", attention="eager", batch_size=1, seq_len=1024),
        _cfg("llama-guard-3-1b", precision="amp-bf16", peft="lora", lora_rank=16,
             lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"), batch_size=2, seq_len=2048),
        _cfg("llama-guard-3-1b", precision="amp-fp16", batch_size=2, seq_len=1024),
        _cfg("qwen2.5-0.5b", precision="fp16", peft="lora", batch_size=2, seq_len=2048),
        _cfg("llama-3.2-3b", precision="bf16", batch_size=1, seq_len=2048),
        _cfg("llama-3.2-3b", precision="bf16", checkpointing="full", batch_size=4, seq_len=2048),
        _cfg("llama-3.2-3b", precision="bf16", peft="lora", batch_size=2, seq_len=2048),
        _cfg("gemma-2-2b", precision="bf16", attention="eager", batch_size=1, seq_len=1024),
        _cfg("gemma-2-2b", precision="bf16", attention="eager", checkpointing="full", batch_size=2, seq_len=2048),
        _cfg("gemma-2-2b", precision="bf16", attention="eager", peft="lora", batch_size=2, seq_len=1024),
        _cfg("mistral-7b", precision="bf16", batch_size=1, seq_len=2048),
        _cfg("mistral-7b", precision="bf16", peft="lora", checkpointing="full", batch_size=4, seq_len=2048),
        _cfg("qwen2.5-7b", precision="bf16", peft="lora", batch_size=1, seq_len=2048),
        _cfg("llama-3.1-8b", precision="bf16", checkpointing="full", batch_size=2, seq_len=4096),
        _cfg("llama-3.1-8b", precision="bf16", peft="lora", lora_targets=("q_proj", "k_proj", "v_proj", "o_proj",
             "gate_proj", "up_proj", "down_proj"), lora_rank=16, batch_size=2, seq_len=2048),
    ]
    return grid


def fsdp_2gpu() -> list[dict]:
    """FSDP2 over 2 GPUs: reshard or not, mixed precision, AC, LoRA."""
    two = {"num_gpus": 2}
    return [
        _cfg("llama-guard-3-1b", sharding="fsdp", precision="bf16", batch_size=2, seq_len=1024, **two),
        _cfg("llama-guard-3-1b", sharding="fsdp", precision="amp-bf16", batch_size=2, seq_len=1024, **two),
        _cfg("llama-guard-3-1b", sharding="fsdp", precision="amp-bf16", checkpointing="full", batch_size=4,
             seq_len=2048, **two),
        _cfg("llama-guard-3-1b", sharding="fsdp-grad-op", precision="bf16", batch_size=2, seq_len=1024, **two),
        _cfg("llama-guard-3-1b", sharding="fsdp", precision="bf16", peft="lora", batch_size=4, seq_len=1024, **two),
        _cfg("qwen2.5-0.5b", sharding="fsdp", precision="fp32", batch_size=2, seq_len=1024, **two),
        _cfg("llama-3.2-3b", sharding="fsdp", precision="bf16", checkpointing="full", batch_size=2, seq_len=2048, **two),
        _cfg("llama-3.1-8b", sharding="fsdp", precision="bf16", checkpointing="full", batch_size=1, seq_len=4096, **two),
        _cfg("mistral-7b", sharding="fsdp", precision="amp-bf16", checkpointing="full", batch_size=1, seq_len=2048,
             **two),
    ]


def quantized() -> list[dict]:
    """bitsandbytes 4-bit (NF4) and 8-bit base weights with LoRA, and 8-bit AdamW, on one GPU."""
    return [
        _cfg("llama-guard-3-1b", precision="bf16", peft="lora", quantization="4bit", batch_size=2, seq_len=1024),
        _cfg("llama-guard-3-1b", precision="bf16", peft="lora", quantization="4bit", checkpointing="full",
             batch_size=4, seq_len=2048),
        _cfg("llama-guard-3-1b", precision="bf16", peft="lora", quantization="8bit", batch_size=2, seq_len=1024),
        _cfg("llama-guard-3-1b", precision="bf16", optimizer="adamw-8bit", batch_size=2, seq_len=1024),
        _cfg("qwen2.5-0.5b", precision="bf16", peft="lora", quantization="4bit", batch_size=4, seq_len=1024),
        _cfg("mistral-7b", precision="bf16", peft="lora", quantization="4bit", batch_size=2, seq_len=2048),
        _cfg("llama-3.1-8b", precision="bf16", peft="lora", quantization="4bit", checkpointing="full",
             batch_size=4, seq_len=2048),
    ]


def knobs() -> list[dict]:
    """The knobs the planner searches beyond the obvious: fused AdamW, selective checkpointing, expandable segments,
    and FSDP2 CPU offload on one GPU (FSDP2 needs a process group: ``torchrun --nproc-per-node 1 bench/measure.py
    --grid knobs``)."""
    return [
        _cfg("llama-guard-3-1b", precision="bf16", optimizer="adamw-fused", batch_size=2, seq_len=1024),
        _cfg("llama-guard-3-1b", precision="bf16", checkpointing="selective", batch_size=2, seq_len=2048),
        _cfg("llama-guard-3-1b", precision="bf16", peft="lora", checkpointing="selective", batch_size=4,
             seq_len=2048),
        _cfg("llama-3.2-3b", precision="bf16", checkpointing="selective", batch_size=1, seq_len=4096),
        _cfg("llama-3.1-8b", precision="bf16", peft="lora", quantization="4bit", checkpointing="selective",
             batch_size=4, seq_len=2048),
        _cfg("llama-guard-3-1b", precision="bf16", checkpointing="full", expandable_segments=True, batch_size=1,
             seq_len=4096),
        _cfg("qwen2.5-0.5b", precision="bf16", expandable_segments=True, batch_size=2, seq_len=4096),
        _cfg("llama-guard-3-1b", precision="bf16", sharding="fsdp", offload=True, batch_size=2, seq_len=2048),
        _cfg("llama-3.2-3b", precision="bf16", sharding="fsdp", offload=True, checkpointing="full", batch_size=2,
             seq_len=4096),
    ]


def plan_grid(models, plans, shapes):
    """``(model, spec, plan fields, plan)`` for every model x plan fields x (micro-batch, sequence length): the
    CPU-only comparisons of the estimator's paths (``bench/fast.py``, ``bench/screen.py``) walk this."""
    from memtune.plan import Plan
    from memtune.specs import resolve_model

    for model in models:
        spec = resolve_model(model)
        for fields in plans:
            for batch, seq in shapes:
                yield model, spec, fields, Plan(batch_size=batch, seq_len=seq, **fields)


GRIDS = {"single": single_gpu, "fsdp2": fsdp_2gpu, "quant": quantized, "knobs": knobs}

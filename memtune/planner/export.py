"""A plan written out for the tools people train with: llama-cookbook, Hugging Face Trainer, torchrun.

Each function is pure and raises ``InvalidPlanError`` when the tool cannot express the plan, naming the rule.
llama-cookbook's rules are ``memtune.plan.llama_cookbook_rules``; a one-GPU plan with checkpointing runs there as
FSDP over one GPU (its checkpointing comes only with FSDP).
"""

from __future__ import annotations

import shlex

from memtune.errors import InvalidPlanError
from memtune.plan import Plan, llama_cookbook_rules

LLAMA_COOKBOOK_MODULE = "llama_cookbook.finetuning"
_SHARDING = {"fsdp-grad-op": "SHARD_GRAD_OP", "hsdp": "HYBRID_SHARD"}
"""llama-cookbook's ``fsdp_config.sharding_strategy`` is torch's ``ShardingStrategy`` enum (FULL_SHARD by default)."""


def llama_cookbook_kwargs(model_name: str, plan: Plan) -> dict:
    """Keyword arguments for ``llama_cookbook.finetuning.main(**kwargs)`` (the same names as its CLI flags; each a
    field of its ``train_config``, ``fsdp_config``, ``lora_config`` or ``quantization_config``); what it cannot run
    is ``memtune.plan.llama_cookbook_rules``.

    ``sharding_strategy`` is a ``torch.distributed.fsdp.ShardingStrategy`` member where the plan needs other than
    llama-cookbook's default (full sharding); 4-bit plans ask for NF4 with double quantization (its default is FP4
    without), the 4-bit format memtune estimates."""
    errors = llama_cookbook_rules(plan)
    fsdp = plan.sharding != "none" or plan.checkpointing == "full"
    kwargs: dict = {"model_name": model_name, "batch_size_training": plan.batch_size,
                    "gradient_accumulation_steps": plan.grad_accum, "batching_strategy": plan.batching,
                    "context_length": plan.seq_len, "enable_fsdp": fsdp}
    if fsdp:
        kwargs["fsdp_activation_checkpointing"] = plan.checkpointing == "full"
        if plan.sharding in _SHARDING:
            from torch.distributed.fsdp import ShardingStrategy

            kwargs["sharding_strategy"] = ShardingStrategy[_SHARDING[plan.sharding]]
        if plan.sharding == "hsdp":
            kwargs.update(hsdp=True, sharding_group_size=plan.num_gpus, replica_group_size=plan.nodes)
        if plan.precision == "bf16":
            kwargs.update(pure_bf16=True, mixed_precision=False)  # the weights are bf16 already: no casts
    if plan.quantization != "none":
        kwargs["quantization"] = plan.quantization
        if plan.quantization == "4bit":
            kwargs.update(quant_type="nf4", use_double_quant=True)
    if plan.peft == "lora":
        kwargs.update(use_peft=True, peft_method="lora", r=plan.lora_rank, lora_alpha=plan.lora_alpha,
                      lora_dropout=plan.lora_dropout, target_modules=list(plan.lora_targets))
    if errors:
        raise InvalidPlanError(errors)
    return kwargs


def llama_cookbook_command(model_name: str, plan: Plan, *, rdzv_endpoint: str = "$MASTER_ADDR:29500") -> list[str]:
    """The command that runs llama-cookbook's fine-tuning with this plan (torchrun whenever FSDP is on)."""
    kwargs = llama_cookbook_kwargs(model_name, plan)
    if "sharding_strategy" in kwargs:
        raise InvalidPlanError([f"llama-cookbook's command line cannot set sharding_strategy (an enum): call "
                                f"llama_cookbook.finetuning.main(sharding_strategy=ShardingStrategy."
                                f"{kwargs['sharding_strategy'].name}, ...) or use --sharding fsdp"])
    flags = []
    for key, value in kwargs.items():
        if value is True:
            flags.append(f"--{key}")
        elif value is False:
            continue
        elif isinstance(value, list):
            flags += [f"--{key}", ",".join(value)]
        else:
            flags += [f"--{key}", str(value)]
    env = [f"{k}={v}" for k, v in plan.allocator_env.items()]
    if not kwargs["enable_fsdp"]:
        return [*env, "python", "-m", LLAMA_COOKBOOK_MODULE, *flags]
    return [*env, *torchrun_prefix(plan, rdzv_endpoint=rdzv_endpoint), "-m", LLAMA_COOKBOOK_MODULE, *flags]


def torchrun_prefix(plan: Plan, *, rdzv_endpoint: str = "$MASTER_ADDR:29500") -> list[str]:
    """``torchrun`` for the plan's GPUs and nodes (run the same line on every node with its ``--node-rank``)."""
    cmd = ["torchrun", f"--nnodes={plan.nodes}", f"--nproc-per-node={plan.num_gpus}"]
    if plan.nodes > 1:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", "--node-rank=$NODE_RANK"]
    return cmd


def hf_trainer_config(model_name: str, plan: Plan) -> dict:
    """``from_pretrained`` keyword arguments, ``TrainingArguments`` and the LoRA config for the Hugging Face
    Trainer (packing is TRL's ``SFTConfig(packing=True, max_length=seq_len)``)."""
    if plan.checkpointing == "selective":
        raise InvalidPlanError(["the Hugging Face Trainer checkpoints whole layers only: export the plan with full "
                                "checkpointing (less memory, more recompute) or run it with memtune launch"])
    if plan.sharding == "hsdp":
        raise InvalidPlanError(["the Hugging Face Trainer's FSDP2 has no hybrid sharding (TrainingArguments takes "
                                "hybrid_shard with FSDP1 only): export with --sharding fsdp or run it with memtune "
                                "launch"])
    dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(plan.precision, "float32")
    model_kwargs: dict = {"pretrained_model_name_or_path": model_name, "dtype": dtype, "attn_implementation": plan.attention}
    if plan.quantization == "4bit":
        model_kwargs["quantization_config"] = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                               "bnb_4bit_use_double_quant": True,
                                               "bnb_4bit_compute_dtype": "float16" if plan.precision == "fp16" else "bfloat16"}
        model_kwargs["dtype"] = "float16" if plan.precision == "fp16" else "bfloat16"
    elif plan.quantization == "8bit":
        model_kwargs["quantization_config"] = {"load_in_8bit": True}
        model_kwargs["dtype"] = "float16" if plan.precision == "fp16" else "bfloat16"
    args: dict = {"per_device_train_batch_size": plan.batch_size, "gradient_accumulation_steps": plan.grad_accum,
                  "bf16": plan.precision == "amp-bf16", "fp16": plan.precision == "amp-fp16",
                  "gradient_checkpointing": plan.checkpointing == "full",
                  "optim": {"adamw": "adamw_torch", "adamw-fused": "adamw_torch_fused", "adamw-8bit": "adamw_bnb_8bit",
                            "sgd": "sgd"}[plan.optimizer],
                  **_length_grouping(plan.batching == "padding")}
    if plan.checkpointing == "full":
        args["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    if plan.sharding != "none":
        # Under FSDP the checkpointing is FSDP's own (inside each wrapped layer, as memtune traces it); the
        # Trainer's would gather each layer's weights once more in the backward.
        args["gradient_checkpointing"] = False
        args.pop("gradient_checkpointing_kwargs", None)
        args["fsdp"] = {"fsdp": "full_shard auto_wrap",
                        "fsdp-grad-op": "shard_grad_op auto_wrap"}[plan.sharding] + (" offload" if plan.offload else "")
        args["fsdp_config"] = {"fsdp_version": 2, "reshard_after_forward": plan.sharding != "fsdp-grad-op",
                               "activation_checkpointing": plan.checkpointing == "full"}
    out = {"model": model_kwargs, "training_arguments": args, "accelerate_config": accelerate_config(plan)}
    if plan.allocator_env:
        out["environment"] = plan.allocator_env
    if plan.peft == "lora":
        out["lora_config"] = {"r": plan.lora_rank, "lora_alpha": plan.lora_alpha, "lora_dropout": plan.lora_dropout,
                              "target_modules": list(plan.lora_targets), "task_type": "CAUSAL_LM"}
    if plan.batching == "packing":
        out["sft_config"] = {"packing": True, "max_length": plan.seq_len}
    return out


def _length_grouping(grouped: bool) -> dict:
    """Length-grouped batches in the installed transformers' words: ``train_sampling_strategy`` (transformers 5)
    or ``group_by_length`` (4.x)."""
    import dataclasses

    from transformers import TrainingArguments

    if "train_sampling_strategy" in {f.name for f in dataclasses.fields(TrainingArguments)}:
        return {"train_sampling_strategy": "group_by_length" if grouped else "random"}
    return {"group_by_length": grouped}


def accelerate_config(plan: Plan) -> dict:
    """An ``accelerate launch --config_file`` configuration for the plan (FSDP2 when sharded)."""
    config: dict = {"compute_environment": "LOCAL_MACHINE", "debug": False, "use_cpu": False, "num_machines": plan.nodes,
                    "num_processes": plan.world_size, "machine_rank": 0,
                    "mixed_precision": {"amp-bf16": "bf16", "amp-fp16": "fp16"}.get(plan.precision, "no"),
                    "distributed_type": "NO" if plan.world_size == 1 and plan.sharding == "none" else "MULTI_GPU"}
    if plan.sharding != "none":
        config["distributed_type"] = "FSDP"
        config["fsdp_config"] = {
            "fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_reshard_after_forward": plan.sharding != "fsdp-grad-op",
            "fsdp_activation_checkpointing": plan.checkpointing == "full",
            "fsdp_state_dict_type": "SHARDED_STATE_DICT", "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_offload_params": plan.offload}
    return config


def shell(cmd: list[str]) -> str:
    """A command line to paste; ``$VARS`` stay unquoted so the shell expands them."""
    return " ".join(c if "$" in c else shlex.quote(c) for c in cmd)


EXPORTERS = {"llama-cookbook": llama_cookbook_kwargs, "hf": hf_trainer_config, "torchrun": llama_cookbook_command}
"""What each ``--export`` target prints the plan with (the torchrun command runs llama-cookbook)."""


def expressible(tool: str):
    """A check for the planner: raises ``InvalidPlanError`` (the tool's rule) for a plan ``tool`` cannot run."""
    exporter = EXPORTERS[tool]

    def check(plan: Plan) -> None:
        exporter("model", plan)

    return check


def plan_exports(model_name: str, plan: Plan) -> list:
    """The plan in each other tool's words (``memtune.records.Export``): llama-cookbook's command and
    ``finetuning.main`` keyword arguments, the Hugging Face Trainer's settings; where a tool cannot express the
    plan, why."""
    import json

    from memtune.errors import MemtuneError
    from memtune.records import Export

    out = []
    for title, make, lang in (
        ("llama-cookbook command", lambda: shell(llama_cookbook_command(model_name, plan)), "shell"),
        ("llama-cookbook finetuning.main keyword arguments",
         lambda: json.dumps(llama_cookbook_kwargs(model_name, plan), indent=2), "json"),
        ("Hugging Face from_pretrained, TrainingArguments, LoRA and accelerate settings",
         lambda: json.dumps(hf_trainer_config(model_name, plan), indent=2), "json"),
    ):
        try:
            out.append(Export(title=title, text=make(), lang=lang))
        except MemtuneError as e:
            out.append(Export(title=title, text=f"not expressible there: {e}", lang="note"))
    return out

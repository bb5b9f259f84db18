import dataclasses

import pytest

from memtune.errors import InvalidPlanError
from memtune.plan import Plan
from memtune.planner.export import hf_trainer_config, llama_cookbook_command, llama_cookbook_kwargs, shell


def test_checkpointing_on_one_gpu_runs_as_fsdp_in_llama_cookbook():
    kw = llama_cookbook_kwargs("meta-llama/Llama-Guard-3-1B", Plan(checkpointing="full", seq_len=4096))
    assert kw["enable_fsdp"] and kw["fsdp_activation_checkpointing"] and kw["pure_bf16"]
    cmd = llama_cookbook_command("meta-llama/Llama-Guard-3-1B", Plan(checkpointing="full"))
    assert cmd[:3] == ["torchrun", "--nnodes=1", "--nproc-per-node=1"] and "--enable_fsdp" in cmd


def test_default_path_without_fsdp_has_no_checkpointing():
    kw = llama_cookbook_kwargs("m", Plan(batching="padding", seq_len=1139))
    assert kw["enable_fsdp"] is False and "fsdp_activation_checkpointing" not in kw
    assert llama_cookbook_command("m", Plan())[:3] == ["python", "-m", "llama_cookbook.finetuning"]


@pytest.mark.parametrize(("fields", "message"), [
    ({"quantization": "8bit", "peft": "lora", "checkpointing": "full"}, "rejects 8-bit quantization with FSDP"),
    ({"precision": "fp32"}, "loads the weights in bf16"),
    ({"precision": "fp16", "peft": "lora"}, "use_fp16"),
    ({"precision": "amp-bf16", "sharding": "fsdp", "num_gpus": 2}, "loads the weights in bf16"),
    ({"optimizer": "sgd"}, "AdamW"),
    ({"checkpointing": "selective"}, "whole layers only"),
    ({"sharding": "fsdp", "offload": True}, "CPU offload"),
])
def test_what_llama_cookbook_cannot_express(fields, message):
    with pytest.raises(InvalidPlanError, match=message):
        llama_cookbook_kwargs("m", Plan(**fields))


def test_lora_and_hsdp_flags():
    plan = Plan(peft="lora", lora_targets=("q_proj", "k_proj"), sharding="hsdp", num_gpus=8, nodes=2)
    kw = llama_cookbook_kwargs("m", plan)
    assert kw["use_peft"] and kw["target_modules"] == ["q_proj", "k_proj"]
    assert kw["hsdp"] and kw["sharding_group_size"] == 8 and kw["replica_group_size"] == 2
    assert kw["sharding_strategy"].name == "HYBRID_SHARD"  # hsdp needs it, and only Python can pass the enum
    line = shell(llama_cookbook_command("m", dataclasses.replace(plan, sharding="fsdp")))
    assert "--nnodes=2" in line and "--rdzv-endpoint=$MASTER_ADDR:29500" in line and "--target_modules q_proj,k_proj" in line


def test_hf_trainer_config():
    cfg = hf_trainer_config("m", Plan(precision="amp-bf16", checkpointing="full", sharding="fsdp", num_gpus=4,
                                      optimizer="adamw-fused", batching="packing", seq_len=4096))
    args = cfg["training_arguments"]
    assert args["bf16"] and args["fsdp_config"]["activation_checkpointing"] and args["optim"] == "adamw_torch_fused"
    assert not args["gradient_checkpointing"]  # FSDP's own checkpointing, not a second gather in the backward
    assert args["fsdp"] == "full_shard auto_wrap" and cfg["sft_config"] == {"packing": True, "max_length": 4096}
    acc = cfg["accelerate_config"]
    assert acc["distributed_type"] == "FSDP" and acc["num_processes"] == 4 and acc["mixed_precision"] == "bf16"
    assert acc["fsdp_config"]["fsdp_version"] == 2 and acc["fsdp_config"]["fsdp_activation_checkpointing"]
    q = hf_trainer_config("m", Plan(peft="lora", quantization="4bit"))
    assert q["model"]["quantization_config"]["bnb_4bit_quant_type"] == "nf4" and "lora_config" in q
    assert hf_trainer_config("m", Plan(optimizer="adamw-8bit"))["training_arguments"]["optim"] == "adamw_bnb_8bit"


def test_expandable_segments_travel_as_the_allocator_environment():
    plan = Plan(expandable_segments=True, sharding="fsdp", num_gpus=2)
    cmd = llama_cookbook_command("meta-llama/Llama-Guard-3-1B", plan)
    assert cmd[0] == "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" and cmd[1] == "torchrun"
    assert shell(cmd).startswith("PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True torchrun ")
    assert hf_trainer_config("m", plan)["environment"] == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert "environment" not in hf_trainer_config("m", Plan())


def test_selective_checkpointing_is_not_expressible_in_llama_cookbook_or_the_trainer():
    plan = Plan(checkpointing="selective")
    with pytest.raises(InvalidPlanError, match="checkpoints whole layers only"):
        llama_cookbook_kwargs("m", plan)
    with pytest.raises(InvalidPlanError, match="checkpoints whole layers only"):
        hf_trainer_config("m", plan)


HF_PLANS = [Plan(), Plan(checkpointing="full", optimizer="adamw-8bit"), Plan(precision="amp-bf16", optimizer="adamw-fused"),
            Plan(precision="amp-fp16", peft="lora", lora_targets=("q_proj", "k_proj", "v_proj", "o_proj")),
            Plan(peft="lora", quantization="4bit", checkpointing="full"), Plan(peft="lora", quantization="8bit"),
            Plan(sharding="fsdp", num_gpus=4, checkpointing="full", precision="amp-bf16"),
            Plan(sharding="fsdp-grad-op", num_gpus=2, peft="lora"), Plan(sharding="fsdp", offload=True),
            Plan(batching="packing", optimizer="sgd", expandable_segments=True)]


@pytest.mark.parametrize("plan", HF_PLANS, ids=lambda p: f"{p.peft}-{p.quantization}-{p.sharding}-{p.optimizer}")
def test_the_hf_export_constructs_with_the_installed_libraries(plan):
    """Every part of the export is taken by the class it is for, on the transformers, peft and accelerate here
    (``use_cpu`` only because this machine has no GPU for bf16/fp16)."""
    from accelerate.commands.config.config_args import ClusterConfig
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig, TrainingArguments

    cfg = hf_trainer_config("m", plan)
    args = TrainingArguments(output_dir="unused", use_cpu=True, **cfg["training_arguments"])
    assert args.per_device_train_batch_size == plan.batch_size and args.gradient_accumulation_steps == plan.grad_accum
    assert bool(args.fsdp) == (plan.sharding != "none")
    if plan.batching == "padding":
        assert "group_by_length" in str(getattr(args, "train_sampling_strategy", "")) or args.group_by_length
    if "quantization_config" in cfg["model"]:
        q = BitsAndBytesConfig(**cfg["model"]["quantization_config"])
        assert q.load_in_4bit == (plan.quantization == "4bit") and q.load_in_8bit == (plan.quantization == "8bit")
    if plan.peft == "lora":
        assert set(LoraConfig(**cfg["lora_config"]).target_modules) == set(plan.lora_targets)
    acc = ClusterConfig(**cfg["accelerate_config"])
    assert acc.num_processes == plan.world_size and (acc.distributed_type == "FSDP") == (plan.sharding != "none")


def test_hybrid_sharding_is_not_expressible_in_the_trainer():
    with pytest.raises(InvalidPlanError, match="no hybrid sharding"):
        hf_trainer_config("m", Plan(sharding="hsdp", num_gpus=8, nodes=2))


COOKBOOK_PLANS = [Plan(), Plan(checkpointing="full"), Plan(peft="lora", checkpointing="full", quantization="4bit"),
                  Plan(peft="lora", quantization="4bit"), Plan(peft="lora", quantization="8bit"),
                  Plan(sharding="fsdp", num_gpus=8, checkpointing="full"),
                  Plan(sharding="fsdp-grad-op", num_gpus=2),
                  Plan(sharding="hsdp", num_gpus=8, nodes=2, peft="lora", lora_targets=("q_proj", "o_proj"))]


@pytest.mark.parametrize("plan", COOKBOOK_PLANS, ids=lambda p: f"{p.peft}-{p.quantization}-{p.sharding}-{p.precision}")
def test_every_llama_cookbook_key_is_a_field_of_its_configs_with_the_type_it_uses(plan):
    configs = pytest.importorskip("llama_cookbook.configs")
    import dataclasses
    import typing

    kinds = (configs.train_config, configs.fsdp_config, configs.lora_config, configs.quantization_config)
    for key, value in llama_cookbook_kwargs("meta-llama/Llama-Guard-3-1B", plan).items():
        owners = [c for c in kinds if key in {f.name for f in dataclasses.fields(c)} or hasattr(c, key)]
        assert owners, f"{key} is not a llama-cookbook config field"
        hints = typing.get_type_hints(owners[0])
        expected = hints.get(key)
        default = getattr(owners[0](), key)
        if expected is not None and typing.get_origin(expected) is list:
            assert isinstance(value, list) and all(isinstance(v, str) for v in value), key
        elif expected is not None and not (default is None and isinstance(value, str)):
            assert isinstance(value, expected), f"{key}={value!r} is not a {expected}"


def test_the_llama_cookbook_command_refuses_what_its_command_line_cannot_say():
    from torch.distributed.fsdp import ShardingStrategy

    plan = Plan(sharding="fsdp-grad-op", num_gpus=2)
    assert llama_cookbook_kwargs("m", plan)["sharding_strategy"] is ShardingStrategy.SHARD_GRAD_OP
    assert "sharding_strategy" not in llama_cookbook_kwargs("m", Plan(sharding="fsdp", num_gpus=2))
    with pytest.raises(InvalidPlanError, match="cannot set sharding_strategy"):
        llama_cookbook_command("m", plan)

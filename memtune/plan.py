"""Plan: one frozen value of every knob of a fine-tune, and the rules that say which plans can run."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Literal, get_args, get_origin, get_type_hints

from memtune.errors import InvalidPlanError

Precision = Literal["fp32", "bf16", "fp16", "amp-bf16", "amp-fp16"]
Sharding = Literal["none", "fsdp", "fsdp-grad-op", "hsdp"]
Checkpointing = Literal["none", "selective", "full"]
Peft = Literal["none", "lora"]
Quantization = Literal["none", "8bit", "4bit"]
Optimizer = Literal["adamw", "adamw-fused", "adamw-8bit", "sgd"]
Attention = Literal["sdpa", "eager"]
Batching = Literal["padding", "packing"]
Stack = Literal["memtune", "hf", "llama-cookbook"]
STACK_NAMES = {"memtune": "memtune", "hf": "the Hugging Face Trainer", "llama-cookbook": "llama-cookbook"}

DEFAULT_LORA_TARGETS = ("q_proj", "v_proj")

PLAN_LIMITS = {"num_gpus": 72, "nodes": 4096, "batch_size": 1 << 16, "seq_len": 1 << 22, "lora_rank": 1 << 16,
               "grad_accum": 4096}
"""The largest value of each count a plan may hold: GPUs per node (an NVL72 rack is the largest NVLink domain),
nodes, and sizes past any run (beyond them the trace and the step-time model would take minutes or overflow)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    precision: Precision = "bf16"
    """fp32/bf16/fp16: weights, grads and optimizer states in that dtype. amp-*: fp32 weights, autocast compute
    (with FSDP: MixedPrecisionPolicy(param_dtype=bf16/fp16, reduce_dtype=fp32))."""
    sharding: Sharding = "none"
    """fsdp: fully_shard per decoder layer and the root, reshard after forward. fsdp-grad-op: keep parameters
    unsharded between forward and backward. hsdp: shard within a node, replicate across nodes."""
    num_gpus: int = 1
    """GPUs per node."""
    nodes: int = 1
    checkpointing: Checkpointing = "none"
    """full: recompute every decoder layer in backward (non-reentrant checkpointing of each layer). selective:
    recompute only cheap element-wise work in backward - each layer's normalizations, and in its feed-forward block
    the activation function, whose matmul outputs are kept (``memtune.train.recipe.checkpoint_layer``)."""
    peft: Peft = "none"
    lora_rank: int = 8
    lora_alpha: int = 32
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    lora_dropout: float = 0.05
    quantization: Quantization = "none"
    """8bit (LLM.int8) or 4bit (NF4, double quantization) frozen base weights; needs LoRA."""
    optimizer: Optimizer = "adamw"
    """adamw: torch.optim.AdamW (PyTorch's default foreach implementation on CUDA). adamw-fused: the same update in
    one fused kernel (``fused=True``), without foreach's temporary copy of the states. adamw-8bit: bitsandbytes
    AdamW8bit. sgd: plain SGD, no momentum."""
    batch_size: int = 1
    """Micro-batch per GPU, in sequences."""
    seq_len: int = 2048
    """Tokens per sequence: the longest padded batch (padding) or the chunk length (packing)."""
    attention: Attention = "sdpa"
    grad_accum: int = 1
    """Micro-batches per optimizer step (gradients stay allocated across them)."""
    offload: bool = False
    """FSDP2's CPUOffloadPolicy: the sharded weights, gradients and optimizer states live in the host's pinned
    memory and the optimizer step runs on the CPU; the GPU holds only the layers being computed and activations."""
    expandable_segments: bool = False
    """Run with ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``: the caching allocator grows one segment per
    stream instead of caching fixed segments, which saves the memory fragmentation strands (gigabytes at long
    sequences)."""
    batching: Batching = "padding"
    """padding: length-grouped batches padded to their longest sample; packing: samples concatenated into seq_len
    chunks. Memory depends only on seq_len; the cost model uses the padding waste."""

    kbit_upcast: bool = False
    """k-bit plans: run peft's ``prepare_model_for_kbit_training``, which upcasts the weights left unquantized
    (embeddings, norms, lm_head) to fp32, so the residual stream and the logits run in fp32. Off (the usual QLoRA:
    ``BitsAndBytesConfig`` with a bf16 compute dtype and ``get_peft_model``), they stay in the compute dtype."""
    stack: Stack = "memtune"
    """The code that runs the step: memtune's recipe, or the Hugging Face Trainer's (``hf``: its own gradient
    checkpointing, its optimizer's two parameter groups, and fp32 optimizer states for embeddings under bitsandbytes'
    8-bit optimizers, as ``Trainer.create_optimizer`` registers them), or llama-cookbook's ``finetuning.main``
    (``llama-cookbook``: only the plans ``llama_cookbook_rules`` allows, which memtune's recipe then runs the same
    way: bf16 weights and AdamW states, checkpointing of whole layers under FSDP)."""

    def __post_init__(self) -> None:
        errors = [f"{name.replace('_', '-')} must be one of {', '.join(allowed)}, not {value!r}"
                  for name, allowed, value in literal_mismatches(self)]
        for name in ("num_gpus", "nodes", "batch_size", "seq_len", "lora_rank", "grad_accum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                errors.append(f"{name.replace('_', '-')} must be a whole number, not {value!r}")
            elif value < 1:
                errors.append(f"{name.replace('_', '-')} must be at least 1")
            elif value > PLAN_LIMITS[name]:
                errors.append(f"{name.replace('_', '-')} must be at most {PLAN_LIMITS[name]:,}, not {value:,}")
        for name in ("offload", "expandable_segments", "kbit_upcast"):
            if not isinstance(getattr(self, name), bool):
                errors.append(f"{name.replace('_', '-')} must be true or false, not {getattr(self, name)!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, int | float) \
                or not 0 < self.lora_alpha < float("inf"):
            errors.append(f"lora-alpha must be a positive number, not {self.lora_alpha!r}")
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, int | float) \
                or not 0.0 <= self.lora_dropout < 1.0:
            errors.append(f"lora-dropout must be a number in [0, 1), not {self.lora_dropout!r}")
        if self.sharding == "none" and self.world_size > 1:
            errors.append(f"{self.world_size} GPUs need --sharding fsdp, fsdp-grad-op or hsdp")
        if self.sharding == "hsdp" and self.nodes < 2:
            errors.append("hsdp replicates across nodes: use --nodes 2 or more, or --sharding fsdp")
        if self.quantization != "none" and self.peft == "none":
            errors.append(f"{self.quantization} base weights are frozen: add --peft lora (QLoRA) or use --quantization none")
        if self.quantization != "none" and self.sharding != "none" and not self.fsdp1_unsharded:
            errors.append(f"{self.quantization} quantized weights cannot be sharded with FSDP2 here: use --sharding none")
        if self.optimizer == "adamw-8bit" and self.sharding != "none":
            errors.append("8-bit AdamW (bitsandbytes) cannot step FSDP2's sharded parameters: use --sharding none "
                          "or --optimizer adamw / adamw-fused")
        if self.offload and self.sharding == "none":
            errors.append("CPU offload is FSDP2's: use --sharding fsdp (one GPU works too)")
        if self.kbit_upcast and self.quantization == "none":
            errors.append("kbit-upcast prepares k-bit weights: use it with --quantization 4bit or 8bit")
        if self.stack == "hf" and self.checkpointing == "selective":
            errors.append("the Hugging Face Trainer checkpoints whole layers only: use --checkpointing full or none, "
                          "or --stack memtune")
        if self.stack == "llama-cookbook":
            errors += llama_cookbook_rules(self)
            if self.checkpointing == "full" and self.sharding == "none":
                errors.append("llama-cookbook checkpoints activations only inside its FSDP branch (enable_fsdp): use "
                              "--sharding fsdp (one GPU works) or --checkpointing none")
        if not isinstance(self.lora_targets, tuple) or not all(isinstance(t, str) for t in self.lora_targets):
            errors.append(f"lora-targets must be a tuple of layer names, not {self.lora_targets!r}")
        elif self.peft == "lora" and not self.lora_targets:
            errors.append("lora-targets is empty")
        if errors:
            raise InvalidPlanError(errors)

    def on_stack(self, stack: str) -> Plan:
        """This plan as ``stack`` runs it: llama-cookbook checkpoints only under FSDP, so there a one-GPU plan with
        checkpointing runs as FSDP over one GPU (as its export says). Raises InvalidPlanError where that stack
        cannot run the plan."""
        return dataclasses.replace(self, stack=stack, sharding=stack_sharding(stack, self.checkpointing, self.sharding))

    @property
    def recipe_plan(self) -> Plan:
        """The plan memtune's recipe runs to stand for this one. llama-cookbook's FSDP is FSDP1, which over one GPU
        switches to NO_SHARD: its flat parameters are the weights, with no gathered copies, so memtune runs the
        unsharded step (the process group's memory stays the plan's). On the H200 that matched llama-cookbook's
        one-GPU FSDP runs within 0.3 % where FSDP2 over one GPU over-estimated them by 6 %
        (``bench/results/cookbook.json``)."""
        return dataclasses.replace(self, sharding="none", stack="memtune") if self.fsdp1_unsharded else self

    @property
    def fsdp1_unsharded(self) -> bool:
        """FSDP that does not shard: llama-cookbook's FSDP1 over one GPU (NO_SHARD; ``recipe_plan``)."""
        return self.stack == "llama-cookbook" and self.sharding != "none" and self.world_size == 1 and not self.offload

    @property
    def world_size(self) -> int:
        return self.num_gpus * self.nodes

    @property
    def allocator_env(self) -> dict[str, str]:
        """The environment that gives a process the plan's caching-allocator setting."""
        return {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"} if self.expandable_segments else {}

    @property
    def has_process_group(self) -> bool:
        """torch.distributed (NCCL on GPUs) runs: several GPUs, or FSDP2 even on one."""
        return self.world_size > 1 or self.sharding != "none"

    @property
    def shard_degree(self) -> int:
        """Ranks a parameter is sharded over (hsdp shards within a node only)."""
        if self.sharding == "none":
            return 1
        return self.num_gpus if self.sharding == "hsdp" else self.world_size

    @property
    def is_amp(self) -> bool:
        return self.precision.startswith("amp-")

    @property
    def fp32_residual(self) -> bool:
        """The residual stream (and the logits) run in fp32: fp32 plans, and k-bit plans with ``kbit_upcast``."""
        return self.precision == "fp32" or (self.quantization != "none" and self.kbit_upcast)

    @property
    def low_precision(self) -> str:
        """The compute dtype's name: 'float32', 'bfloat16' or 'float16'."""
        return {"fp32": "float32", "bf16": "bfloat16", "amp-bf16": "bfloat16"}.get(self.precision, "float16")

    def check_model(self, model) -> None:
        """Errors that depend on the model: sequence length, LoRA targets, and llama-cookbook's model classes."""
        errors = []
        if self.stack == "llama-cookbook" and model.model_type != "llama":
            errors.append(f"llama-cookbook's finetuning.main loads llama models only, not {model.model_type} "
                          f"({model.name}): use --stack memtune or hf")
        if model.max_position_embeddings and self.seq_len > model.max_position_embeddings:
            errors.append(f"seq-len {self.seq_len} is longer than {model.name}'s context "
                          f"({model.max_position_embeddings}); use --seq-len {model.max_position_embeddings} or less")
        if self.peft == "lora":
            unknown = [t for t in self.lora_targets if t not in model.linear_names]
            if unknown:
                errors.append(f"lora-targets {', '.join(unknown)} not in {model.name}; "
                              f"its linear layers are {', '.join(model.linear_names)}")
            sides = [min(i, o) for name, i, o in model.linear_shapes if name in self.lora_targets]
            if sides and self.lora_rank > min(sides):
                errors.append(f"lora-rank {self.lora_rank} is more than the smallest side ({min(sides)}) of the "
                              f"targeted layers, where it adds weights and no capacity: use {min(sides)} or less")
        if errors:
            raise InvalidPlanError(errors)

    def check_gpu(self, gpu) -> None:
        """Errors that depend on the GPU: bf16 needs compute capability 8.0 or newer (except under llama-cookbook,
        which loads bf16 weights on every card and lets CUDA emulate what the card lacks)."""
        if "bf16" in self.precision and not gpu.bf16 and self.stack != "llama-cookbook":
            raise InvalidPlanError([f"{gpu.name} (compute capability {'.'.join(map(str, gpu.compute_capability))}) "
                                    f"has no bf16: use --precision fp16, amp-fp16 or fp32"])

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        """Build from a mapping (a TOML table or JSON object); unknown keys are an error."""
        if not isinstance(d, dict) or not all(isinstance(k, str) for k in d):
            raise InvalidPlanError([f"a plan is a table of fields (precision = \"bf16\", ...), not {d!r}"[:200]])
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise InvalidPlanError([f"unknown plan field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}"])
        d = dict(d)
        if "lora_targets" in d:
            targets = d["lora_targets"]
            if isinstance(targets, str):
                targets = targets.split(",")
            if not isinstance(targets, list | tuple) or not all(isinstance(t, str) for t in targets):
                raise InvalidPlanError([f"lora-targets must be a list of layer names, not {targets!r}"])
            d["lora_targets"] = tuple(targets)
        return cls(**d)


@functools.cache
def _literal_fields(cls: type) -> tuple[tuple[str, tuple], ...]:
    """The dataclass's fields annotated with a ``Literal``, and the values each allows."""
    return tuple((name, get_args(hint)) for name, hint in get_type_hints(cls).items() if get_origin(hint) is Literal)


def literal_mismatches(obj) -> list[tuple[str, tuple, object]]:
    """``(field, allowed values, value)`` for each ``Literal``-typed field of dataclass ``obj`` holding another value."""
    return [(name, allowed, getattr(obj, name)) for name, allowed in _literal_fields(type(obj))
            if getattr(obj, name) not in allowed]


def describe(plan: Plan) -> str:
    """A short name for a plan: the kind of fine-tune, checkpointing, the optimizer and precision where they are not
    the defaults, the sharding where it keeps parameters gathered, and the micro-batch split when it accumulates."""
    kind = "full fine-tune" if plan.peft == "none" else "LoRA" if plan.quantization == "none" else (
        "QLoRA 4-bit" if plan.quantization == "4bit" else "LoRA on 8-bit weights")
    return (kind + {"full": " + checkpointing", "selective": " + selective checkpointing"}.get(plan.checkpointing, "")
            + {"adamw-8bit": " + 8-bit AdamW", "adamw-fused": " + fused AdamW"}.get(plan.optimizer, "")
            + (f", {plan.precision}" if plan.precision not in ("bf16", "fp16") else "")
            + (", no resharding" if plan.sharding == "fsdp-grad-op" else "")
            + ((", HSDP" if plan.sharding == "hsdp" else ", FSDP across nodes") if plan.nodes > 1 else "")
            + (", CPU offload" if plan.offload else "")
            + (", expandable segments" if plan.expandable_segments else "")
            + (f", packed to {plan.seq_len}" if plan.batching == "packing" else "")
            + (f" ({plan.batch_size} x {plan.grad_accum})" if plan.grad_accum > 1 else ""))


def stack_sharding(stack: str, checkpointing: str, sharding: str) -> str:
    """The sharding ``stack`` runs a plan with: llama-cookbook checkpoints only under FSDP, so a plan with
    checkpointing and no sharding runs there as FSDP (over one GPU too); any other stays as it is."""
    return "fsdp" if stack == "llama-cookbook" and checkpointing == "full" and sharding == "none" else sharding


def llama_cookbook_rules(plan: Plan) -> list[str]:
    """Why llama-cookbook 0.0.5's ``finetuning.main`` cannot run ``plan`` as it stands (empty: it can).

    Read from its code: weights load with ``from_pretrained(torch_dtype=bf16)`` whatever the FSDP precision flags, so
    no fp32 master weights exist (``use_fp16`` loads fp16 weights and adds autocast and a gradient scaler, which
    memtune does not estimate); activation checkpointing wraps whole decoder layers,
    inside the FSDP branch only (the one-GPU case runs FSDP over one GPU); 8-bit quantization is refused with FSDP;
    the optimizer is ``torch.optim.AdamW`` (foreach); attention is what transformers picks (SDPA); k-bit models are
    not passed through ``prepare_model_for_kbit_training``. FSDP1's CPU offload (``fsdp_cpu_offload``) moves only
    parameters, which memtune does not estimate."""
    errors = []
    if plan.checkpointing == "selective":
        errors.append("llama-cookbook checkpoints whole layers only: use --checkpointing full (less memory, more "
                      "recompute) or none, or run the plan with memtune launch")
    if plan.precision != "bf16":
        errors.append(f"llama-cookbook loads the weights in bf16 whatever its FSDP precision flags; its use_fp16 "
                      f"(fp16 weights under autocast and a gradient scaler) is not what memtune estimates, so "
                      f"{plan.precision} is not estimated there: use --precision bf16")
    if plan.quantization == "8bit" and (plan.sharding != "none" or plan.checkpointing == "full"):
        errors.append("llama-cookbook rejects 8-bit quantization with FSDP (and FSDP is how it checkpoints)")
    if plan.optimizer != "adamw":
        errors.append(f"llama-cookbook's optimizer is AdamW: {plan.optimizer} is not available there")
    if plan.offload:
        errors.append("llama-cookbook's CPU offload (FSDP1, parameters only) is not what memtune estimates: leave "
                      "--offload off")
    if plan.attention != "sdpa":
        errors.append("llama-cookbook leaves attention to transformers (SDPA): use --attention sdpa")
    if plan.kbit_upcast:
        errors.append("llama-cookbook does not upcast a k-bit model (no prepare_model_for_kbit_training): leave "
                      "--kbit-upcast off")
    return errors


def summarize(plan: Plan) -> str:
    """Every knob that is not a default, in one line ('bf16, batch 4 x 1152 tokens, 2 accumulated, ...')."""
    parts = [plan.precision, f"batch {plan.batch_size} x {plan.seq_len} tokens"]
    if plan.grad_accum > 1:
        parts.append(f"{plan.grad_accum} accumulated")
    if plan.sharding != "none":
        parts.append(f"{plan.sharding} over {plan.world_size} GPUs")
    if plan.checkpointing != "none":
        parts.append("activation checkpointing" if plan.checkpointing == "full" else "selective checkpointing")
    elif plan.stack == "llama-cookbook" and plan.sharding == "none":
        parts.append("no activation checkpointing (llama-cookbook checkpoints only with enable_fsdp)")
    if plan.peft == "lora":
        parts.append(f"LoRA r={plan.lora_rank} on {','.join(plan.lora_targets)}")
    if plan.quantization != "none":
        parts.append(f"{plan.quantization} base weights" + (" (fp32 upcast)" if plan.kbit_upcast else ""))
    parts.append(plan.optimizer)
    if plan.offload:
        parts.append("weights, gradients and optimizer states offloaded to the CPU")
    if plan.expandable_segments:
        parts.append("expandable segments")
    if plan.attention != "sdpa":
        parts.append(f"{plan.attention} attention")
    if plan.stack != "memtune":
        parts.append(f"as {STACK_NAMES[plan.stack]} runs it")
    return ", ".join(parts)

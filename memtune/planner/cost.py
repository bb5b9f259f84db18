"""How long a plan's training step takes, and what a trained token costs in GPU-seconds.

FLOPs per token (Kaplan et al. 2020; Korthikanti et al. 2022, causal attention halved):
``forward = 2 * N_linear + 2 * s * heads * head_dim * L`` where ``N_linear`` counts the weights of every matmul
(decoder linears and the lm_head). Backward is twice the forward when the base weights train (gradients for inputs
and weights) and once when they are frozen (LoRA/QLoRA: input gradients only; adapters are negligible).
Full checkpointing adds one forward. Selective checkpointing recomputes only element-wise ops, which are bound by
memory bandwidth, not FLOPs: ``2 x recomputed bytes / (bandwidth x 0.7)`` per layer, the recomputed bytes being
what the norms (fp32 upcast and output), RoPE (q and k) and the MLP activation write per token.

Time = FLOPs / (peak rate of the compute dtype x utilization); PyTorch runs fp32 matmuls at the plain fp32 rate by
default (TF32 off). Utilization grows with the size of the matmuls: ``u = u_max * x / (x + x_half) *
class_factor`` with x = tokens per micro-batch x hidden size, fitted by ``bench/calibrate.py`` to the steps the
accuracy benchmark measured (``profiles/calibration``), with a factor per compute dtype and quantization
(bitsandbytes' dequantization makes k-bit steps slower).

FSDP moves the parameters twice per micro-batch (all-gather in forward and, with resharding, again in backward)
and reduce-scatters the gradients once per step, over the GPU's interconnect - or the network between nodes, for
FSDP across nodes - overlapped with compute; HSDP shards within a node and all-reduces the gradient shards between
nodes. CPU offload (FSDP2's CPUOffloadPolicy) copies each rank's weight shards to the GPU for every all-gather and
its gradient shards back for every micro-batch over the card's PCIe link (``GpuSpec.host_link_gbs``), and runs the
optimizer step on the CPU (``CPU_OPTIMIZER_GBS``); neither is assumed to overlap with compute; both were measured on
an H200 host (``bench/offload.py``, ``bench/results/offload.json``). ``NETWORK_GBS`` is a typical figure. On the GPU
the optimizer step is bound by memory bandwidth (``OPTIMIZER_PASSES``): it matters where a step trains few tokens on
a card with little bandwidth (a bf16 full fine-tune of a 1B model streams ~45 GB per foreach AdamW step: 0.2 s on an
L4). Padding wastes the padded share of the tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from memtune.estimate.screen import lora_params
from memtune.plan import Plan
from memtune.profiles import calibrations
from memtune.specs.gpu import GpuSpec
from memtune.specs.model import ModelSpec

DEFAULT_UTILIZATION = 0.35
"""Used only when no calibration exists."""
MAX_UTILIZATION = 0.9


@dataclass(frozen=True, kw_only=True, slots=True)
class CostEstimate:
    step_time_s: float
    """One optimizer step: ``grad_accum`` micro-batches of ``batch_size x seq_len`` tokens per GPU."""
    compute_s: float
    communication_s: float
    tokens_per_s: float
    """Real (unpadded) tokens trained per second per GPU."""
    utilization: float
    method: str = "closed form"
    """``closed form`` (``step_cost``) or ``trace`` (``memtune.planner.steptime.traced_cost``)."""

    @property
    def gpu_seconds_per_token(self) -> float:
        return 1.0 / self.tokens_per_s

    def to_json(self) -> dict:
        return {"step_time_s": self.step_time_s, "compute_s": self.compute_s,
                "communication_s": self.communication_s, "tokens_per_s": self.tokens_per_s,
                "gpu_seconds_per_token": self.gpu_seconds_per_token, "utilization": self.utilization,
                "method": self.method}


def linear_params(spec: ModelSpec) -> int:
    """Weights a token's matmuls use: the linears of every layer, the experts it is routed to (a mixture-of-experts'
    stacked weights times ``active_experts``), and the lm_head."""
    per_layer = sum(a * b for a, b in spec.layer_linears.values()) + spec.expert_params * spec.active_experts
    return round(spec.num_layers * per_layer) + spec.hidden_size * spec.vocab_size


def flops_per_token(spec: ModelSpec, plan: Plan) -> float:
    forward = 2 * linear_params(spec) + 2 * plan.seq_len * spec.num_attention_heads * spec.head_dim * spec.num_layers
    backward = forward * (1 if plan.peft == "lora" else 2)
    recompute = forward if plan.checkpointing == "full" else 0
    return forward + backward + recompute


RECOMPUTE_BANDWIDTH_EFFICIENCY = 0.7
NETWORK_GBS = 25.0
"""Bandwidth between nodes per GPU, GB/s: 200 Gb/s InfiniBand or RoCE per GPU (``--network-gbs`` sets it)."""
CPU_OPTIMIZER_GBS = 27.0
"""Bytes per second an offloaded step's CPU side streams, counted as weights and gradients at the parameter dtype
plus two fp32 states, read and written: fitted to two whole FSDP2-offloaded steps on a 16-core H200 host (Llama
1B and 3B imply 25.8 and 30.6 GB/s, ``bench/results/offload.json``); a bare ``torch.optim.AdamW`` step streams
33-40 GB/s there. Hosts with fewer cores are slower."""


def _weight_bytes(plan: Plan) -> int:
    """Bytes per weight as the optimizer holds it: fp32 for fp32 and mixed-precision plans, else 16-bit."""
    return 4 if plan.precision == "fp32" or plan.is_amp else 2


def _all_gathers(plan: Plan) -> int:
    """FSDP all-gathers of the weights per step: forward and backward per micro-batch (forward only without
    resharding)."""
    return (2 if plan.sharding != "fsdp-grad-op" else 1) * plan.grad_accum


def offload_copies_s(spec: ModelSpec, plan: Plan, gpu: GpuSpec) -> float:
    """Seconds CPU offload spends copying weight shards to the GPU (every all-gather) and gradient shards back (every
    micro-batch) over the card's host link."""
    if not plan.offload:
        return 0.0
    shard = spec.num_params / plan.shard_degree
    trainable = shard if plan.peft == "none" else 0.0
    moved = (_all_gathers(plan) * shard + plan.grad_accum * trainable) * _weight_bytes(plan)
    return moved / (gpu.host_link_gbs * 1e9)


def cpu_step_bytes_per_weight(plan: Plan) -> int:
    """Bytes a CPU optimizer step is counted as streaming per trained weight (``CPU_OPTIMIZER_GBS``'s unit): weight
    and gradient at the optimizer's weight bytes, read and written, plus two fp32 states."""
    return 4 * _weight_bytes(plan) + 2 * 8


def offload_cpu_bytes(spec: ModelSpec, plan: Plan) -> float:
    """Bytes the CPU optimizer step of an offloaded plan streams, counted as ``cpu_step_bytes_per_weight``."""
    if not plan.offload or plan.peft != "none":
        return 0.0
    return spec.num_params / plan.shard_degree * cpu_step_bytes_per_weight(plan)


def offload_s(spec: ModelSpec, plan: Plan, gpu: GpuSpec) -> float:
    """Seconds a step spends on CPU offload's copies and the CPU optimizer step (zero without offload)."""
    return offload_copies_s(spec, plan, gpu) + offload_cpu_bytes(spec, plan) / (CPU_OPTIMIZER_GBS * 1e9)


OPTIMIZER_PASSES = {"sgd": (3, 0), "adamw": (18, 0), "adamw-fused": (7, 0), "adamw-8bit": (3, 4)}
"""Bytes an optimizer step reads and writes per trainable parameter, as (multiple of the parameter's bytes, fixed
bytes): torch's foreach AdamW (``_multi_tensor_adamw``) runs seven element-wise passes over weights, gradients and
its two states (lerp, mul and addcmul of the second moment, sqrt, div, add eps, addcdiv); the fused kernel reads
weight, gradient and both states once and writes weight and states; bitsandbytes' 8-bit AdamW does the same with
one-byte states; SGD without momentum reads weight and gradient and writes the weight."""


def optimizer_s(spec: ModelSpec, plan: Plan, gpu: GpuSpec) -> float:
    """Seconds the optimizer step takes on the GPU: memory-bound, ``OPTIMIZER_PASSES`` bytes per trainable parameter
    of this rank's shard at ``RECOMPUTE_BANDWIDTH_EFFICIENCY`` of the card's bandwidth (zero with CPU offload, whose
    step ``offload_s`` counts)."""
    if plan.offload:
        return 0.0
    trainable = spec.num_params if plan.peft == "none" else lora_params(spec, plan)
    pbytes = 4 if plan.peft != "none" else _weight_bytes(plan)  # peft keeps LoRA adapters in fp32
    scale, fixed = OPTIMIZER_PASSES.get(plan.optimizer, OPTIMIZER_PASSES["adamw"])
    moved = trainable / plan.shard_degree * (scale * pbytes + fixed)
    return moved / (gpu.bandwidth_gbs * 1e9 * RECOMPUTE_BANDWIDTH_EFFICIENCY)


def selective_recompute_s(spec: ModelSpec, plan: Plan, gpu: GpuSpec, tokens: int) -> float:
    """Seconds selective checkpointing spends recomputing a step's element-wise ops (zero for other plans)."""
    if plan.checkpointing != "selective":
        return 0.0
    p = 4 if plan.precision == "fp32" else 2
    h, q, kv = spec.hidden_size, spec.num_attention_heads * spec.head_dim, spec.num_key_value_heads * spec.head_dim
    per_token = 2 * (4 * h + p * h) + p * (q + kv) + 2 * p * spec.intermediate_size
    moved = 2 * per_token * spec.num_layers * tokens  # read the inputs, write the outputs
    return moved / (gpu.bandwidth_gbs * 1e9 * RECOMPUTE_BANDWIDTH_EFFICIENCY)


def host_s(spec: ModelSpec, plan: Plan, gpu: GpuSpec) -> float:
    """Seconds the host takes to issue a step's layers (Python, autograd, the dispatcher, the launches): the
    calibrated time per layer and micro-batch (``host_per_layer_s``, from the step-time model on the H200's
    traces) for the plan's kind of fine-tune and checkpointing. A step cannot run faster than this, whatever the
    GPU: small micro-batches on a fast card are host-bound."""
    from memtune.planner.steptime import host_layer_key

    per_layer = next((data["step_time"].get("host_per_layer_s", {}) for _, data in calibrations(gpu.name)
                      if data.get("step_time")), {})
    return plan.grad_accum * spec.num_layers * per_layer.get(host_layer_key(plan), 0.0)


def plan_class(plan: Plan) -> str:
    """The key utilization is calibrated by: compute dtype and base-weight quantization."""
    dtype = "fp32" if plan.precision == "fp32" else "16bit"
    return f"{dtype}/{plan.quantization}"


def peak_flops(gpu: GpuSpec, plan: Plan) -> float:
    return gpu.peak_flops({"fp32": "fp32", "bf16": "bf16", "amp-bf16": "bf16"}.get(plan.precision, "fp16"))


def utilization(spec: ModelSpec, plan: Plan, gpu: GpuSpec) -> float:
    model = next((data["utilization"] for _, data in calibrations(gpu.name) if data.get("utilization")), None)
    if model is None:
        return DEFAULT_UTILIZATION
    x = plan.batch_size * plan.seq_len * spec.hidden_size
    factor = model["class_factor"].get(plan_class(plan), 1.0)
    return min(MAX_UTILIZATION, model["u_max"] * x / (x + model["x_half"]) * factor)


def step_cost(spec: ModelSpec, plan: Plan, gpu: GpuSpec, *, padding_efficiency: float = 1.0,
              mean_seq_len: float | None = None, network_gbs: float = NETWORK_GBS) -> CostEstimate:
    """``mean_seq_len``: the average padded sequence of length-grouped padding, which sets the time of an average
    step (``plan.seq_len``, the longest, sets the memory); ``padding_efficiency``: real tokens among them;
    ``network_gbs``: the bandwidth between nodes per GPU."""
    if mean_seq_len is not None and round(mean_seq_len) < plan.seq_len:
        plan = dataclasses.replace(plan, seq_len=max(1, round(mean_seq_len)))
    tokens = plan.batch_size * plan.seq_len * plan.grad_accum
    util = utilization(spec, plan, gpu)
    compute = flops_per_token(spec, plan) * tokens / (peak_flops(gpu, plan) * util)
    compute += selective_recompute_s(spec, plan, gpu, tokens) + offload_s(spec, plan, gpu)
    compute += optimizer_s(spec, plan, gpu)
    compute = max(compute, host_s(spec, plan, gpu))
    comm = 0.0
    if plan.sharding != "none" and plan.world_size > 1:
        n = plan.shard_degree
        param_bytes = spec.num_params * (4 if plan.precision == "fp32" else 2)
        gathers = _all_gathers(plan)
        grad_bytes = spec.num_params * 4 if plan.is_amp else param_bytes
        if plan.peft == "lora":
            grad_bytes = lora_params(spec, plan) * (4 if plan.is_amp else 2)
        # FSDP over several nodes runs its collectives at the network's pace; HSDP shards within a node and
        # all-reduces the gradient shards across nodes.
        sharded_gbs = gpu.interconnect_gbs if plan.nodes == 1 or plan.sharding == "hsdp" else \
            min(gpu.interconnect_gbs, network_gbs)
        comm = (gathers * param_bytes + grad_bytes) * (n - 1) / n / (sharded_gbs * 1e9) if n > 1 else 0.0
        if plan.sharding == "hsdp":
            replicas = plan.nodes
            comm += 2 * grad_bytes / n * (replicas - 1) / replicas / (network_gbs * 1e9)
    step = max(compute, comm)
    return CostEstimate(step_time_s=step, compute_s=compute, communication_s=comm,
                        tokens_per_s=tokens * padding_efficiency / step, utilization=util)

import dataclasses

import pytest

from memtune.plan import Plan
from memtune.planner.cost import flops_per_token, linear_params, step_cost
from memtune.specs import resolve_gpu


def test_linear_params_and_flops_of_the_tiny_llama(tiny):
    # per layer: q 64x64, k,v 64x32, o 64x64, gate/up/down 64x128; lm_head 64x256
    assert linear_params(tiny) == 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128) + 64 * 256
    forward = 2 * linear_params(tiny) + 2 * 128 * 4 * 16 * 2  # causal attention: 2*s*heads*head_dim per layer
    assert flops_per_token(tiny, Plan(seq_len=128)) == 3 * forward  # forward + backward (2x)
    assert flops_per_token(tiny, Plan(seq_len=128, checkpointing="full")) == 4 * forward  # + recompute
    assert flops_per_token(tiny, Plan(seq_len=128, peft="lora")) == 2 * forward  # frozen base: input grads only


def test_step_cost_counts_padding_and_fsdp_traffic(tiny):
    gpu = resolve_gpu("L4-24GB")
    dense = step_cost(tiny, Plan(seq_len=128, batch_size=2), gpu)
    padded = step_cost(tiny, Plan(seq_len=128, batch_size=2), gpu, padding_efficiency=0.5)
    assert padded.tokens_per_s == pytest.approx(dense.tokens_per_s / 2)
    assert dense.communication_s == 0
    sharded = step_cost(tiny, Plan(seq_len=128, batch_size=2, sharding="fsdp", num_gpus=8), gpu)
    # all-gather twice (forward, backward) and reduce-scatter once, 7/8 of the bf16 bytes, over PCIe 4.0 x16
    assert sharded.communication_s == pytest.approx(3 * tiny.num_params * 2 * 7 / 8 / 32e9)


def test_across_nodes_hsdp_keeps_the_weights_traffic_inside_a_node():
    from memtune.planner.cost import step_cost
    from memtune.specs import resolve_gpu, resolve_model

    spec, gpu = resolve_model("llama-3.1-8b"), resolve_gpu("H100-80GB")
    hsdp = Plan(sharding="hsdp", num_gpus=8, nodes=2, seq_len=4096)
    fsdp = Plan(sharding="fsdp", num_gpus=8, nodes=2, seq_len=4096)
    slow, fast = (step_cost(spec, fsdp, gpu, network_gbs=g) for g in (25.0, 400.0))
    assert slow.communication_s > fast.communication_s  # FSDP over both nodes runs at the network's pace
    assert step_cost(spec, hsdp, gpu).communication_s < slow.communication_s
    # HSDP's only traffic between nodes is the all-reduce of the gradient shards
    assert step_cost(spec, hsdp, gpu, network_gbs=1.0).communication_s > step_cost(spec, hsdp, gpu).communication_s


def test_optimizer_step_is_bound_by_memory_bandwidth():
    from memtune.planner.cost import RECOMPUTE_BANDWIDTH_EFFICIENCY, optimizer_s
    from memtune.specs import resolve_model

    spec, l4 = resolve_model("llama-guard-3-1b"), resolve_gpu("L4-24GB")
    rate = l4.bandwidth_gbs * 1e9 * RECOMPUTE_BANDWIDTH_EFFICIENCY
    # foreach AdamW on bf16 weights: seven element-wise passes, 18 x 2 bytes per parameter
    assert optimizer_s(spec, Plan(), l4) == pytest.approx(spec.num_params * 36 / rate)
    # mixed precision keeps fp32 weights and states: twice the bytes
    assert optimizer_s(spec, Plan(precision="amp-bf16"), l4) == pytest.approx(2 * optimizer_s(spec, Plan(), l4))
    fused, eight = (optimizer_s(spec, Plan(optimizer=o), l4) for o in ("adamw-fused", "adamw-8bit"))
    assert eight < fused < optimizer_s(spec, Plan(), l4)
    sharded = Plan(sharding="fsdp", num_gpus=8)
    assert optimizer_s(spec, sharded, l4) == pytest.approx(optimizer_s(spec, Plan(), l4) / 8)
    assert optimizer_s(spec, Plan(sharding="fsdp", offload=True), l4) == 0  # the CPU runs it (offload_s)
    assert optimizer_s(spec, Plan(peft="lora"), l4) < optimizer_s(spec, Plan(), l4) / 100
    # at equal FLOPs the faster optimizer makes the cheaper step
    assert step_cost(spec, Plan(optimizer="adamw-fused"), l4).tokens_per_s > step_cost(spec, Plan(), l4).tokens_per_s


def test_offload_copies_run_over_the_cards_host_link():
    from memtune.planner.cost import offload_s
    from memtune.specs import resolve_model

    spec = resolve_model("llama-guard-3-1b")
    plan = Plan(sharding="fsdp", offload=True, precision="bf16")
    # PCIe 5.0 (H100) against PCIe 3.0 (V100): the copies take longer on the slower link, the CPU step the same
    assert offload_s(spec, plan, resolve_gpu("V100-32GB")) > offload_s(spec, plan, resolve_gpu("H100-80GB"))


def test_a_mixture_of_experts_costs_the_experts_a_token_runs(tiny_mixtral):
    """Mixtral's stacked expert weights count in full for memory (num_params) and at top-k of n for FLOPs."""
    from memtune.planner.cost import linear_params

    assert tiny_mixtral.expert_params == 4 * 3 * 64 * 128 and tiny_mixtral.active_experts == 0.5
    attention = 64 * 64 + 2 * 64 * 32 + 64 * 64  # the router is a bare weight (4 x 64), not counted
    assert linear_params(tiny_mixtral) == 2 * (attention + 2 * 3 * 64 * 128) + 64 * 256


def test_a_card_without_bf16_units_is_costed_at_its_fp32_peak_for_bf16():
    """llama-cookbook loads bf16 weights on a V100 too; the planner must still cost such a plan."""
    v100 = resolve_gpu("V100-32GB")
    assert v100.peak_flops("bf16") == v100.peak_flops("fp32") == 15.7e12
    assert v100.peak_flops("fp16") == 125e12


def test_bf16_attention_on_a_card_before_ampere_runs_the_math_kernel():
    """The memory-efficient kernel takes bf16 only from compute capability 8.0: llama-cookbook's bf16 on a V100
    materializes the attention matrix (a model without grouped-query attention; with it, math anyway)."""
    from memtune.estimate.compose import sdpa_backend
    from memtune.specs import resolve_model

    spec = resolve_model("qwen2.5-0.5b")
    mha = dataclasses.replace(spec, num_key_value_heads=spec.num_attention_heads)
    v100, h200 = resolve_gpu("V100-32GB"), resolve_gpu("H200")
    assert sdpa_backend(mha, Plan(stack="llama-cookbook"), v100) == "math"
    assert sdpa_backend(mha, Plan(precision="fp16"), v100) == "efficient"
    assert sdpa_backend(mha, Plan(), h200) == "flash"

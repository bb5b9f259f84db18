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

"""The step-time model: the trace's op records, the host/GPU issue model, and selective checkpointing's placement."""

import dataclasses

import numpy as np
import pytest
import torch

from memtune.estimate.compose import fast_depth, sdpa_backend
from memtune.estimate.trace import trace_step
from memtune.plan import Plan
from memtune.planner import steptime
from memtune.specs import resolve_gpu


def test_issue_model_is_host_bound_for_short_kernels_and_gpu_bound_for_long_ones():
    # Three ops, each 1 ms of host work: kernels of 0.1 ms wait for the host; kernels of 5 ms queue on the GPU.
    host = np.full(3, 1e-3)
    assert steptime._run(host, np.full(3, 1e-4), 0.0, 0.0) == pytest.approx((3e-3, 3e-3 + 1e-4))
    assert steptime._run(host, np.full(3, 5e-3), 0.0, 0.0) == pytest.approx((3e-3, 1e-3 + 15e-3))
    # A GPU still busy from earlier work delays the first kernel; a late host delays it too.
    assert steptime._run(host[:1], np.full(1, 1e-3), 0.0, 10e-3)[1] == pytest.approx(11e-3)
    assert steptime._run(host[:1], np.full(1, 1e-3), 20e-3, 0.0)[1] == pytest.approx(22e-3)


def test_a_sync_makes_the_host_wait_and_exposes_its_next_launches():
    # GPU-bound ops (1 ms host, 5 ms GPU each): without syncs the host runs ahead and only the first launch shows.
    host, gpu, ones = np.array([1e-3, 0.0, 1e-3]), np.array([5e-3, 0.0, 5e-3]), np.ones(3)
    no_sync = np.zeros(3, dtype=bool)
    assert steptime._run_synced(host, gpu, ones, no_sync, 0.0, 0.0) == steptime._run(host, gpu, 0.0, 0.0)
    # A sync between them: the host waits for the first kernel, then the GPU waits for the second launch.
    sync = np.array([False, True, False])
    assert steptime._run_synced(host, gpu, ones, sync, 0.0, 0.0)[1] == pytest.approx(1e-3 + 5e-3 + 1e-3 + 5e-3)
    # A stretch that ends in a sync counts once per layer it stands for; the rest is scaled as without syncs.
    host4, gpu4 = np.array([1e-3, 0.0, 1e-3, 0.0]), np.array([5e-3, 0.0, 5e-3, 0.0])
    sync4, repeat = np.array([False, True, False, True]), np.array([1.0, 1.0, 3.0, 3.0])
    assert steptime._run_synced(host4, gpu4, repeat, sync4, 0.0, 0.0)[1] == pytest.approx(6e-3 + 3 * 6e-3)


def test_llm_int8_layers_sync_and_multiply_in_int8_where_nf4_layers_do_neither(tiny):
    def kinds(quantization):
        trace = _trace(tiny, Plan(seq_len=64, peft="lora", quantization=quantization))
        return [op.kind for op in trace.ops if op.micro_batch == 0 and op.phase == "forward"], trace.num_layers

    int8, layers = kinds("8bit")
    nf4, _ = kinds("4bit")
    # seven quantized projections per layer: each LLM.int8 forward checks for outliers and zeroes their columns
    # (two syncs) and runs an int8 product; an NF4 forward dequantizes and runs a bf16 product
    assert int8.count("sync") == 2 * int8.count("mm8") == 2 * int8.count("kbit") == 14 * layers
    assert nf4.count("sync") == nf4.count("mm8") == 0 and nf4.count("kbit") == 7 * layers
    assert nf4.count("mm") >= 7 * layers


def _trace(spec, plan, depth=None):
    gpu = resolve_gpu("H200-141GB")
    return trace_step(spec, plan, depth or fast_depth(spec), sdpa_backend=sdpa_backend(spec, plan, gpu),
                      quick_warmup=True)


def test_trace_records_matmul_flops_attention_and_views(tiny):
    plan = Plan(seq_len=64, batch_size=2)
    trace = _trace(tiny, plan)
    ops = [op for op in trace.ops if op.micro_batch == 0]
    forward = [op for op in ops if op.phase == "forward"]
    layers = trace.num_layers
    # forward matmuls: 7 projections per layer and the lm_head, 2 m n k each
    mm = sum(op.flops for op in forward if op.kind == "mm")
    per_layer = 2 * 128 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128)
    assert mm == pytest.approx(layers * per_layer + 2 * 128 * 64 * 256)
    # one fused attention per layer in forward and one backward each, the causal half of 4 b h s^2 d
    attention = [op for op in forward if op.kind == "attn"]
    assert len(attention) == layers and attention[0].flops == pytest.approx(4 * 2 * 4 * 64 * 64 * 16 / 2)
    assert sum(op.kind == "attn_bwd" for op in ops) == layers
    # the backward computes the weight and input gradients of every trained matmul: twice the forward's FLOPs
    backward_mm = sum(op.flops for op in ops if op.phase == "backward" and op.kind == "mm")
    assert backward_mm == pytest.approx(2 * mm)
    assert any(op.kind == "view" for op in forward) and all(op.bytes == 0 for op in ops if op.kind == "view")
    assert {op.phase for op in ops} >= {"forward", "backward", "optimizer_step"}


def test_an_in_place_optimizer_step_counts_what_it_writes(tiny):
    # fused AdamW returns nothing: it reads the weights, gradients and both moments (bf16 here) and the fp32 step
    # counters, and writes the weights and moments back (the gradients too, unscaled in place, only under a GradScaler)
    trace = _trace(tiny, Plan(seq_len=64, optimizer="adamw-fused"))
    assert trace.num_layers == tiny.num_layers
    fused = max((op for op in trace.ops if op.phase == "optimizer_step"), key=lambda op: op.bytes)
    assert fused.tensors == 21 and fused.bytes == 7 * 2 * tiny.num_params + 4 * fused.tensors
    # foreach AdamW's in-place updates count their writes too: more than fused AdamW's single pass
    foreach = [op for op in _trace(tiny, Plan(seq_len=64)).ops if op.phase == "optimizer_step" and op.tensors > 1]
    assert sum(op.bytes for op in foreach) > 2 * fused.bytes


def test_lora_has_no_weight_gradient_matmuls_and_checkpointing_recomputes(tiny):
    full = _trace(tiny, Plan(seq_len=64))
    lora = _trace(tiny, Plan(seq_len=64, peft="lora", lora_targets=("q_proj", "v_proj")))

    def backward_flops(trace):
        return sum(op.flops for op in trace.ops if op.phase == "backward" and op.kind == "mm")

    assert backward_flops(lora) < 0.6 * backward_flops(full)
    recomputed = _trace(tiny, Plan(seq_len=64, checkpointing="full"))
    assert sum(op.kind == "attn" for op in recomputed.ops) == 2 * recomputed.num_layers  # forward + recompute
    assert sum(op.kind == "frame" for op in recomputed.ops) == recomputed.num_layers


def test_selective_checkpointing_recomputes_norms_and_the_mlp_tail_only(tiny):
    plan = Plan(seq_len=64, checkpointing="selective")
    trace = _trace(tiny, plan)
    layers = trace.num_layers
    # Llama's norms and SiLU MLP go through closed-form functions: no recomputed regions, no checkpoint frames, no
    # op through a mode, attention not run twice and no matmul run twice
    assert not any(op.kind in ("region", "frame") or op.selective for op in trace.ops)
    assert sum(op.kind == "attn" for op in trace.ops) == layers
    none = _trace(tiny, dataclasses.replace(plan, checkpointing="none"))
    mm = [sum(op.flops for op in t.ops if op.kind == "mm") for t in (trace, none)]
    assert mm[0] == pytest.approx(mm[1])
    # under autocast without FSDP the MLP tail is a recomputed region again, its down projection run twice
    amp = _trace(tiny, dataclasses.replace(plan, precision="amp-bf16"))
    amp_none = _trace(tiny, dataclasses.replace(plan, precision="amp-bf16", checkpointing="none"))
    tokens = plan.batch_size * plan.seq_len
    assert sum(op.kind == "region" for op in amp.ops) == layers
    extra = sum(op.flops for op in amp.ops if op.kind == "mm") - sum(op.flops for op in amp_none.ops if op.kind == "mm")
    assert extra == pytest.approx(layers * 2 * tokens * tiny.intermediate_size * tiny.hidden_size)
    # and it keeps less than no checkpointing, more than full: what a layer holds when the backward starts
    from memtune.estimate.categories import MemCategory, Phase

    def kept(t):
        return t.per_layer[Phase.BACKWARD, "first"][MemCategory.ACTIVATIONS]

    full = _trace(tiny, dataclasses.replace(plan, checkpointing="full"))
    assert kept(full) < kept(trace) < kept(none)


def test_a_feed_forward_block_of_another_form_is_checkpointed_through_the_modes(tiny):
    from torch import nn

    from memtune.train import recipe

    class Fused(nn.Module):  # a fused gate/up projection, as Phi-3 has: not the gated form recompute assumes
        def __init__(self):
            super().__init__()
            self.gate_up_proj, self.down_proj, self.act_fn = nn.Linear(4, 16), nn.Linear(8, 4), nn.SiLU()

        def forward(self, x):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(self.act_fn(gate) * up)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_layernorm, self.mlp = nn.LayerNorm(4), Fused()

        def forward(self, x):
            return self.mlp(self.input_layernorm(x))

    torch.manual_seed(0)
    plain, layer = Layer(), Layer()
    layer.load_state_dict(plain.state_dict())
    layer = recipe.checkpoint_layer(layer, "selective")
    assert not recipe.is_gated_mlp(plain.mlp) and type(layer.mlp).__name__ == "CheckpointWrapper"
    assert getattr(layer.input_layernorm, recipe.RECOMPUTED)
    x = torch.randn(3, 4, requires_grad=True)
    plain(x).sum().backward()
    expected = [p.grad.clone() for p in plain.parameters()], x.grad.clone()
    x.grad = None
    layer(x).sum().backward()
    for got, want in zip([p.grad for p in layer.parameters()], expected[0]):
        assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(x.grad, expected[1], atol=1e-6)


def test_a_recomputed_region_gives_gradients_to_parameters_when_its_input_needs_none():
    from memtune.train import recipe

    weight = torch.nn.Parameter(torch.randn(4))
    x = torch.randn(3, 4)  # a frozen base model's hidden states under LoRA
    recipe.recompute(lambda t: (t * weight).tanh(), (x,), [weight]).sum().backward()
    expected = (1 - (x * weight).tanh() ** 2) * x
    assert torch.allclose(weight.grad, expected.sum(0))
    other = torch.nn.Parameter(torch.randn(4))
    with pytest.raises(RuntimeError, match="did not use"):
        recipe.recompute(lambda t: t * weight, (x,), [other]).sum().backward()


def test_selective_checkpointing_gives_the_gradients_of_no_checkpointing(tiny):
    from memtune.train import recipe

    plan = Plan(seq_len=32, batch_size=2, precision="fp32")
    grads = {}
    for checkpointing in ("none", "selective", "full"):
        torch.manual_seed(0)
        model = recipe.build_model(tiny, dataclasses.replace(plan, checkpointing=checkpointing), device="cpu")
        batch = recipe.make_batch(tiny, plan, "cpu")
        model(**batch, use_cache=False).loss.backward()
        grads[checkpointing] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.allclose(grads["selective"], grads["none"], atol=1e-6)
    assert grads["selective"].abs().sum() > 0
    assert torch.allclose(grads["full"], grads["none"], atol=1e-6)


def test_step_time_grows_with_depth_tokens_and_accumulation(tiny):
    gpu = resolve_gpu("H200-141GB")
    cal = steptime.Calibration()
    plan = Plan(seq_len=64, batch_size=2)
    one = steptime.step_time(tiny, plan, gpu, _trace(tiny, plan), cal)
    twice = steptime.step_time(tiny, dataclasses.replace(plan, grad_accum=2),
                               gpu, _trace(tiny, dataclasses.replace(plan, grad_accum=2)), cal)
    assert twice.step_s == pytest.approx(one.step_s + one.micro_batch_s, rel=0.05)
    assert one.host_bound  # a tiny model's kernels are far shorter than their launches
    deeper = dataclasses.replace(tiny, num_layers=2 * tiny.num_layers)
    assert steptime.step_time(deeper, plan, gpu, _trace(tiny, plan), cal).step_s > 1.5 * one.step_s
    slow_host = dataclasses.replace(cal, host_op_s=2 * cal.host_op_s, host_view_s=2 * cal.host_view_s)
    assert steptime.step_time(tiny, plan, gpu, _trace(tiny, plan), slow_host).step_s > 1.5 * one.step_s


def test_a_traced_cost_is_marked_and_keeps_the_closed_forms_communication(tiny):
    gpu = resolve_gpu("H200-141GB")
    plan = Plan(seq_len=64, batch_size=2, sharding="fsdp", num_gpus=8)
    cost = steptime.traced_cost(tiny, plan, gpu)
    from memtune.planner.cost import step_cost

    closed = step_cost(tiny, plan, gpu)
    assert cost.method == "trace" and closed.method == "closed form"
    assert cost.communication_s == closed.communication_s
    assert cost.step_time_s == pytest.approx(max(cost.compute_s, cost.communication_s))
    assert cost.tokens_per_s == pytest.approx(64 * 2 / cost.step_time_s)


def test_a_mixture_of_experts_counts_the_flops_of_the_experts_each_token_runs(tiny_mixtral):
    """Mixtral's experts run as grouped matmuls: each token's top-k experts, forward and backward, are matmul FLOPs
    (``gmm``, priced apart from dense ones)."""
    plan = Plan(seq_len=64, batch_size=2)
    trace = _trace(tiny_mixtral, plan)
    tokens, h, i = 128, 64, 128
    forward = [op for op in trace.ops if op.micro_batch == 0 and op.phase == "forward" and op.kind in ("mm", "gmm")]
    assert {op.kind for op in forward} == {"mm", "gmm"}
    attention = 2 * tokens * (h * 64 + 2 * h * 32 + 64 * h)  # q, k, v, o
    router = 2 * tokens * h * 4
    experts = 2 * tokens * 2 * 3 * h * i  # top-2 of gate, up and down
    head = 2 * tokens * h * 256
    assert sum(op.flops for op in forward) == pytest.approx(trace.num_layers * (attention + router + experts) + head)
    backward = sum(op.flops for op in trace.ops if op.micro_batch == 0 and op.phase == "backward"
                   and op.kind in ("mm", "gmm"))
    assert backward == pytest.approx(2 * sum(op.flops for op in forward))


def test_attention_given_a_mask_counts_every_block_and_is_priced_as_the_masked_kernel(tmp_path):
    """A sliding window shorter than the sequence makes transformers pass SDPA a mask: CUDA then runs the
    memory-efficient kernel over the whole score matrix, so the op carries twice the causal FLOPs and its own kind."""
    import json

    from memtune.specs import resolve_model

    cfg = {"model_type": "phi3", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 256, "max_position_embeddings": 256,
           "sliding_window": 32, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    spec = resolve_model(str(tmp_path / "config.json"))
    inside = _trace(spec, Plan(seq_len=16, batch_size=1), depth=2)
    beyond = _trace(spec, Plan(seq_len=64, batch_size=1), depth=2)
    kinds = lambda t: {op.kind for op in t.ops if op.kind.startswith("attn")}  # noqa: E731
    assert kinds(inside) == {"attn", "attn_bwd"}
    assert kinds(beyond) == {"attn_masked", "attn_masked_bwd"}
    forward = next(op for op in beyond.ops if op.kind == "attn_masked")
    assert forward.flops == 4.0 * 1 * 4 * 64 * 64 * 16  # b h s s d, no causal half

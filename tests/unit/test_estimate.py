"""Exact byte counts on a tiny Llama (tests/assets/tiny-llama: 21 parameter tensors, 2 layers), and properties.

Sizes are CUDA caching-allocator blocks: every tensor takes a multiple of 512 bytes.
"""

import dataclasses

import pytest

from memtune.errors import InvalidPlanError
from memtune.estimate import MemCategory, Phase, estimate
from memtune.estimate.allocator import round_size
from memtune.plan import Plan
from memtune.specs import resolve_gpu
from memtune.train import recipe

C = MemCategory


def _param_blocks(spec, plan, bytes_per_element):
    model = recipe.build_model(spec, plan, device="meta")
    trainable = [p.numel() for p in model.parameters() if p.requires_grad]
    return sum(round_size(n * bytes_per_element) for n in trainable), len(trainable)


def test_sgd_bf16_full_finetune_categories(tiny, h200):
    b = estimate(tiny, Plan(optimizer="sgd", batch_size=2, seq_len=64), h200)
    weights, _ = _param_blocks(tiny, Plan(), 2)
    assert weights == 215_552  # 21 bf16 tensors, each rounded up to 512 B
    step = b.phases[Phase.OPTIMIZER_STEP]
    # parameters: the weights plus two RoPE buffers (inv_freq, original_inv_freq: 8 fp32 = 32 B -> 512 B each)
    assert step[C.PARAMETERS] == weights + 2 * 512
    assert step[C.GRADIENTS] == weights
    assert step[C.OPTIMIZER_STATES] == 0  # plain SGD keeps no state
    assert step[C.WORKSPACE] == 2 * 32 * 2**20  # two cuBLAS workspaces of 32 MiB on compute capability 9.0


def test_adamw_states_and_foreach_temporaries(tiny, h200):
    b = estimate(tiny, Plan(batch_size=2, seq_len=64), h200)
    weights, count = _param_blocks(tiny, Plan(), 2)
    step = b.phases[Phase.OPTIMIZER_STEP]
    # exp_avg + exp_avg_sq in the parameter dtype, plus one 0-d step counter per parameter (512 B block each)
    assert step[C.OPTIMIZER_STATES] == 2 * weights + count * 512
    # foreach AdamW's sqrt(exp_avg_sq) is a full copy of the second moments
    assert step[C.TEMPORARIES] >= weights


def test_lora_trains_only_fp32_adapters(tiny, h200):
    plan = Plan(peft="lora", batch_size=2, seq_len=64)
    b = estimate(tiny, plan, h200)
    adapters, count = _param_blocks(tiny, plan, 4)
    # per layer: q_proj A 8x64 + B 64x8, v_proj A 8x64 + B 32x8, upcast to fp32 by peft: 7168 B; two layers
    assert adapters == 2 * (2048 + 2048 + 2048 + 1024) and count == 8
    step = b.phases[Phase.OPTIMIZER_STEP]
    assert step[C.GRADIENTS] == adapters
    assert step[C.OPTIMIZER_STATES] == 2 * adapters + count * 512


def test_logits_hold_fp32_copies(tiny, h200):
    b = estimate(tiny, Plan(batch_size=4, seq_len=256), h200)
    logits_fp32 = 4 * 256 * 256 * 4  # b x s x vocab in fp32
    # at the end of the forward: bf16 logits, their fp32 upcast and the saved log-softmax
    assert b.phases[Phase.FORWARD][C.LOGITS] >= logits_fp32 * 2 + logits_fp32 // 2


@pytest.mark.parametrize("field,small,large", [("batch_size", 1, 4), ("seq_len", 64, 256)])
def test_more_tokens_never_need_less(tiny, h200, field, small, large):
    base = {"batch_size": 2, "seq_len": 128}
    lo = estimate(tiny, Plan(**{**base, field: small}), h200)
    hi = estimate(tiny, Plan(**{**base, field: large}), h200)
    assert hi.peak_allocated_bytes > lo.peak_allocated_bytes
    assert hi.peak_reserved_bytes >= lo.peak_reserved_bytes


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_checkpointing_never_needs_more_activations(tiny, h200, peft):
    plan = Plan(peft=peft, batch_size=4, seq_len=256)
    without = estimate(tiny, plan, h200)
    with_ac = estimate(tiny, Plan(**{**plan.to_dict(), "checkpointing": "full", "lora_targets": plan.lora_targets}),
                       h200)
    assert with_ac.phases[Phase.FORWARD][C.ACTIVATIONS] < without.phases[Phase.FORWARD][C.ACTIVATIONS]
    assert with_ac.peak_allocated_bytes <= without.peak_allocated_bytes


def test_more_fsdp_ranks_never_need_more_per_rank(tiny, h200):
    peaks, params = [], []
    for ranks in (2, 4, 8):
        b = estimate(tiny, Plan(sharding="fsdp", num_gpus=ranks, batch_size=2, seq_len=64), h200)
        peaks.append(b.peak_allocated_bytes)
        params.append(b.phases[Phase.OPTIMIZER_STEP][C.PARAMETERS])
    assert peaks == sorted(peaks, reverse=True)
    assert params[0] > params[1] > params[2]


def test_quantized_base_weights_are_smaller(tiny, h200):
    lora = estimate(tiny, Plan(peft="lora", batch_size=2, seq_len=64), h200)
    qlora = estimate(tiny, Plan(peft="lora", quantization="4bit", batch_size=2, seq_len=64), h200)
    assert qlora.phases[Phase.OPTIMIZER_STEP][C.PARAMETERS] < lora.phases[Phase.OPTIMIZER_STEP][C.PARAMETERS]


def test_fits_uses_reserved_runtime_and_margin(tiny):
    gpu = resolve_gpu("T4-16GB")
    b = estimate(tiny, Plan(precision="amp-fp16", batch_size=1, seq_len=64), gpu)
    assert b.required_bytes == b.peak_reserved_bytes + b.runtime_overhead_bytes
    assert b.headroom_bytes == gpu.memory_bytes - b.margin_bytes - b.required_bytes
    assert b.fits
    assert b.phases[Phase.FORWARD][C.WORKSPACE] == 2 * (8 * 2**20 + 128 * 2**10)  # Turing: 8 MiB + 128 KiB


def test_bf16_on_v100_is_rejected(tiny):
    with pytest.raises(InvalidPlanError, match="no bf16"):
        estimate(tiny, Plan(precision="bf16", seq_len=64), resolve_gpu("V100-32GB"))


def test_verdicts_fit_borderline_and_not(h200):
    from dataclasses import replace

    from memtune.specs import resolve_model

    spec = resolve_model("llama-guard-3-1b")
    plan = Plan(batch_size=1, seq_len=1024)
    b = estimate(spec, plan, h200)
    needed = b.required_bytes
    roomy = replace(h200, name="roomy", memory_bytes=needed * 2)
    exact = replace(h200, name="exact", memory_bytes=needed)  # fits with no margin at all
    small = replace(h200, name="small", memory_bytes=needed // 2)
    assert estimate(spec, plan, roomy).verdict == "fits"
    assert estimate(spec, plan, exact, margin=0.0).verdict == "fits"
    assert estimate(spec, plan, exact, margin=0.5).verdict == "borderline"  # fits only without the margin
    assert estimate(spec, plan, small).verdict == "does not fit"


def test_calibration_only_ever_adds(h200):
    from memtune.specs import resolve_model

    spec = resolve_model("qwen2.5-0.5b")
    plan = Plan(batch_size=1, seq_len=256)
    plain, calibrated = estimate(spec, plan, h200), estimate(spec, plan, h200, calibrated=True)
    assert calibrated.calibration == "H200-141GB.json" and plain.calibration is None
    assert calibrated.peak_allocated_bytes >= plain.peak_allocated_bytes
    assert calibrated.peak_reserved_bytes >= plain.peak_reserved_bytes


def test_gradient_accumulation_keeps_gradients_through_the_next_forward(tiny, h200):
    one = estimate(tiny, Plan(batch_size=2, seq_len=64), h200)
    four = estimate(tiny, Plan(batch_size=2, seq_len=64, grad_accum=4), h200)
    weights, _ = _param_blocks(tiny, Plan(), 2)
    assert one.phases[Phase.FORWARD][C.GRADIENTS] == 0
    assert four.phases[Phase.FORWARD][C.GRADIENTS] == weights
    assert four.peak_allocated_bytes >= one.peak_allocated_bytes


def test_fused_adamw_has_no_foreach_copy_of_the_states(tiny, h200):
    foreach = estimate(tiny, Plan(batch_size=2, seq_len=64), h200).phases[Phase.OPTIMIZER_STEP]
    fused = estimate(tiny, Plan(batch_size=2, seq_len=64, optimizer="adamw-fused"), h200).phases[Phase.OPTIMIZER_STEP]
    weights, _ = _param_blocks(tiny, Plan(), 2)
    assert foreach[C.TEMPORARIES] - fused[C.TEMPORARIES] >= weights
    assert fused[C.OPTIMIZER_STATES] == foreach[C.OPTIMIZER_STATES]


def test_cpu_offload_takes_the_sharded_state_off_the_device(tiny, h200):
    from memtune.estimate.categories import MemCategory

    sharded = Plan(sharding="fsdp", num_gpus=2, seq_len=64)
    on_gpu, offloaded = estimate(tiny, sharded, h200), estimate(tiny, dataclasses.replace(sharded, offload=True), h200)
    host = (MemCategory.PARAMETERS, MemCategory.GRADIENTS, MemCategory.OPTIMIZER_STATES)
    # (FSDP2's gradient shards are its reduce-scatter outputs: they count as FSDP buffers)
    assert all(on_gpu.phases[Phase.OPTIMIZER_STEP][c] > 0 for c in (MemCategory.PARAMETERS, MemCategory.OPTIMIZER_STATES))
    assert all(cats.get(c, 0) == 0 for cats in offloaded.phases.values() for c in host)
    assert offloaded.phases[Phase.BACKWARD][MemCategory.ACTIVATIONS] == on_gpu.phases[Phase.BACKWARD][MemCategory.ACTIVATIONS]
    assert offloaded.peak_allocated_bytes < on_gpu.peak_allocated_bytes
    with pytest.raises(InvalidPlanError, match="CPU offload is FSDP2's"):
        Plan(offload=True)


def test_offloaded_replay_keeps_gradients_only_in_passing():
    """Under CPU offload the device sees neither weights nor optimizer states, and each gradient shard only until
    its copy to the host: freed right after it is made, not at zero_grad."""
    from memtune.estimate.compose import offloaded_events
    from memtune.estimate.trace import TraceResult

    mib = 2**20
    events = (
        (1, 0, 64 * mib, "default"),  # weights
        (1, 1, 40 * mib, "default"),  # activation
        (1, 2, 20 * mib, "default"),  # gradient shard
        (0, 1, 0, ""),
        (1, 3, 128 * mib, "default"),  # optimizer states
        (0, 2, 0, ""),                 # zero_grad
    )
    trace = TraceResult(num_layers=1, peak_reserved=0, landmarks={}, events=events,
                        host_resident=frozenset({0, 3}), gradients=frozenset({2}))
    assert offloaded_events(trace) == [(1, 1, 40 * mib, "default"), (1, 2, 20 * mib, "default"), (0, 2, 0, ""),
                                       (0, 1, 0, "")]

"""The fast estimate and the planner's search on real model sizes (Qwen2.5-0.5B, Llama-Guard-3-1B): a trace of
each takes seconds, so they run with the integration tier."""

import pytest

import memtune.planner as planner
from memtune.estimate import Phase, estimate
from memtune.plan import Plan
from memtune.planner import plan_candidates
from memtune.specs import resolve_gpu


def test_fast_path_matches_full_depth_allocated(h200):
    from memtune.specs import resolve_model

    spec = resolve_model("qwen2.5-0.5b")
    plan = Plan(batch_size=1, seq_len=256)
    full, fast = estimate(spec, plan, h200), estimate(spec, plan, h200, fast=True)
    assert fast.peak_allocated_bytes == pytest.approx(full.peak_allocated_bytes, rel=0.005)


@pytest.mark.parametrize("fields", [
    {"sharding": "fsdp", "num_gpus": 4, "peft": "lora", "checkpointing": "selective", "grad_accum": 2},
    {"sharding": "fsdp-grad-op", "num_gpus": 4},
    {"checkpointing": "full", "optimizer": "adamw"},
])
def test_one_four_layer_trace_extends_to_the_model_depth(h200, fields):
    """The fast estimate traces four layers and adds, at each landmark, what an inner layer holds there: per phase
    and category it lands where the full-depth trace does (gathered FSDP2 weights, gradients, optimizer
    temporaries and activations all scale with the depth)."""
    from memtune.estimate.compose import cached_trace, fast_depth
    from memtune.specs import resolve_model

    spec = resolve_model("qwen2.5-0.5b")
    plan = Plan(batch_size=1, seq_len=256, **fields)
    assert fast_depth(spec) == 4 and cached_trace(spec, plan, 4, "flash").per_layer
    full, fast = estimate(spec, plan, h200), estimate(spec, plan, h200, fast=True)
    for phase in Phase:
        assert sum(fast.phases[phase].values()) == pytest.approx(sum(full.phases[phase].values()), rel=0.01)


def test_only_candidates_the_screen_puts_within_reach_are_traced():
    from memtune.estimate.screen import screen, screen_band
    from memtune.specs import resolve_model

    spec, gpu = resolve_model("llama-guard-3-1b"), resolve_gpu("T4-16GB")
    result = plan_candidates(spec, gpu, seq_len=2048, fixed={"peft": "none"})
    traced = [c for c in result.candidates if c.breakdown is not None and c.breakdown.method == "trace"]
    screened = [c for c in result.candidates if c.breakdown is not None and c.breakdown.method == "screen"]
    assert traced and screened and result.chosen in traced
    for c in traced:
        quick = screen(spec, c.plan, gpu)
        assert quick.required_bytes <= quick.usable_bytes * (1 + screen_band(c.plan)[1])
    # Everything cheaper than the chosen plan was traced, screened clearly out of reach, or has a traced twin (the
    # same plan with another optimizer) that did not fit.
    import dataclasses

    missed = {dataclasses.replace(c.plan, optimizer="adamw") for c in traced if not c.fits}
    for c in screened:
        if planner.rank(c) < planner.rank(result.chosen):
            usable = c.breakdown.usable_bytes
            assert (c.breakdown.required_bytes > usable * (1 + screen_band(c.plan)[1])
                    or dataclasses.replace(c.plan, optimizer="adamw") in missed)


def test_a_screen_its_traced_twin_proved_wrong_is_shown_corrected():
    from memtune.specs import resolve_model

    # On a T4, a traced full fine-tune of Qwen2.5-0.5B misses; the same plan with the other AdamW variants is then
    # not traced but corrected by the same trace/screen ratio.
    result = plan_candidates(resolve_model("qwen2.5-0.5b"), resolve_gpu("T4-16GB"), seq_len=3072, batch_size=2,
                             batching="packing", fixed={"peft": "none"})
    corrected = [c for c in result.candidates if c.breakdown is not None
                 and c.breakdown.verdict_reason.startswith("screen corrected")]
    assert corrected
    for c in corrected:
        assert not c.fits and c.reason.startswith("does not fit")
        usable = c.breakdown.usable_bytes
        assert c.breakdown.required_bytes > usable

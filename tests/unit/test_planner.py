"""The planner's search: screen, fast trace, full-depth confirmation where the fast estimate is too close to call."""

import pytest

import memtune.planner as planner
from memtune.estimate import estimate
from memtune.planner import plan_candidates
from memtune.specs import resolve_gpu


@pytest.mark.parametrize(("error", "depth"), [(0.0, "fast"), (1.0, "full")])
def test_a_fit_too_close_to_call_is_confirmed_at_full_depth(tiny, monkeypatch, error, depth):
    gpu = resolve_gpu("T4-16GB")
    monkeypatch.setattr(planner, "FAST_RESERVED_ERROR", {"none": (error, error), "checkpointed": (error, error)})
    chosen = plan_candidates(tiny, gpu, seq_len=128).chosen
    assert chosen is not None and chosen.breakdown.method == "trace"
    expected = estimate(tiny, chosen.plan, gpu, fast=depth == "fast")
    assert chosen.breakdown == expected


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


def test_a_full_fine_tune_is_never_pure_fp16_unless_asked(tiny):
    gpu = resolve_gpu("V100-32GB")  # no bf16: LoRA runs on fp16 weights, a full fine-tune under fp16 autocast
    searched = plan_candidates(tiny, gpu, seq_len=128, fixed={"peft": "none"}).candidates
    assert {c.plan.precision for c in searched if c.breakdown is not None} == {"amp-fp16"}
    asked = plan_candidates(tiny, gpu, seq_len=128, fixed={"peft": "none", "precision": "fp16"}).candidates
    assert {c.plan.precision for c in asked if c.breakdown is not None} == {"fp16"}


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


def test_the_screen_band_is_measured_per_class_of_plans():
    """Each class the grid of bench/screen.py covers has its own band: its largest errors plus a margin, so every
    row of that benchmark lies inside its class's band."""
    import json

    from memtune.estimate.screen import BAND_MARGIN, MIN_BAND, plan_class, screen_band
    from memtune.plan import Plan
    from memtune.profiles import profiles_dir

    bands = json.loads((profiles_dir() / "screen_bands.json").read_text())["bands"]
    assert {"full-none", "full-full", "lora-selective", "lora4bit-none", "lora4bit-selective"} <= set(bands)
    plan = Plan(peft="lora", checkpointing="selective", sharding="fsdp", num_gpus=8)
    assert plan_class(plan) == "lora-selective"
    under, over = screen_band(plan)
    assert (under, over) == pytest.approx((max(bands["lora-selective"][0] + BAND_MARGIN, MIN_BAND),
                                          max(bands["lora-selective"][1] + BAND_MARGIN, MIN_BAND)))
    # every row of the benchmark lies inside its class's band
    from pathlib import Path

    rows = json.loads((Path(__file__).resolve().parents[2] / "bench" / "results" / "screen.json").read_text())["rows"]
    for r in rows:
        u, o = bands[r["class"]]
        assert -u - 1e-4 <= r["error"] <= o + 1e-4  # the bands are rounded to 4 decimals


def test_a_search_request_is_checked_in_one_place(tiny):
    from memtune.errors import ConfigError, InvalidPlanError
    from memtune.planner.request import SearchRequest

    r = SearchRequest.from_options(tiny, seq_len=64, global_tokens=640, peft="none", lora_targets=None,
                                   export="hf", checkpointing=None)
    assert r.global_batch == 10 and r.fixed == {"peft": "none", "stack": "hf"}
    for options, error in [({"export": "keras"}, ConfigError), ({"network_gbs": 0}, ConfigError),
                           ({"batching": "bucketed"}, ConfigError), ({"global_batch": 8, "global_tokens": 64}, ConfigError),
                           ({"precision": "fp8"}, InvalidPlanError), ({"lora_targets": "nope"}, InvalidPlanError)]:
        with pytest.raises(error):
            SearchRequest.from_options(tiny, seq_len=64, **options)

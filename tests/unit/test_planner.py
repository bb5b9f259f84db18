"""The planner's search: screen, fast trace, full-depth confirmation where the fast estimate is too close to call."""

import dataclasses

import pytest

import memtune.planner as planner
from memtune.estimate import estimate
from memtune.planner import plan_candidates
from memtune.errors import ConfigError, InvalidPlanError
from memtune.plan import Plan
from memtune.specs import resolve_gpu


@pytest.mark.parametrize(("error", "depth"), [(0.0, "fast"), (1.0, "full")])
def test_a_fit_too_close_to_call_is_confirmed_at_full_depth(tiny, monkeypatch, error, depth):
    gpu = resolve_gpu("T4-16GB")
    monkeypatch.setattr(planner, "FAST_RESERVED_ERROR", {"none": (error, error), "checkpointed": (error, error)})
    chosen = plan_candidates(tiny, gpu, seq_len=128).chosen
    assert chosen is not None and chosen.breakdown.method == "trace"
    expected = estimate(tiny, chosen.plan, gpu, fast=depth == "fast")
    assert chosen.breakdown == expected


def test_a_full_fine_tune_is_never_pure_fp16_unless_asked(tiny):
    gpu = resolve_gpu("V100-32GB")  # no bf16: LoRA runs on fp16 weights, a full fine-tune under fp16 autocast
    searched = plan_candidates(tiny, gpu, seq_len=128, fixed={"peft": "none"}).candidates
    assert {c.plan.precision for c in searched if c.breakdown is not None} == {"amp-fp16"}
    asked = plan_candidates(tiny, gpu, seq_len=128, fixed={"peft": "none", "precision": "fp16"}).candidates
    assert {c.plan.precision for c in asked if c.breakdown is not None} == {"fp16"}


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


def test_llama_cookbook_checkpoints_qlora_under_fsdp_over_one_gpu():
    """Its checkpointing brings FSDP; over one GPU FSDP1 does not shard, so 4-bit weights may come along."""
    from memtune.planner import with_fixed

    plan = with_fixed(Plan(peft="lora", quantization="4bit", checkpointing="full"), {"stack": "llama-cookbook"})
    assert (plan.sharding, plan.recipe_plan.sharding) == ("fsdp", "none")
    with pytest.raises(InvalidPlanError, match="cannot be sharded"):
        dataclasses.replace(plan, num_gpus=2)


def test_an_export_and_another_stack_are_bad_input():
    from memtune.planner.request import SearchRequest
    from memtune.specs import resolve_model

    with pytest.raises(ConfigError, match="drop one of them"):
        SearchRequest.from_options(resolve_model("llama-guard-3-1b"), export="llama-cookbook", stack="hf")


@pytest.mark.parametrize("checkpointing", ["none", "full", "selective"])
def test_the_screen_follows_what_llm_int8_keeps(tiny, checkpointing):
    """LLM.int8 keeps its inputs (and the down projection's outlier columns) through checkpointing; the screen's
    activations follow the trace's there as for other plans (the tiny model at random init: every column an
    outlier column at thousands of rows)."""
    from memtune.estimate.categories import MemCategory
    from memtune.estimate.screen import screen

    gpu = resolve_gpu("H200-141GB")
    plan = Plan(peft="lora", quantization="8bit", checkpointing=checkpointing, batch_size=16, seq_len=256)
    traced = estimate(tiny, plan, gpu).phases
    screened = screen(tiny, plan, gpu).phases
    kept = {ph: traced[ph][MemCategory.ACTIVATIONS] for ph in traced}
    assert screened["backward"][MemCategory.ACTIVATIONS] == pytest.approx(max(kept.values()), rel=0.25)

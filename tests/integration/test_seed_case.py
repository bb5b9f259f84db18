"""The case that started memtune: a full fine-tune of Llama-Guard-3-1B with llama-cookbook on ToxicChat
(batch 1), out of memory on V100-32GB and L4-24GB unless FSDP was on - because llama-cookbook only checkpoints
activations inside its FSDP branch.

The verdicts below are those of the real llama-cookbook 0.0.5 (``finetuning.main`` under emulated caps on an H200,
bench/results/cookbook.json), which loads bf16 weights on every card: the issue's batch 1 fits there; its default
batch of 4 does not, unless FSDP is on.
"""

import dataclasses

import pytest

from memtune.data import load_lengths
from memtune.errors import InvalidPlanError
from memtune.estimate import estimate
from memtune.planner import llama_cookbook_default, plan_candidates
from memtune.specs import resolve_gpu, resolve_model
from tests.conftest import ASSETS

PADDED = 1139  # the longest ToxicChat prompt in the Llama Guard 3 template (batch 1: the longest sample is the peak)
PACKED = 4096  # llama-cookbook's default packing context


@pytest.fixture(scope="module")
def guard():
    return resolve_model("llama-guard-3-1b")


def test_toxicchat_lengths_in_the_llama_guard_prompt():
    lengths = load_lengths(ASSETS / "toxicchat" / "lengths.csv", length_field="user_tokens", extra_tokens=214)
    assert (lengths.count, lengths.quantile(0.5), lengths.quantile(0.99), lengths.max) == (5654, 228, 568, PADDED)
    assert lengths.padded(1) == (PADDED, 1.0)


@pytest.mark.parametrize(("gpu", "batch_size", "seq_len", "verdict"), [
    ("L4-24GB", 1, PADDED, "fits"),
    ("V100-32GB", 1, PADDED, "fits"),
    ("L4-24GB", 4, PADDED, "does not fit"),  # llama-cookbook's default batch, still padded
    ("V100-32GB", 4, PADDED, "does not fit"),
    ("L4-24GB", 1, PACKED, "does not fit"),  # packing to 4096 without checkpointing
    ("V100-32GB", 1, PACKED, "does not fit"),
])
def test_llama_cookbook_default_path(guard, gpu, batch_size, seq_len, verdict):
    spec = resolve_gpu(gpu)
    plan = llama_cookbook_default(spec, batch_size=batch_size, seq_len=seq_len)
    assert (plan.sharding, plan.checkpointing, plan.precision, plan.stack) == ("none", "none", "bf16", "llama-cookbook")
    assert estimate(guard, plan, spec).verdict == verdict


@pytest.mark.parametrize("gpu", ["L4-24GB", "V100-32GB"])
def test_fsdp_brings_the_checkpointing_that_makes_the_default_batch_fit(guard, gpu):
    spec = resolve_gpu(gpu)
    plan = dataclasses.replace(llama_cookbook_default(spec, batch_size=4, seq_len=PADDED), checkpointing="full",
                               sharding="fsdp")
    # trained on both cards (on the L4 with the allocator releasing its cache: borderline)
    assert estimate(guard, plan, spec).verdict != "does not fit"
    with pytest.raises(InvalidPlanError, match="only inside its FSDP branch"):
        dataclasses.replace(plan, sharding="none")


def test_eight_v100s_find_a_plan_without_bf16(guard):
    result = plan_candidates(guard, resolve_gpu("V100-32GB"), num_gpus=8, seq_len=PACKED, batching="packing",
                             fixed={"peft": "none"})
    assert result.chosen is not None and result.chosen.fits
    assert "bf16" not in result.chosen.plan.precision and result.chosen.plan.sharding == "fsdp"
    assert result.reference.reason.startswith("does not fit: needs")


def test_one_l4_finds_a_plan_and_the_default_does_not_fit(guard):
    result = plan_candidates(guard, resolve_gpu("L4-24GB"), seq_len=PACKED, batching="packing", fixed={"peft": "none"})
    assert result.chosen is not None and result.chosen.fits
    assert result.chosen.plan.peft == "none"  # still a full fine-tune
    # plain AdamW without checkpointing does not clearly fit at 4,096, so its 8-bit-state twin is searched too
    assert any(c.plan.optimizer == "adamw-8bit" and c.plan.checkpointing == "none" for c in result.candidates)
    assert not result.reference.breakdown.fits
    # the difference is the activations the default path keeps without checkpointing
    assert result.chosen.breakdown.required_bytes < result.reference.breakdown.required_bytes

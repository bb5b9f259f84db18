"""The case that started memtune: a full fine-tune of Llama-Guard-3-1B with llama-cookbook on ToxicChat
(batch 1), out of memory on V100-32GB and L4-24GB unless FSDP was on - because llama-cookbook only checkpoints
activations inside its FSDP branch.

The verdicts below agree with validations under emulated caps on an H200 (bench/results/emulation.md).
"""

import pytest

from memtune.data import load_lengths
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


@pytest.mark.parametrize(("gpu", "seq_len", "verdict"), [
    ("L4-24GB", PADDED, "fits"),  # bf16 weights, padding: fits (emulated: fits)
    ("L4-24GB", PACKED, "does not fit"),  # packing to 4096 without checkpointing (emulated: out of memory)
    ("V100-32GB", PADDED, "fits"),  # no bf16 -> fp32: 29.4 of 31.1 GiB (emulated: fits, 30.0 GiB reserved)
    ("V100-32GB", PACKED, "does not fit"),  # (emulated: out of memory)
])
def test_llama_cookbook_default_path(guard, gpu, seq_len, verdict):
    spec = resolve_gpu(gpu)
    plan = llama_cookbook_default(spec, seq_len=seq_len)
    assert plan.sharding == "none" and plan.checkpointing == "none"
    assert plan.precision == ("bf16" if spec.bf16 else "fp32")
    assert estimate(guard, plan, spec).verdict == verdict


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

"""Choose how to run a fine-tune: estimate candidate plans and keep the first that fits."""

from __future__ import annotations

from dataclasses import dataclass

from memtune.errors import InvalidPlanError
from memtune.estimate import MemoryBreakdown, estimate
from memtune.plan import Plan
from memtune.specs.gpu import GpuSpec
from memtune.specs.model import ModelSpec


@dataclass(frozen=True, kw_only=True, slots=True)
class Candidate:
    label: str
    plan: Plan
    breakdown: MemoryBreakdown | None
    reason: str
    """Why it does or does not fit (or cannot run)."""

    @property
    def fits(self) -> bool:
        return self.breakdown is not None and self.breakdown.fits


@dataclass(frozen=True, kw_only=True, slots=True)
class PlanResult:
    candidates: tuple[Candidate, ...]
    chosen: Candidate | None

    def to_json(self) -> dict:
        def one(c: Candidate) -> dict:
            return {"label": c.label, "plan": c.plan.to_dict(), "fits": c.fits, "reason": c.reason,
                    "peak_reserved_bytes": c.breakdown.peak_reserved_bytes if c.breakdown else None,
                    "required_bytes": c.breakdown.required_bytes if c.breakdown else None}

        closest = None
        if self.chosen is None:
            ran = [c for c in self.candidates if c.breakdown is not None]
            closest = one(min(ran, key=lambda c: c.breakdown.required_bytes)) if ran else None
        return {
            "chosen": self.chosen.plan.to_dict() if self.chosen else None,
            "closest_miss": closest,
            "estimate": self.chosen.breakdown.to_json() if self.chosen else None,
            "candidates": [one(c) for c in self.candidates],
        }


def candidate_plans(gpu: GpuSpec, *, num_gpus: int, nodes: int, batch_size: int,
                    seq_len: int) -> list[tuple[str, Plan]]:
    """The usual ways to fine-tune, most capable first: full fine-tune, LoRA, QLoRA, each without and with
    activation checkpointing, at the GPU's best precision (bf16 where supported, else fp16 with fp32 master
    weights for full fine-tuning)."""
    world = num_gpus * nodes
    sharding = "none" if world == 1 else ("hsdp" if nodes > 1 else "fsdp")
    full_precision = "bf16" if gpu.bf16 else "amp-fp16"
    lora_precision = "bf16" if gpu.bf16 else "fp16"
    common = {"num_gpus": num_gpus, "nodes": nodes, "batch_size": batch_size, "seq_len": seq_len}
    out = []
    for ac in ("none", "full"):
        suffix = " + checkpointing" if ac == "full" else ""
        out.append((f"full fine-tune{suffix}", Plan(precision=full_precision, sharding=sharding, checkpointing=ac,
                                                    **common)))
    for ac in ("none", "full"):
        suffix = " + checkpointing" if ac == "full" else ""
        out.append((f"LoRA{suffix}", Plan(precision=lora_precision, sharding=sharding, checkpointing=ac, peft="lora",
                                          **common)))
    if world == 1:
        for ac in ("none", "full"):
            suffix = " + checkpointing" if ac == "full" else ""
            out.append((f"QLoRA 4-bit{suffix}", Plan(precision=lora_precision, checkpointing=ac, peft="lora",
                                                     quantization="4bit", **common)))
    return out


def plan_candidates(spec: ModelSpec, gpu: GpuSpec, *, num_gpus: int = 1, nodes: int = 1, batch_size: int = 1,
                    seq_len: int = 2048) -> PlanResult:
    """Estimate every candidate (fast two-depth traces), then confirm the first that fits with a full-depth
    estimate; if it does not fit after all, go on to the next."""
    candidates = []
    for label, plan in candidate_plans(gpu, num_gpus=num_gpus, nodes=nodes, batch_size=batch_size, seq_len=seq_len):
        try:
            breakdown = estimate(spec, plan, gpu, fast=True)
        except InvalidPlanError as e:
            candidates.append(Candidate(label=label, plan=plan, breakdown=None, reason=str(e)))
            continue
        candidates.append(Candidate(label=label, plan=plan, breakdown=breakdown, reason=_reason(breakdown)))
    chosen = None
    for i, c in enumerate(candidates):
        if not c.fits:
            continue
        full = estimate(spec, c.plan, gpu)
        candidates[i] = Candidate(label=c.label, plan=c.plan, breakdown=full, reason=_reason(full))
        if full.fits:
            chosen = candidates[i]
            break
    return PlanResult(candidates=tuple(candidates), chosen=chosen)


def _reason(b: MemoryBreakdown) -> str:
    from memtune.units import fmt_gib

    usable = b.device_usable_bytes - b.margin_bytes
    verb = "fits" if b.fits else "does not fit"
    return f"{verb}: needs {fmt_gib(b.required_bytes)} of {fmt_gib(usable)} usable"

"""Choose how to run a fine-tune: estimate candidate plans, keep those that fit, pick the cheapest.

"Cheapest" is the fewest GPU-seconds per trained token among the plans that fit with the safety margin; ties go to
more headroom. Every candidate is screened and costed in closed form (``memtune.estimate.screen``,
``memtune.planner.cost``); the cheapest are traced until one is confirmed to fit; then the finalists near it are
ranked by the step time of their traces (``memtune.planner.steptime``), corrected by what this GPU measured
(``memtune.planner.measured``).
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from memtune.errors import InvalidPlanError
from memtune.estimate import MemoryBreakdown, estimate
from memtune.estimate.categories import Verdict
from memtune.estimate.screen import screen, screen_band
from memtune.plan import Plan, describe, stack_sharding
from memtune.planner import measured, steptime
from memtune.planner.cost import NETWORK_GBS, CostEstimate, step_cost
from memtune.records import SCHEMA_VERSION
from memtune.specs.gpu import GpuSpec
from memtune.specs.model import ModelSpec, default_lora_targets

if TYPE_CHECKING:
    from memtune.planner.measured import Measurement


@dataclass(frozen=True, kw_only=True, slots=True)
class Candidate:
    label: str
    plan: Plan
    breakdown: MemoryBreakdown | None
    reason: str
    """Why it does or does not fit (or cannot run)."""
    cost: CostEstimate | None = None
    measured: Measurement | None = None
    """This exact plan's latest measurement on the GPU (``memtune.planner.measured.Measurement``), which its cost
    then reflects; None when it was never measured there."""

    @property
    def fits(self) -> bool:
        return self.breakdown is not None and self.breakdown.fits


@dataclass(frozen=True, kw_only=True, slots=True)
class PlanResult:
    candidates: tuple[Candidate, ...]
    chosen: Candidate | None
    reference: Candidate | None = None
    """llama-cookbook's default path for the same job (no FSDP, so no checkpointing), for comparison."""
    data: dict | None = None
    """Token-length statistics of the dataset the plan was made for."""
    model: str | None = None
    gpu: str | None = None

    def ranked(self) -> list[Candidate]:
        """The costed candidates in the planner's order of preference (``rank``), the chosen plan first: a plan
        tied with it at three significant digits may show more headroom by the screen than the chosen one keeps
        by its trace, but only the chosen one was confirmed."""
        return sorted((c for c in self.candidates if c.cost is not None),
                      key=lambda c: (c is not self.chosen, rank(c)))

    def fallbacks(self, limit: int = 3) -> tuple[Plan, ...]:
        """Plans to switch to when the chosen one runs out of memory after all: the cheapest others that fit (by
        their trace, or clearly by the screen) and need less memory than it, in order of cost."""
        if self.chosen is None:
            return ()
        need = self.chosen.breakdown.required_bytes
        smaller = [c for c in self.candidates if c.fits and c is not self.chosen and c.breakdown.required_bytes < need
                   and (c.breakdown.method == "trace" or _clearly_fits(c.breakdown))]
        return tuple(c.plan for c in sorted(smaller, key=rank)[:limit])

    def to_json(self) -> dict:
        def one(c: Candidate) -> dict:
            return {"label": c.label, "plan": c.plan.to_dict(), "fits": c.fits, "reason": c.reason,
                    "verdict": c.breakdown.verdict if c.breakdown else "invalid",
                    "method": c.breakdown.method if c.breakdown else None,
                    "peak_reserved_bytes": c.breakdown.peak_reserved_bytes if c.breakdown else None,
                    "required_bytes": c.breakdown.required_bytes if c.breakdown else None,
                    "headroom_bytes": c.breakdown.headroom_bytes if c.breakdown else None,
                    "estimated_tokens_per_s": c.cost.tokens_per_s if c.cost else None,
                    "measured_tokens_per_s": c.measured.tokens_per_s if c.measured else None,
                    "components": ({k.value: v for k, v in c.breakdown.components.items()} if c.breakdown
                                   else None),
                    "cost": c.cost.to_json() if c.cost else None}

        position = {id(c): i for i, c in enumerate(self.ranked())}
        closest = None
        if self.chosen is None:
            ran = [c for c in self.candidates if c.breakdown is not None]
            closest = one(min(ran, key=lambda c: c.breakdown.required_bytes)) if ran else None
        return {
            "schema": SCHEMA_VERSION,
            "model": self.model,
            "gpu": self.gpu,
            "chosen": self.chosen.plan.to_dict() if self.chosen else None,
            "closest_miss": closest,
            "estimate": self.chosen.breakdown.to_json() if self.chosen else None,
            "candidates": [one(c) | {"rank": position.get(id(c))} for c in self.candidates],
            "llama_cookbook_default": one(self.reference) if self.reference else None,
            "fallbacks": [p.to_dict() for p in self.fallbacks()],
            "data": self.data,
        }


OPTIMIZERS = ("adamw", "adamw-fused", "adamw-8bit")
"""In order of preference at equal cost: PyTorch's default, the same update fused (no temporary copy of the
states), 8-bit states (they change the training)."""
PRECISIONS = ("bf16", "amp-bf16", "fp16", "amp-fp16", "fp32")
"""In order of preference at equal cost."""
FAST_RESERVED_ERROR = {"none": (0.13, 0.10), "checkpointed": (0.17, 0.17)}
"""The fast estimate's largest reserved under- and over-estimate against the full-depth trace, without and with
activation checkpointing (``bench/results/fast.json``: -12.8 % .. +9.1 % over 60 configurations, -16.4 % .. +16.9 %
over 48): a fast verdict this close to the limit, either way, is settled at full depth."""
MAX_TRACED = 12
"""Candidates traced, cheapest first, before the search settles for the closest miss."""
FINALIST_BAND = 1.5
"""Plans whose closed-form cost is within this factor of the plan the search settled on are ranked by their traced
step time: the closed form's error on held-out plans reached 46 % before it learned the host's share
(``bench/results/step_time.json``), the traced time's is far smaller."""
MAX_FINALISTS = 8
"""Finalists taken by closed-form cost (the search's plan among them)."""
MAX_TRACED_FINALISTS = 16
"""Finalists traced at most, those whose closed-form cost beats the fastest traced one included."""


def candidate_plans(gpu: GpuSpec, *, num_gpus: int, nodes: int, batch_size: int, seq_len: int,
                    batching: str = "padding") -> list[Plan]:
    """The search space: full fine-tune, LoRA, and (one GPU: k-bit weights are not sharded) LoRA on 8-bit or 4-bit
    weights; no, selective or full activation checkpointing; each precision the GPU runs (bf16 or, without it,
    fp16 weights for LoRA and fp16 autocast over fp32 weights for a full fine-tune; fp32 autocast too); foreach or
    fused AdamW, and without FSDP2 8-bit AdamW (bitsandbytes cannot step sharded parameters); over several GPUs
    FSDP2 with and without resharding after the forward (HSDP across nodes); and for a full fine-tune FSDP2's CPU
    offload of the weights, gradients and AdamW states."""
    world = num_gpus * nodes
    shardings = ["none"] if world == 1 else (["hsdp", "fsdp"] if nodes > 1 else ["fsdp", "fsdp-grad-op"])
    half = "bf16" if gpu.bf16 else "fp16"
    kinds = [{"peft": "none", "precision": "bf16"} if gpu.bf16 else None,
             {"peft": "none", "precision": f"amp-{half}"}, {"peft": "lora", "precision": half}]
    if world == 1:
        kinds += [{"peft": "lora", "precision": half, "quantization": q} for q in ("8bit", "4bit")]
    common = {"num_gpus": num_gpus, "nodes": nodes, "batch_size": batch_size, "seq_len": seq_len,
              "batching": batching}
    plans = [Plan(**common, sharding=sharding, checkpointing=ac, optimizer=opt, **kind)
             for kind in kinds if kind is not None for sharding in shardings
             for ac in ("none", "selective", "full") for opt in OPTIMIZERS
             if not (opt == "adamw-8bit" and sharding != "none")]
    # A full fine-tune can also keep its weights, gradients and AdamW states on the host (FSDP2 CPU offload).
    plans += [Plan(**common, sharding="fsdp" if world == 1 else shardings[0], offload=True, checkpointing=ac,
                   **kind)
              for kind in kinds if kind is not None and kind["peft"] == "none" for ac in ("none", "selective", "full")]
    return plans


def llama_cookbook_default(gpu: GpuSpec, *, num_gpus: int = 1, batch_size: int = 1, seq_len: int,
                           batching: str = "padding") -> Plan:
    """What llama-cookbook's ``finetuning.py`` runs without ``enable_fsdp``: no FSDP, hence no activation
    checkpointing (it only turns it on inside its FSDP branch), bf16 weights on every card (``from_pretrained``
    with ``torch_dtype=bfloat16``), AdamW; every process holds the whole model."""
    return Plan(precision="bf16", batch_size=batch_size, seq_len=seq_len, batching=batching, stack="llama-cookbook")


def micro_batches(global_batch: int | None, batch_size: int, world_size: int, *, fixed_batch: int | None = None,
                  fixed_accum: int | None = None) -> list[tuple[int, int]]:
    """(micro-batch, gradient accumulation) pairs that make ``global_batch`` sequences per optimizer step over
    ``world_size`` GPUs (micro-batches of powers of two and the whole per-GPU batch), or just ``(batch_size, 1)``
    without a global batch. A ``fixed_batch`` or ``fixed_accum`` (the user's) leaves the one split it allows;
    raises InvalidPlanError where it does not divide the per-GPU batch."""
    if global_batch is None:
        return [(batch_size, fixed_accum or 1)]
    if global_batch < 1:
        raise InvalidPlanError([f"the global batch must be at least 1 sequence, not {global_batch}"])
    per_gpu, rest = divmod(global_batch, world_size)
    if per_gpu == 0 or rest:
        raise InvalidPlanError([f"a global batch of {global_batch} sequences does not divide over {world_size} GPUs"])
    from memtune.plan import PLAN_LIMITS

    for what, fixed in (("micro-batches of {}", fixed_batch), ("{} gradient-accumulation steps", fixed_accum)):
        if fixed is not None and per_gpu % fixed:
            raise InvalidPlanError([f"a global batch of {global_batch} sequences ({per_gpu} per GPU) does not split "
                                    f"into {what.format(fixed)}: give a divisor of {per_gpu}, or leave it out to "
                                    f"search every split"])
    if fixed_batch is not None and fixed_accum is not None and fixed_batch * fixed_accum != per_gpu:
        raise InvalidPlanError([f"micro-batch {fixed_batch} x gradient accumulation {fixed_accum} is not the global "
                                f"batch's {per_gpu} sequences per GPU: drop one of them"])
    if fixed_batch is not None:
        return [(fixed_batch, per_gpu // fixed_batch)]
    if fixed_accum is not None:
        return [(per_gpu // fixed_accum, fixed_accum)]
    sizes, b = {per_gpu}, 1
    while b < per_gpu:
        sizes.add(b)
        b *= 2
    pairs = [(b, per_gpu // b) for b in sorted(sizes) if per_gpu % b == 0 and b <= PLAN_LIMITS["batch_size"]
             and per_gpu // b <= PLAN_LIMITS["grad_accum"]]
    if not pairs:
        raise InvalidPlanError([f"a global batch of {global_batch:,} sequences over {world_size} GPUs needs more than "
                                f"{PLAN_LIMITS['grad_accum']:,} micro-batches of at most "
                                f"{PLAN_LIMITS['batch_size']:,} per step: use a smaller global batch"])
    return pairs


def with_fixed(kind: Plan, fixed: dict, **fields) -> Plan:
    """``kind`` with the ``fields`` of a search and the knobs the user fixed; CPU offload brings FSDP2 along (over
    one GPU too) unless the sharding is fixed as well. Under llama-cookbook's stack the weights are bf16 unless the
    precision is fixed, and checkpointing brings FSDP along (it checkpoints only there). Raises InvalidPlanError
    when they cannot go together."""
    fields = {**fields, **fixed}
    if fields.get("offload") and kind.sharding == "none" and "sharding" not in fields:
        fields["sharding"] = "fsdp"
    stack = fields.get("stack", kind.stack)
    if stack == "llama-cookbook":
        fields.setdefault("precision", "bf16")
    if "sharding" not in fields:
        fields["sharding"] = stack_sharding(stack, fields.get("checkpointing", kind.checkpointing), kind.sharding)
    return dataclasses.replace(kind, **fields)


def _screened_or_traced(spec: ModelSpec, plan: Plan, gpu: GpuSpec) -> MemoryBreakdown:
    """The screen where it is clear by a wide margin, the trace where it is close."""
    quick = screen(spec, plan, gpu)
    if _clearly_misses(quick) or _clearly_fits(quick):
        return quick
    return estimate(spec, plan, gpu, fast=True)


def plan_candidates(spec: ModelSpec, gpu: GpuSpec, *, num_gpus: int = 1, nodes: int = 1, batch_size: int = 1,
                    seq_len: int = 2048, batching: str | None = None, data: dict | None = None,
                    fixed: dict | None = None, global_batch: int | None = None, lengths=None,
                    network_gbs: float = NETWORK_GBS,
                    runs_with: Callable[[Plan], None] | None = None) -> PlanResult:
    """Screen every candidate in closed form (``memtune.estimate.screen``) and cost it, then trace them cheapest
    first - skipping those the screen puts clearly out of reach - until one is confirmed to fit (fast trace; at full
    depth where the fast one is too close to the limit to call).

    ``fixed`` holds plan fields the user set (``{"peft": "none"}`` for a full fine-tune): they override every
    candidate. With ``global_batch`` (sequences per optimizer step) every split into micro-batch x gradient
    accumulation is a candidate too. With ``lengths`` (a dataset's token lengths) and no ``batching``, padding and
    packing are both searched: padding's memory is set by the longest sample and its time by the average padded
    sequence of length-grouped batches of each micro-batch size; packing fills ``seq_len``-token chunks.
    ``network_gbs`` is the bandwidth between nodes per GPU. ``runs_with(plan)`` (e.g. ``export.expressible(tool)``)
    raises ``InvalidPlanError`` for plans the tool that will run them cannot express: they are listed with its rule,
    not searched. llama-cookbook's default path is estimated too, as the reference the chosen plan is compared
    with."""
    batchings = ("padding", "packing") if lengths is not None and batching is None else (batching or "padding",)
    seq_for = {b: lengths.max if b == "padding" and lengths is not None else seq_len for b in batchings}
    ref_batching = batching or "padding"
    ref_plan = llama_cookbook_default(gpu, batch_size=batch_size, batching=ref_batching,
                                      seq_len=lengths.max if ref_batching == "padding" and lengths else seq_len)
    for b in batchings:  # a sequence longer than the model's context is bad input, not a miss
        Plan(seq_len=seq_for[b]).check_model(spec)
    try:
        ref_plan.check_model(spec)  # llama-cookbook runs llama models only
        ref_estimate = _screened_or_traced(spec, ref_plan, gpu)
        reference = Candidate(label="llama-cookbook default (no FSDP, so no checkpointing)", plan=ref_plan,
                              breakdown=ref_estimate, reason=_reason(ref_estimate))
    except InvalidPlanError as e:
        reference = Candidate(label="llama-cookbook default", plan=ref_plan, breakdown=None, reason=str(e))
    candidates, seen = [], set()
    splits = micro_batches(global_batch, batch_size, num_gpus * nodes, fixed_batch=(fixed or {}).get("batch_size"),
                           fixed_accum=(fixed or {}).get("grad_accum"))
    kinds = [k for b in batchings for k in candidate_plans(gpu, num_gpus=num_gpus, nodes=nodes,
                                                             batch_size=batch_size, seq_len=seq_for[b], batching=b)]
    shapes: dict[tuple[str, int], tuple[float, float | None]] = {}  # (batching, micro-batch) -> (efficiency, mean)
    for kind, (micro, accum) in ((k, sp) for k in kinds for sp in splits):
        try:
            plan = with_fixed(kind, fixed or {}, batch_size=micro, grad_accum=accum)
        except InvalidPlanError as e:  # the user's constraints rule this kind out (e.g. QLoRA under --peft none)
            if str(e) not in seen:
                seen.add(str(e))
                candidates.append(Candidate(label=f"{describe(kind)} under the options given", plan=kind,
                                            breakdown=None, reason=str(e)))
            continue
        if plan.peft == "none" and plan.precision == "fp16" and "precision" not in (fixed or {}):
            continue  # a LoRA kind made a full fine-tune: pure fp16 weights and states would lose the updates
        if plan.peft == "lora" and "lora_targets" not in (fixed or {}):
            plan = dataclasses.replace(plan, lora_targets=default_lora_targets(spec))
        if plan in seen:
            continue
        seen.add(plan)
        label = describe(plan)
        try:
            plan.check_model(spec)
            plan.check_gpu(gpu)
            if runs_with is not None:
                runs_with(plan)
            breakdown = screen(spec, plan, gpu)
        except InvalidPlanError as e:
            if str(e) not in seen:  # one row per reason a plan cannot run
                seen.add(str(e))
                candidates.append(Candidate(label=label, plan=plan, breakdown=None, reason=str(e)))
            continue
        key = (plan.batching, plan.batch_size)
        if key not in shapes:
            if plan.batching == "padding" and lengths is not None:
                shapes[key] = (lengths.padded(plan.batch_size)[1], lengths.mean_padded(plan.batch_size))
            elif plan.batching == "padding":
                shapes[key] = ((data or {}).get("padding_efficiency", 1.0), None)
            else:
                shapes[key] = (1.0, None)
        efficiency, mean_seq_len = shapes[key]
        candidates.append(Candidate(label=label, plan=plan, breakdown=breakdown, reason=_reason(breakdown),
                                    cost=step_cost(spec, plan, gpu, padding_efficiency=efficiency,
                                                   mean_seq_len=mean_seq_len, network_gbs=network_gbs)))
    chosen, traced = None, 0
    learned: dict[Plan, float] = {}  # trace / screen of the plans traced so far, by everything but the optimizer
    order = sorted((i for i, c in enumerate(candidates) if c.breakdown is not None), key=lambda i: rank(candidates[i]))
    for i in order:
        c = candidates[i]
        usable = c.breakdown.usable_bytes
        twin = dataclasses.replace(c.plan, optimizer="adamw")
        if twin in learned and c.breakdown.required_bytes * learned[twin] > usable:
            # its twin (the same plan with AdamW) was traced: the screen is that far off for this plan too
            scaled = _scaled(c.breakdown, learned[twin])
            candidates[i] = dataclasses.replace(c, breakdown=scaled, reason=_reason(scaled))
            continue
        if _clearly_misses(c.breakdown) or traced >= MAX_TRACED:
            continue
        traced += 1
        try:
            full = settled_estimate(spec, c.plan, gpu)  # full depth (and its allocator replay) for a close call
        except InvalidPlanError as e:  # the stack cannot run it (e.g. an MoE kernel that takes bf16 only)
            candidates[i] = _cannot_run(c, e)
            continue
        learned[twin] = full.required_bytes / c.breakdown.required_bytes
        confirmed = dataclasses.replace(c, breakdown=full, reason=_reason(full))
        candidates[i] = confirmed
        if not full.fits and not c.plan.expandable_segments and _fragmentation_pays(full):
            # The allocated peak fits; the allocator's cache does not: try expandable segments (full depth, so
            # the allocator can be replayed under the card's limit).
            plan = dataclasses.replace(c.plan, expandable_segments=True)
            grown = estimate(spec, plan, gpu)
            confirmed = Candidate(label=describe(plan), plan=plan, breakdown=grown, reason=_reason(grown),
                                  cost=c.cost)
            candidates.append(confirmed)
        if confirmed.fits:
            chosen = confirmed
            break
    finalists = _trace_finalists(spec, gpu, candidates, chosen, shapes, network_gbs) if chosen else []
    if chosen is not None:
        chosen = candidates[next(i for i in finalists if candidates[i].plan == chosen.plan)]
    # What this GPU measured corrects the estimates (``measured``), then the fastest finalist that fits is chosen.
    result = measured.apply(PlanResult(candidates=tuple(candidates), chosen=chosen, reference=reference, data=data,
                                       model=spec.name, gpu=gpu.name), gpu.name)
    # The fastest finalist whose fast estimate is a close call is settled at full depth before it is chosen.
    ranked = sorted((i for i in finalists if result.candidates[i].fits), key=lambda i: rank(result.candidates[i]))
    candidates = list(result.candidates)
    for i in ranked:
        c = candidates[i]
        if _close_call(c.breakdown):  # at full depth (cached when the search traced it there already)
            try:
                full = estimate(spec, c.plan, gpu)
            except InvalidPlanError as e:
                candidates[i] = _cannot_run(c, e)
                continue
            candidates[i] = c = dataclasses.replace(c, breakdown=full, reason=_reason(full))
        if c.fits:
            return dataclasses.replace(result, candidates=tuple(candidates), chosen=c)
    return dataclasses.replace(result, candidates=tuple(candidates))


def _trace_finalists(spec: ModelSpec, gpu: GpuSpec, candidates: list[Candidate], chosen: Candidate,
                     shapes: dict, network_gbs: float) -> list[int]:
    """Trace the finalists and cost them by their traced step time (``candidates`` is updated in place); returns
    their indices.

    Finalists: the plan the search settled on and the other plans that fit (by their trace or by the screen) whose
    closed-form cost is within ``FINALIST_BAND`` of it, cheapest first, ``MAX_FINALISTS`` at most. Each is traced:
    its memory confirmed (a finalist the trace finds too large drops out), its time taken from the trace
    (``steptime.traced_cost``).
    """
    limit = chosen.cost.gpu_seconds_per_token * FINALIST_BAND
    pool = [i for i, c in enumerate(candidates)
            if c is chosen or (c.fits and c.cost is not None and c.cost.gpu_seconds_per_token <= limit)]
    pool = sorted(pool, key=lambda i: rank(candidates[i]))[:MAX_FINALISTS]
    if not any(candidates[i] is chosen for i in pool):
        pool.append(next(i for i, c in enumerate(candidates) if c is chosen))
    closed_form = {i: candidates[i].cost for i in pool}
    for i in pool:
        _trace_cost(spec, gpu, candidates, i, shapes, network_gbs)
    _scale_untraced(candidates, pool, closed_form)
    # A plan left out whose closed-form cost beats the fastest traced finalist is traced too, so that no plan shows
    # a better estimate than the chosen one only because it was never traced.
    while len(pool) < MAX_TRACED_FINALISTS:
        fitting = [candidates[i] for i in pool if candidates[i].fits]
        best = min((c.cost.gpu_seconds_per_token for c in fitting), default=limit)
        rest = [i for i, c in enumerate(candidates) if i not in pool and c.fits and c.cost is not None
                and c.cost.gpu_seconds_per_token < best]
        if not rest:
            break
        i = min(rest, key=lambda i: rank(candidates[i]))
        pool.append(i)
        _trace_cost(spec, gpu, candidates, i, shapes, network_gbs)
    return pool


def _scale_untraced(candidates: list[Candidate], pool: list[int], closed_form: dict) -> None:
    """Put the closed-form costs of the plans left untraced in the finalists' currency: each is scaled by the
    median ratio of traced to closed-form step time over the finalists (the closed form is calibrated on one model;
    this is how far it is off for this one), so that the plans compare like with like."""
    ratios = [candidates[i].cost.step_time_s / closed_form[i].step_time_s for i in pool
              if closed_form.get(i) is not None and candidates[i].cost is not None
              and candidates[i].cost.method == "trace" and closed_form[i].method == "closed form"]
    if not ratios:
        return
    r = statistics.median(ratios)
    for i, c in enumerate(candidates):
        if i not in pool and c.cost is not None and c.cost.method == "closed form":
            candidates[i] = dataclasses.replace(c, cost=dataclasses.replace(
                c.cost, step_time_s=c.cost.step_time_s * r, compute_s=c.cost.compute_s * r,
                tokens_per_s=c.cost.tokens_per_s / r, utilization=c.cost.utilization / r))


def _trace_cost(spec: ModelSpec, gpu: GpuSpec, candidates: list[Candidate], i: int, shapes: dict,
                network_gbs: float) -> None:
    """Trace candidate ``i`` (its memory at the fast depth; a close call is settled at full depth only if it is
    to be chosen) and cost it by its traced step time, in place."""
    c = candidates[i]
    try:
        breakdown = c.breakdown if c.breakdown.method == "trace" else estimate(spec, c.plan, gpu, fast=True)
    except InvalidPlanError as e:
        candidates[i] = _cannot_run(c, e)
        return
    efficiency, mean_seq_len = shapes.get((c.plan.batching, c.plan.batch_size), (1.0, None))
    traced = steptime.estimated_cost(spec, c.plan, gpu, padding_efficiency=efficiency, mean_seq_len=mean_seq_len,
                                     network_gbs=network_gbs)
    candidates[i] = dataclasses.replace(c, breakdown=breakdown, reason=_reason(breakdown), cost=traced)


def _scaled(b: MemoryBreakdown, ratio: float) -> MemoryBreakdown:
    """A screen corrected by the trace/screen ratio of a traced twin: it no longer fits."""
    return dataclasses.replace(b, peak_reserved_bytes=round(b.peak_reserved_bytes * ratio), gpu_reserved_bytes=None,
                               verdict=Verdict.DOES_NOT_FIT,
                               verdict_reason="screen corrected by the trace of the same plan with AdamW")


def _clearly_misses(b: MemoryBreakdown) -> bool:
    """A screened plan whose need is above the usable memory by more than the screen's largest over-estimate in
    its class."""
    return b.required_bytes > b.usable_bytes * (1 + screen_band(b.plan)[1])


def _clearly_fits(b: MemoryBreakdown) -> bool:
    """A screened plan whose need is below the usable memory by more than the screen's largest under-estimate in
    its class."""
    return b.required_bytes < b.usable_bytes * (1 - screen_band(b.plan)[0])


def settled_estimate(spec: ModelSpec, plan: Plan, gpu: GpuSpec) -> MemoryBreakdown:
    """The estimate ``plan`` shows for a plan: the fast one (``fast_depth`` layers traced and extended), settled at
    full depth where its verdict is a close call. ``check`` shows the same, so a plan reads one number."""
    b = estimate(spec, plan, gpu, fast=True)
    return estimate(spec, plan, gpu) if _close_call(b) else b


def _cannot_run(c: Candidate, error: InvalidPlanError) -> Candidate:
    """A candidate whose trace the stack refused: it stays in the table with the reason, out of the running."""
    return dataclasses.replace(c, breakdown=None, reason=f"cannot run: {error}", cost=None)


def _close_call(b: MemoryBreakdown) -> bool:
    """A fast estimate whose verdict the fast path's largest reserved error could turn."""
    pool = b.usable_bytes - b.runtime_overhead_bytes
    under, over = FAST_RESERVED_ERROR["none" if b.plan.checkpointing == "none" else "checkpointed"]
    return pool * (1 - under) < b.peak_reserved_bytes <= pool * (1 + over)


def _fragmentation_pays(b: MemoryBreakdown) -> bool:
    """The allocated peak, with the workspaces and the runtime, fits inside the margin: only the cache is too big."""
    return b.peak_allocated_bytes + b.runtime_overhead_bytes <= b.usable_bytes


def rank(c: Candidate) -> tuple:
    """Fewest GPU-seconds per trained token first (to three significant digits); at equal cost no quantization,
    then the preferred optimizer (``OPTIMIZERS``) and precision (``PRECISIONS``); then the most headroom."""
    optimizer = OPTIMIZERS.index(c.plan.optimizer) if c.plan.optimizer in OPTIMIZERS else len(OPTIMIZERS)
    return (float(f"{c.cost.gpu_seconds_per_token:.3g}"),
            c.plan.quantization != "none", optimizer, PRECISIONS.index(c.plan.precision),
            -c.breakdown.headroom_bytes)


def _reason(b: MemoryBreakdown) -> str:
    from memtune.units import fmt_gib

    usable = b.usable_bytes
    text = f"{b.verdict}: needs {fmt_gib(b.required_bytes)} of {fmt_gib(usable)} usable"
    return text if b.verdict != Verdict.BORDERLINE else f"{text} ({b.verdict_reason})"

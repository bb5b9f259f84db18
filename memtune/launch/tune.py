"""``tune``: plan -> validate the best candidates -> the plan file ``launch`` runs (the best that validated, the
others that validated as its fallbacks).

The token lengths of the run's own data, in its format (the Llama Guard template included), set the padded sequence
length and the padding waste the planner's cost model uses.

On the GPU it plans for, ``tune`` chooses by measurement: it runs real steps of every plan that fits whose estimated
cost is within the time model's error of the cheapest (``memtune.planner.steptime.measured_error``; the model cannot
tell those apart), and of at least three, then takes the fastest measured one. Each measurement is kept
(``memtune.planner.measured``) so that later plans for that GPU start from what it really does. Anywhere else - a
larger local GPU capped to emulate the target, or no GPU at all (a dry run on fake tensors, where a candidate passes
when its full estimate fits) - a speed measured here says nothing about the target, so the choice stays the
estimate's: the cheapest plan that validates, in order of cost.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from memtune.errors import ConfigError, PlanDoesNotFitError
from memtune.estimate.categories import Verdict
from memtune.runconfig import RunConfig
from memtune.planfile import PlanFile, model_beside, read_table_file, write_plan_file

if TYPE_CHECKING:  # imported where used: they bring torch along, which the launch command line need not load
    from memtune.data import LengthStats
    from memtune.plan import Plan
    from memtune.planner import Candidate
    from memtune.planner.cost import CostEstimate
    from memtune.specs.gpu import GpuSpec
    from memtune.specs.model import ModelSpec
    from memtune.validate.run import ValidationRecord

PLAN_FILE = "plan.toml"


@dataclass(frozen=True, kw_only=True, slots=True)
class RunFile:
    """A file with a ``[run]`` table, and optionally the model and GPU (a plan file is one)."""

    run: RunConfig
    model: str | None
    gpu: str | None
    folder: Path


def read_run_file(path: str | Path) -> RunFile:
    """Raises ConfigError for a missing or malformed file, or one without a ``[run]`` table."""
    path = Path(path)
    data = read_table_file(path, "run")
    if "run" not in data:
        raise ConfigError(f"{path} has no [run] table; add one with at least dataset = PATH")
    folder = path.resolve().parent
    model = data.get("model")
    if model:
        model = model_beside(path, str(model))
    return RunFile(run=RunConfig.from_dict(data["run"]).resolved(folder), model=model, gpu=data.get("gpu"),
                   folder=folder)


def data_lengths(run: RunConfig, tokenizer_path: str, *, vocab_size: int, max_len: int):
    """Token lengths of the training samples in the run's format (``LengthStats``)."""
    from memtune.data import LengthStats
    from memtune.train import data as train_data

    tokenizer = train_data.load_tokenizer(tokenizer_path, vocab_size=vocab_size)
    samples = train_data.tokenize(train_data.read_dataset(run.dataset), run, tokenizer, seq_len=max_len)
    return LengthStats(lengths=tuple(sorted(samples.lengths)), source=run.dataset)


MIN_MEASURED = 3
"""On the GPU it plans for, ``tune`` measures at least this many plans (every one that fits, if fewer do)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Trial:
    """One validated candidate: its record, whether it passed, and (on the target GPU) its measured speed."""

    candidate: Candidate
    record: ValidationRecord
    passed: bool
    """It ran without running out of memory (in a dry run: its full estimate fits)."""
    estimated: CostEstimate | None = None
    """The time model's cost of the plan on the run's data (set on the target GPU only)."""
    measured: CostEstimate | None = None
    """``estimated`` scaled by the measured / estimated step time of the validation (None without a measurement)."""


def tune(*, model: str, gpu: str, run: RunConfig, output_dir: Path, num_gpus: int = 1, nodes: int = 1,
         batch_size: int = 1, seq_len: int | None = None, batching: str = "padding", global_batch: int | None = None,
         fixed: dict | None = None, candidates: int = 3, validate_steps: int = 3,
         console: Console | None = None) -> PlanFile:
    """Plan the run, validate the best plans that fit and write ``output_dir/plan.toml`` with the chosen one first
    and the others that validated as its fallbacks; ``plan.json`` (the planner's result) and ``validation.json``
    (the chosen plan's validation) go next to it for the report.

    On the GPU planned for (the local one), ``candidates`` is the least number of plans measured (never below
    ``MIN_MEASURED``; more when more are within the time model's error of the cheapest) and the fastest measured
    one is chosen; the fallbacks follow by measured speed. Elsewhere (emulated or a dry run) up to ``candidates``
    plans are validated in order of cost and the first that passes is chosen.

    Raises:
        ConfigError: bad input, or no candidate fits or validates.
    """
    import torch

    from memtune.plan import Plan
    from memtune.planner import measured, plan_candidates, steptime
    from memtune.specs import resolve_gpu, resolve_model
    from memtune.specs.model import find_config
    from memtune.validate.run import validate_plan

    console = console or Console(highlight=False)
    for option, value in (("--candidates", candidates), ("--batch-size", batch_size),
                          ("--validate-steps", validate_steps), ("--num-gpus", num_gpus), ("--nodes", nodes),
                          ("--global-batch", 1 if global_batch is None else global_batch)):
        if value < 1:
            raise ConfigError(f"{option} must be at least 1, not {value}")
    spec, gpu_spec = resolve_model(model), resolve_gpu(gpu)
    if fixed:
        Plan(**fixed)  # a bad value is bad input, not a candidate that fails
    tokenizer = run.tokenizer or str(find_config(model).parent)
    context = spec.max_position_embeddings or 1 << 20
    if seq_len is not None and not 1 <= seq_len <= context:
        raise ConfigError(f"--seq-len must be between 1 and {spec.name}'s context of {context} tokens, not {seq_len}")
    lengths = data_lengths(run, tokenizer, vocab_size=spec.vocab_size, max_len=1 << 30)
    data = lengths.to_json()
    if seq_len is None:
        seq_len = min(lengths.max, context) if batching == "padding" else min(2048, context)
    if batching == "padding":
        data["padding_efficiency"] = lengths.padded(batch_size)[1]
    console.print(f"[bold]tune[/] {escape(spec.name)} on {escape(gpu_spec.name)}: {lengths.count} samples, "
                  f"p50 {lengths.quantile(0.5)}, max {lengths.max} tokens; seq_len {seq_len}")
    result = plan_candidates(spec, gpu_spec, num_gpus=num_gpus, nodes=nodes, batch_size=batch_size, seq_len=seq_len,
                             batching=batching, data=data, fixed=fixed, global_batch=global_batch,
                             lengths=lengths if batching == "padding" else None)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "plan.json").write_text(json.dumps(result.to_json(), indent=2))
    fitting = sorted((c for c in result.candidates if c.fits and c is not result.chosen),
                     key=lambda c: (c.cost.gpu_seconds_per_token, -c.breakdown.headroom_bytes))
    order = ([result.chosen] if result.chosen else []) + fitting
    if order and not _has_bitsandbytes():
        from memtune.train import quant

        skipped = [c for c in order if quant.needs_bitsandbytes(c.plan)]
        order = [c for c in order if not quant.needs_bitsandbytes(c.plan)]
        if skipped:
            console.print(f"[yellow]note:[/] bitsandbytes is not installed here: {len(skipped)} plan(s) with k-bit "
                          "weights or 8-bit AdamW are left out")
    if not order:
        raise PlanDoesNotFitError(f"no candidate fits on {gpu_spec.name}; see `memtune plan` for the closest miss, "
                                  "or add GPUs (--num-gpus)")
    local = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    emulate = local is not None and not _same_gpu(local, gpu_spec)
    on_target = local is not None and not emulate
    if on_target:
        least = max(candidates, MIN_MEASURED)
        errors = {c.plan: steptime.measured_error(gpu_spec.name, c.plan) for c in order}
        shortlist = measurement_shortlist(order, at_least=least, error=errors.__getitem__)
        within = "-".join(f"{100 * e:.0f}" for e in sorted(set(errors.values())))
        console.print(f"choosing by measurement on this {escape(local)}: {len(shortlist)} of {len(order)} plans that "
                      f"fit - those within {within} % (the time model's error) of the cheapest estimate, at least "
                      f"{min(least, len(order))}")
    else:
        shortlist = order[:candidates]
        why = (f"this {escape(local)} is capped to stand in for the {escape(gpu_spec.name)}, so its speed is not the "
               "target's" if emulate else "no CUDA GPU here (dry runs on fake tensors)")
        console.print(f"choosing by estimate ({why}): validating the {len(shortlist)} cheapest plan(s) in order of "
                      "cost; the first that passes runs")
    trials, unsaved = [], False
    for i, candidate in enumerate(shortlist):
        record = validate_plan(spec, candidate.plan, gpu_spec, steps=validate_steps, emulate=emulate,
                               out_dir=output_dir / "validation" / str(i), random_init=run.random_init)
        passed = not record.oom and (record.mode != "dry-run" or record.estimate.verdict != Verdict.DOES_NOT_FIT)
        console.print(f"  {'[green]ok[/]' if passed else '[red]no[/]'}  {escape(candidate.label)}: "
                      f"{escape(record.verdict)}")
        trial = Trial(candidate=candidate, record=record, passed=passed)
        measurement = measured.from_validation(record, spec, gpu_spec) if on_target and passed else None
        if measurement is not None:
            estimated = data_cost(spec, candidate.plan, gpu_spec, lengths)
            trial = dataclasses.replace(trial, estimated=estimated,
                                        measured=measured.scaled(estimated, measurement.ratio))
            if not measured.record(measurement) and not unsaved:
                unsaved = True
                console.print(f"[yellow]warning:[/] cannot write to {escape(str(measured.store_dir()))}: this "
                              "run's measurements will not inform later plans")
        trials.append(trial)
    passed = [t for t in trials if t.passed]
    if not passed:
        raise PlanDoesNotFitError(f"none of the {len(shortlist)} cheapest plans validated on {gpu_spec.name}; see "
                                  f"{output_dir / 'validation'}")
    if on_target:
        passed = fastest_first(passed)
        render_speeds(console, trials, chosen=passed[0])
        best = passed[0]
        speed = f"{best.measured.tokens_per_s:,.0f} tokens/s per GPU measured" if best.measured else "not measured"
        console.print(f"chosen: [bold]{escape(best.candidate.label)}[/] - the fastest measured ({speed})")
    else:
        console.print(f"chosen by estimate: [bold]{escape(passed[0].candidate.label)}[/] - the cheapest plan that "
                      "validated")
    (output_dir / "validation.json").write_text(json.dumps(passed[0].record.to_json(), indent=2))
    plan_file = PlanFile(model=model, gpu=gpu_spec.name, plan=passed[0].candidate.plan,
                         fallbacks=tuple(t.candidate.plan for t in passed[1:]),
                         run=dataclasses.replace(run, output_dir=str(output_dir)))
    write_plan_file(output_dir / PLAN_FILE, plan_file)
    return plan_file


def measurement_shortlist(order: list[Candidate], *, at_least: int, error) -> list[Candidate]:
    """The plans to measure, from ``order`` (the plans that fit, in the planner's order): every one whose estimated
    GPU-seconds per token is within the time model's error of the cheapest's - the larger of the two plans' errors
    (``error``: a fraction, or a function of the plan) - which the model cannot rank, and then the next in ``order``
    until there are ``at_least`` (all of them, if fewer fit). Kept in ``order``'s order."""
    error_of = error if callable(error) else (lambda plan: error)
    cheapest = min(order, key=lambda c: c.cost.gpu_seconds_per_token)
    least = cheapest.cost.gpu_seconds_per_token
    close = {id(c) for c in order
             if c.cost.gpu_seconds_per_token <= least * (1 + max(error_of(c.plan), error_of(cheapest.plan)))}
    extra = max(0, at_least - len(close))
    picked = []
    for c in order:
        if id(c) in close:
            picked.append(c)
        elif extra:
            picked.append(c)
            extra -= 1
    return picked


def fastest_first(trials: list[Trial]) -> list[Trial]:
    """Measured trials by measured tokens/s, fastest first; any without a measurement after them, in their order."""
    # Speeds equal to four digits are a tie, which keeps the estimate's order.
    timed = sorted((t for t in trials if t.measured is not None),
                   key=lambda t: -float(f"{t.measured.tokens_per_s:.4g}"))
    return timed + [t for t in trials if t.measured is None]


def data_cost(spec: ModelSpec, plan: Plan, gpu: GpuSpec, lengths: LengthStats | None) -> CostEstimate:
    """The time model's cost of ``plan`` on the run's data, as the planner works it out: padded plans by the average
    padded sequence of length-grouped batches and their share of real tokens, packed plans by full chunks.

    A validation runs full-length batches; scaling this cost by its measured / estimated step time
    (``measured.scaled``) carries the measurement over to the data, so plans with different micro-batches (hence
    different padding) are compared by the real tokens they would train per second."""
    from memtune.planner import steptime

    shape = {}
    if plan.batching == "padding" and lengths is not None:
        shape = {"padding_efficiency": lengths.padded(plan.batch_size)[1],
                 "mean_seq_len": lengths.mean_padded(plan.batch_size)}
    return steptime.estimated_cost(spec, plan, gpu, **shape)


def render_speeds(console: Console, trials: list[Trial], *, chosen: Trial) -> None:
    """Estimated and measured tokens/s of each plan validated on the target GPU, fastest measured first."""
    table = Table(title="Estimated vs measured speed (tokens/s per GPU on this data)", title_justify="left")
    for col in ("candidate", "estimated", "measured", "measured / estimated", "peak memory: estimated vs measured"):
        table.add_column(col, justify="left" if col == "candidate" else "right", no_wrap=col != "candidate")
    for t in fastest_first([t for t in trials if t.passed]) + [t for t in trials if not t.passed]:
        mark = "[bold]> [/]" if t is chosen else "  "
        if t.measured is not None:
            speeds = (f"{t.estimated.tokens_per_s:,.0f}", f"{t.measured.tokens_per_s:,.0f}",
                      f"{t.measured.tokens_per_s / t.estimated.tokens_per_s:.2f}")
        else:
            speeds = ("-", "-", "-")
        error = t.record.error  # estimated / measured - 1 of peak allocated memory
        memory = "out of memory" if t.record.oom else "-" if error is None else f"{100 * error:+.1f} %"
        table.add_row(mark + escape(t.candidate.label), *speeds, memory)
    console.print(table)
    if any(t.measured is not None and t.candidate.plan.batching == "padding" for t in trials):
        console.print("measured on full-length batches and counted, like the estimate, in this data's real tokens "
                      "per second (length-grouped padded batches)", highlight=False)


def _has_bitsandbytes() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def _same_gpu(device_name: str, gpu) -> bool:
    from memtune.errors import UnknownGpuError
    from memtune.specs import resolve_gpu

    try:
        return resolve_gpu(device_name).name == gpu.name
    except UnknownGpuError:
        return False

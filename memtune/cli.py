"""The ``memtune`` command line: thin wrappers that parse options, call one library function and render it."""

from __future__ import annotations

import functools
import json
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from memtune.errors import ConfigError, MemtuneError, UnknownGpuError

# peft asks transformers' models a deprecated question on every LoRA model it wraps; nothing a user can act on
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


class _OneLineUsageErrors(typer.core.TyperGroup):
    """A usage error (unknown option, a value of the wrong type) is one line on stderr and exit code 2, as every
    other bad input is, instead of a usage panel."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:  # typer 0.2x carries its own copy of click
            from typer._click.exceptions import UsageError
        except ImportError:
            from click import UsageError

        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else "memtune"
            err_console.print(f"[bold red]error:[/] {escape(e.format_message())} (see {escape(where)} --help)",
                              highlight=False, soft_wrap=True)
            sys.exit(2)
        except typer.Abort:
            err_console.print("aborted", highlight=False)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(cls=_OneLineUsageErrors, rich_markup_mode="rich", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, context_settings={"help_option_names": ["-h", "--help"]},
                  help="Will this LLM fine-tune fit in GPU memory, and what is the cheapest way to run it?")
PIPED_WIDTH = 160
"""Columns for tables written to a pipe or a log (Rich's default there is 80, which wraps the plan table's rows)."""


def _console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    piped = (stream is None or not stream.isatty()) and "COLUMNS" not in os.environ
    return Console(stderr=stderr, width=PIPED_WIDTH if piped else None)


console = _console()
err_console = _console(stderr=True)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Profile name (see `memtune models`), a config.json "
                                                               "path, a model folder or a cached Hub id.")]
GpuOpt = Annotated[str, typer.Option("--gpu", "-g", help="GPU profile name (see `memtune gpus`), case-insensitive.")]
NumGpus = Annotated[int, typer.Option(help="GPUs per node.")]
Nodes = Annotated[int, typer.Option(help="Nodes.")]
Precision = Annotated[str, typer.Option(help="auto | fp32 | bf16 | fp16 | amp-bf16 | amp-fp16 "
                                             "(auto: bf16 where the GPU has it, else amp-fp16).")]
Sharding = Annotated[str, typer.Option(help="auto | none | fsdp | fsdp-grad-op | hsdp (auto: fsdp on >1 GPU or "
                                            "with --offload).")]
Checkpointing = Annotated[str, typer.Option(help="none | selective (recompute element-wise ops, keep matmul outputs) | full "
                                                 "(recompute every decoder layer).")]
PeftOpt = Annotated[str, typer.Option("--peft", help="none | lora")]
LoraRank = Annotated[int | None, typer.Option(help="LoRA rank r (default 8).")]
LoraTargets = Annotated[str | None, typer.Option(help="Comma-separated linear layers LoRA adapts, or all-linear "
                                                       "(default: the model's attention projections, as peft picks "
                                                       "them: q_proj,v_proj for Llama).")]
LoraDropout = Annotated[float | None, typer.Option(help="LoRA dropout (default 0.05).")]
Quantization = Annotated[str, typer.Option(help="none | 8bit | 4bit (frozen base weights; needs --peft lora).")]
OptimizerOpt = Annotated[str, typer.Option("--optimizer", help="adamw | adamw-fused | adamw-8bit | sgd")]
BatchSize = Annotated[int, typer.Option(help="Micro-batch per GPU, in sequences.")]
SeqLen = Annotated[int, typer.Option(help="Tokens per sequence.")]
Attention = Annotated[str, typer.Option(help="sdpa | eager")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]
GradAccum = Annotated[int, typer.Option(help="Micro-batches per optimizer step.")]
Offload = Annotated[bool, typer.Option(help="FSDP2 CPU offload: sharded weights, gradients and optimizer states in "
                                            "host memory (needs --sharding fsdp; one GPU works).")]
ExpandableSegments = Annotated[bool, typer.Option(help="The allocator's expandable segments "
                                                       "(PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True).")]
KbitUpcast = Annotated[bool, typer.Option(help="QLoRA: peft's prepare_model_for_kbit_training upcasts the "
                                               "unquantized weights to fp32 (fp32 residual stream and logits).")]
StackOpt = Annotated[str, typer.Option(help="The code that runs the step: memtune (its own recipe) | hf (the "
                                            "Hugging Face Trainer's checkpointing and optimizer) | llama-cookbook "
                                            "(finetuning.main: bf16 weights, checkpointing only with FSDP).")]
ReportOpt = Annotated[str | None, typer.Option(help="Also write an HTML report to this file.")]


def _user_errors(command: Callable) -> Callable:
    """Turn a MemtuneError, or a file the command cannot read or write (an output under ``/proc``, a folder where a
    file was asked for), into one line on stderr and its exit code (2 for bad input, 1 for a plan that does not fit
    or a run that could not finish), never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        code = 2
        try:
            return command(*args, **kwargs)
        except MemtuneError as e:
            message, code = str(e), e.exit_code
        except OSError as e:
            where = f" {e.filename}" if e.filename else ""
            message = f"cannot use{where}: {e.strerror or type(e).__name__}; give a path this user can read and write"
        err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=code) from None

    return wrapper


def _working(message: str):
    """A spinner with ``message`` on stderr while the work runs, where stderr is a terminal (nothing in a pipe)."""
    import contextlib

    return err_console.status(escape(message)) if err_console.is_terminal else contextlib.nullcontext()


def _say_written(path, quiet: bool) -> None:
    """Where a file went, on stderr when stdout carries JSON."""
    (err_console if quiet else console).print(f"report written to {escape(str(path))}", highlight=False)


def _plan_from_options(gpu, spec, *, num_gpus, nodes, precision, sharding, checkpointing, peft, lora_rank, lora_targets,
                       lora_dropout, quantization, optimizer, batch_size, seq_len, attention, grad_accum,
                       offload, expandable_segments, kbit_upcast=False, stack="memtune"):
    from memtune.plan import Plan

    from memtune.plan import stack_sharding

    if precision == "auto":  # llama-cookbook loads bf16 weights on every card
        precision = "bf16" if gpu.bf16 or stack == "llama-cookbook" else "amp-fp16"
    if sharding == "auto":
        alone = num_gpus * nodes == 1 and not offload
        sharding = stack_sharding(stack, checkpointing, "none" if alone else ("hsdp" if nodes > 1 else "fsdp"))
    from memtune.specs.model import default_lora_targets, resolve_lora_targets

    given = [f"--{name}" for name, value in (("lora-rank", lora_rank), ("lora-targets", lora_targets),
                                              ("lora-dropout", lora_dropout)) if value is not None]
    if given and peft != "lora":
        raise ConfigError(f"{', '.join(given)} only {'applies' if len(given) == 1 else 'apply'} to LoRA: add "
                          f"--peft lora, or leave {'it' if len(given) == 1 else 'them'} out")
    targets = tuple(t.strip() for t in (lora_targets or "").split(",") if t.strip())
    if lora_targets is not None and not targets:
        raise ConfigError("--lora-targets names no layer: give comma-separated layer names, or all-linear")
    targets = resolve_lora_targets(targets, spec) if targets else default_lora_targets(spec)
    lora_rank = 8 if lora_rank is None else lora_rank
    lora_dropout = 0.05 if lora_dropout is None else lora_dropout
    return Plan(precision=precision, sharding=sharding, num_gpus=num_gpus, nodes=nodes, checkpointing=checkpointing,
                peft=peft, lora_rank=lora_rank, lora_targets=targets, lora_dropout=lora_dropout,
                quantization=quantization, optimizer=optimizer, batch_size=batch_size, seq_len=seq_len,
                attention=attention, grad_accum=grad_accum, offload=offload,
                expandable_segments=expandable_segments, kbit_upcast=kbit_upcast, stack=stack)


PLAN_KNOBS = ("num_gpus", "nodes", "precision", "sharding", "checkpointing", "peft", "lora_rank", "lora_targets",
              "lora_dropout", "quantization", "optimizer", "batch_size", "seq_len", "attention", "grad_accum",
              "offload", "expandable_segments", "kbit_upcast", "stack")
"""The plan options estimate and validate both declare, passed on to ``_plan_from_options``."""


def _knob_values(options: dict) -> dict:
    return {name: options[name] for name in PLAN_KNOBS}


@app.command()
@_user_errors
def estimate(
    *,
    model: ModelOpt,
    gpu: GpuOpt,
    calibrated: Annotated[bool, typer.Option("--calibrated", help="Scale by the measured/estimated ratios in "
                                                                  "profiles/calibration for this architecture.")] = False,
    full_depth: Annotated[bool, typer.Option("--full-depth", help="Trace every layer of a model deeper than "
                                                                  "64 (minutes) instead of the fast path.")] = False,
    as_json: JsonOut = False,
    num_gpus: NumGpus = 1,
    nodes: Nodes = 1,
    precision: Precision = "auto",
    sharding: Sharding = "auto",
    checkpointing: Checkpointing = "none",
    peft: PeftOpt = "none",
    lora_rank: LoraRank = None,
    lora_targets: LoraTargets = None,
    lora_dropout: LoraDropout = None,
    quantization: Quantization = "none",
    optimizer: OptimizerOpt = "adamw",
    batch_size: BatchSize = 1,
    seq_len: SeqLen = 2048,
    attention: Attention = "sdpa",
    grad_accum: GradAccum = 1,
    offload: Offload = False,
    expandable_segments: ExpandableSegments = False,
    kbit_upcast: KbitUpcast = False,
    stack: StackOpt = "memtune",
) -> None:
    """Per-GPU peak memory of one training step, by category and phase, and whether it fits."""
    from memtune.estimate import estimate as run_estimate
    from memtune.specs import resolve_gpu, resolve_model

    gpu_spec = resolve_gpu(gpu)
    spec = resolve_model(model)
    plan = _plan_from_options(gpu_spec, spec, **_knob_values(locals()))
    with _working(f"tracing a training step of {spec.name} on fake tensors"):
        breakdown = run_estimate(spec, plan, gpu_spec, calibrated=calibrated, full_depth=full_depth)
    if as_json:
        print(json.dumps(breakdown.to_json(), indent=2))
        return
    from memtune.render import render_breakdown

    render_breakdown(console, spec, breakdown)


@app.command()
@_user_errors
def validate(
    *,
    model: Annotated[str | None, typer.Option("--model", "-m", help="As for estimate (or from --plan-file).")] = None,
    plan_file: Annotated[str | None, typer.Option(help="A plan file (TOML or JSON: model, gpu, [plan]); its "
                                                       "values replace the plan options.")] = None,
    gpu: Annotated[str | None, typer.Option("--gpu", "-g", help="GPU the plan is for (default: the local one).")] = None,
    emulate_gpu: Annotated[str | None, typer.Option(help="Check a plan for this (smaller) GPU on the local one: "
                                                         "PyTorch's pool is capped at its memory less the CUDA "
                                                         "context.")] = None,
    steps: Annotated[int, typer.Option(help="Measured steps (after one warm-up step).")] = 5,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Fake tensors on the CPU, fake process group for N "
                                                            "ranks (automatic without a CUDA GPU).")] = False,
    tolerance: Annotated[float, typer.Option(help="Largest |estimate/measured - 1| of peak allocated that "
                                                  "agrees.")] = 0.03,
    out: Annotated[str | None, typer.Option(help="Folder for validation.json (and the snapshot).")] = None,
    snapshot: Annotated[bool, typer.Option("--snapshot", help="Record a CUDA memory snapshot of the steps.")] = False,
    random_init: Annotated[bool, typer.Option("--random-init", help="Random weights even when the model folder "
                                                                    "has a checkpoint.")] = False,
    report: ReportOpt = None,
    as_json: JsonOut = False,
    num_gpus: NumGpus = 1,
    nodes: Nodes = 1,
    precision: Precision = "auto",
    sharding: Sharding = "auto",
    checkpointing: Checkpointing = "none",
    peft: PeftOpt = "none",
    lora_rank: LoraRank = None,
    lora_targets: LoraTargets = None,
    lora_dropout: LoraDropout = None,
    quantization: Quantization = "none",
    optimizer: OptimizerOpt = "adamw",
    batch_size: BatchSize = 1,
    seq_len: SeqLen = 2048,
    attention: Attention = "sdpa",
    grad_accum: GradAccum = 1,
    offload: Offload = False,
    expandable_segments: ExpandableSegments = False,
    kbit_upcast: KbitUpcast = False,
    stack: StackOpt = "memtune",
) -> None:
    """Run a few real training steps and compare measured memory with the estimate.

    The model starts from its checkpoint when --model is a folder (or cache entry) with weights, else from a random
    init of its config.

    Exit code 0: the estimate agrees (or a dry run passed); 1: it does not fit or the estimate disagrees.
    """
    from memtune.specs import detect_gpus, resolve_gpu, resolve_model
    from memtune.validate.run import validate_plan

    knobs, from_file = _knob_values(locals()), None
    if not 1 <= steps <= 10_000:
        raise ConfigError(f"--steps must be between 1 and 10,000, not {steps}")
    if not 0 < tolerance < 1:  # also refuses nan
        raise ConfigError(f"--tolerance must be a fraction between 0 and 1 (0.03 is 3 %), not {tolerance}")
    if plan_file:
        from memtune.planfile import read_plan_file

        from_file = read_plan_file(plan_file)
        model, gpu = model or from_file.model, gpu or from_file.gpu
    if not model:
        raise ConfigError("pass --model or --plan-file")
    if emulate_gpu:
        gpu_spec = resolve_gpu(emulate_gpu)
    elif gpu:
        gpu_spec = resolve_gpu(gpu)
    else:
        local = [d.profile for d in detect_gpus() if d.profile is not None]
        if not local:
            raise UnknownGpuError("no known GPU detected here: pass --gpu (or --emulate-gpu)")
        gpu_spec = local[0]
    spec = resolve_model(model)
    plan_ = from_file.plan if from_file else _plan_from_options(gpu_spec, spec, **knobs)
    import contextlib

    with _working(f"tracing {spec.name} on fake tensors") if dry_run else contextlib.nullcontext():
        record = validate_plan(spec, plan_, gpu_spec, steps=steps, emulate=emulate_gpu is not None,
                               dry_run=True if dry_run else None, tolerance=tolerance,
                               out_dir=Path(out) if out else None, snapshot=snapshot, random_init=random_init)
    if as_json:
        print(json.dumps(record.to_json(), indent=2))
    else:
        from memtune.render import render_validation

        render_validation(console, spec, record)
    if report:
        from memtune.reporting import validation_report

        _say_written(validation_report(record.to_json(), report), as_json)
    if not record.agrees:
        raise typer.Exit(code=1)


@app.command()
@_user_errors
def plan(
    *,
    model: ModelOpt,
    gpu: GpuOpt,
    num_gpus: NumGpus = 1,
    nodes: Nodes = 1,
    network_gbs: Annotated[float, typer.Option(help="Bandwidth between nodes per GPU, GB/s (200 Gb/s: 25).")] = 25.0,
    batch_size: Annotated[int | None, typer.Option(help="Micro-batch per GPU, in sequences (default 1; with "
                                                        "--global-batch: fixes the split, else searched).")] = None,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence; with --dataset, the packing chunk length "
                                              "(padding pads to the longest sample of each batch).")] = 2048,
    batching: Annotated[str | None, typer.Option(help="Fix padding | packing (default: padding, or with "
                                                      "--dataset both searched).")] = None,
    global_batch: Annotated[int | None, typer.Option(help="Sequences per optimizer step over all GPUs: every split "
                                                          "into micro-batch x gradient accumulation is searched.")] = None,
    global_tokens: Annotated[int | None, typer.Option(help="The global batch in tokens instead (divided by the "
                                                           "sequence length).")] = None,
    dataset: Annotated[str | None, typer.Option(help="A .jsonl/.json/.csv/.parquet file whose token lengths set "
                                                     "the padded sequence length.")] = None,
    text_field: Annotated[str, typer.Option(help="Text column, counted with --tokenizer.")] = "text",
    tokenizer: Annotated[str | None, typer.Option(help="Local tokenizer folder.")] = None,
    length_field: Annotated[str | None, typer.Option(help="Column that already holds token counts.")] = None,
    prompt_tokens: Annotated[int, typer.Option(help="Tokens a prompt template adds to every sample "
                                                    "(214 for Llama Guard 3).")] = 0,
    precision: Annotated[str | None, typer.Option(help="Fix the precision (default: searched).")] = None,
    checkpointing: Annotated[str | None, typer.Option(help="Fix checkpointing: none | selective | full.")] = None,
    peft: Annotated[str | None, typer.Option("--peft", help="Fix PEFT: none (full fine-tune) | lora.")] = None,
    quantization: Annotated[str | None, typer.Option(help="Fix quantization: none | 8bit | 4bit.")] = None,
    optimizer: Annotated[str | None, typer.Option("--optimizer", help="Fix the optimizer.")] = None,
    attention: Annotated[str | None, typer.Option(help="Fix attention: sdpa | eager.")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Fix gradient accumulation.")] = None,
    sharding: Annotated[str | None, typer.Option(help="Fix sharding: none | fsdp | fsdp-grad-op | hsdp.")] = None,
    offload: Annotated[bool | None, typer.Option("--offload/--no-offload", help="Fix FSDP2 CPU offload on or "
                                                                              "off.")] = None,
    expandable_segments: Annotated[bool | None, typer.Option(
        "--expandable-segments/--no-expandable-segments", help="Fix the allocator's expandable segments.")] = None,
    kbit_upcast: Annotated[bool | None, typer.Option("--kbit-upcast/--no-kbit-upcast", help="Fix peft's fp32 "
                                                      "upcast of a QLoRA model's unquantized weights.")] = None,
    stack: StackOpt = "memtune",
    lora_rank: Annotated[int | None, typer.Option(help="LoRA rank r of the LoRA candidates.")] = None,
    lora_targets: Annotated[str | None, typer.Option(help="Comma-separated linear layers the LoRA candidates "
                                                          "adapt.")] = None,
    out: Annotated[str | None, typer.Option(help="Write the chosen plan to this plan file (TOML).")] = None,
    export: Annotated[str | None, typer.Option(help="llama-cookbook | hf | torchrun: search only the plans that "
                                                    "tool can run and print the chosen one for it.")] = None,
    report: ReportOpt = None,
    as_json: JsonOut = False,
) -> None:
    """Estimate the usual ways to fine-tune MODEL on GPU and pick the cheapest that fits.

    Candidates: full fine-tune, LoRA and 4-bit QLoRA (single GPU), each without and with activation checkpointing,
    at the GPU's best precision; options given here fix a knob for all of them (--peft none for a full
    fine-tune). The chosen plan has the fewest GPU-seconds per trained token among those that fit. llama-cookbook's
    default path (no FSDP, so no checkpointing) is estimated alongside for comparison.

    Exit code 0: a plan fits; 1: none fits (the closest miss is shown); 2: bad input.
    """
    from memtune.planner.request import SearchRequest
    from memtune.specs import resolve_gpu, resolve_model

    gpu_spec = resolve_gpu(gpu)
    spec = resolve_model(model)
    if out:
        from memtune.planfile import check_writable

        check_writable(out)
    request = SearchRequest.from_options(
        spec, num_gpus=num_gpus, nodes=nodes, batch_size=batch_size, seq_len=seq_len, batching=batching,
        global_batch=global_batch, global_tokens=global_tokens, network_gbs=network_gbs, export=export,
        dataset=dataset, text_field=text_field, length_field=length_field, tokenizer=tokenizer,
        prompt_tokens=prompt_tokens, lora_targets=lora_targets, precision=precision, checkpointing=checkpointing,
        peft=peft, quantization=quantization, optimizer=optimizer, attention=attention, grad_accum=grad_accum,
        sharding=sharding, offload=offload, expandable_segments=expandable_segments, lora_rank=lora_rank,
        kbit_upcast=kbit_upcast, stack=None if stack == "memtune" else stack)
    with _working(f"searching the plans for {spec.name} on {gpu_spec.name}"):
        result = request.search(spec, gpu_spec)
    if result.chosen is None and all(c.breakdown is None for c in result.candidates):
        first = result.candidates[0].reason.split(";")[0] if result.candidates else "no candidates"
        raise ConfigError(f"no plan can run under the options given{' with ' + export if export else ''} "
                          f"({first}): relax one of them")
    if out and result.chosen:
        from memtune.planfile import PlanFile, write_plan_file

        write_plan_file(out, PlanFile(model=model, gpu=gpu_spec.name, plan=result.chosen.plan,
                                      fallbacks=result.fallbacks()))
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        from memtune.render import render_plan

        render_plan(console, spec, gpu_spec, result)
        if out and result.chosen:
            console.print(f"plan written to {escape(out)}")
    if export and result.chosen:
        _print_export(export, spec.hub_id or model, result.chosen.plan)
    if report:
        from memtune.reporting import plan_report

        _say_written(plan_report(result.to_json(), report), as_json)
    if result.chosen is None:  # as `check`: a plan that does not fit is an answer, not bad input
        raise typer.Exit(code=1)


def _print_export(tool: str, model: str, plan_) -> None:
    from memtune.planner.export import hf_trainer_config, llama_cookbook_command, llama_cookbook_kwargs, shell

    if tool == "llama-cookbook":
        # an enum value prints as its Python name (finetuning.main takes the ShardingStrategy member)
        print(json.dumps(llama_cookbook_kwargs(model, plan_), indent=2, default=lambda v: f"ShardingStrategy.{v.name}"))
    elif tool == "hf":
        print(json.dumps(hf_trainer_config(model, plan_), indent=2))
    else:  # the command line carries the environment itself
        print(shell(llama_cookbook_command(model, plan_)))
        return
    if plan_.allocator_env:
        env = " ".join(f"{k}={v}" for k, v in plan_.allocator_env.items())
        err_console.print(f"run it with {env} in the environment (the plan counts on it)", highlight=False)


@app.command()
@_user_errors
def check(
    plan_file: Annotated[str, typer.Argument(help="A plan file written by `memtune plan --out`.")],
    *,
    gpu: Annotated[str | None, typer.Option("--gpu", "-g", help="Check against this GPU instead of the file's.")] = None,
    stack: Annotated[str | None, typer.Option(help="Check the plan as this code runs it instead of the file's: "
                                                   "memtune | hf | llama-cookbook.")] = None,
) -> None:
    """Pre-flight check for scripts and CI: exit 0 if the plan fits, 1 if not (with the reason), 2 on bad input."""
    from memtune.planfile import read_plan_file
    from memtune.planner import settled_estimate
    from memtune.specs import resolve_gpu, resolve_model

    pf = read_plan_file(plan_file)
    gpu_spec = resolve_gpu(gpu or pf.gpu)
    spec = resolve_model(pf.model)
    plan_ = pf.plan.on_stack(stack) if stack else pf.plan
    with _working(f"estimating {pf.model} on {gpu_spec.name}"):
        b = settled_estimate(spec, plan_, gpu_spec)
    usable = b.usable_bytes
    line = f"{b.verdict} on {gpu_spec.name}: needs {b.required_bytes / 2**30:.2f} GiB of {usable / 2**30:.2f} GiB usable"
    if b.traced_layers is not None and b.traced_layers < spec.num_layers:
        line += (f" (as plan estimates it: {b.traced_layers} of {spec.num_layers} layers traced and extended; "
                 f"memtune estimate --full-depth traces them all)")
    if b.fits:
        console.print(f"[green]{escape(line)}[/]")
        return
    err_console.print(f"[red]{escape(line)}[/] ({escape(b.verdict_reason)})", soft_wrap=True)
    raise typer.Exit(code=1)


@app.command()
@_user_errors
def gpus(as_json: JsonOut = False) -> None:
    """List the known GPU profiles, and the GPUs on this machine (through NVML)."""
    from memtune.render import render_gpus
    from memtune.specs import detect_gpus, known_gpus

    known, found = known_gpus(), detect_gpus()
    if as_json:
        print(json.dumps({
            "known": [{"name": g.name, "memory_bytes": g.memory_bytes, "compute_capability": ".".join(map(str, g.compute_capability)),
                       "bf16": g.bf16, "tflops": g.tflops, "bandwidth_gbs": g.bandwidth_gbs,
                       "interconnect": g.interconnect, "source": g.source} for g in known],
            "detected": [{"index": d.index, "name": d.name, "memory_bytes": d.memory_bytes,
                          "profile": d.profile.name if d.profile else None} for d in found]}, indent=2))
        return
    render_gpus(console, known, found)


@app.command()
@_user_errors
def models(as_json: JsonOut = False) -> None:
    """List the model profiles shipped with memtune."""
    from memtune.render import render_models
    from memtune.specs import known_models, resolve_model

    specs = [resolve_model(name) for name in known_models()]
    if as_json:
        print(json.dumps([{"name": s.name, "model_type": s.model_type, "num_params": s.num_params,
                           "num_layers": s.num_layers, "hidden_size": s.hidden_size, "vocab_size": s.vocab_size,
                           "tie_word_embeddings": s.tie_word_embeddings,
                           "max_position_embeddings": s.max_position_embeddings} for s in specs], indent=2))
        return
    render_models(console, specs)


# Commands that live with their own modules register here.
# -- launch, tune --
from memtune.launch.commands import launch as _launch  # noqa: E402 - registered after the app exists
from memtune.launch.commands import tune as _tune  # noqa: E402

app.command(name="launch")(_user_errors(_launch))
app.command(name="tune")(_user_errors(_tune))

# -- report --
from memtune.reporting import report as _report  # noqa: E402 - registered after the app exists

app.command(name="report")(_user_errors(_report))


def main() -> None:
    app()

"""The ``launch`` and ``tune`` commands (registered in ``memtune.cli``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from memtune.errors import ConfigError, UnknownGpuError

EXIT_FAILED = 1
EXIT_INTERRUPTED = 130

OutputDir = Annotated[str | None, typer.Option(help="Run folder: run.json, metrics.jsonl, checkpoints/, final/, "
                                                    "report.html. An unfinished run there is resumed.")]
MaxSteps = Annotated[int | None, typer.Option(help="Optimizer steps to run (replaces the run's max_steps/epochs).")]
Nnodes = Annotated[int, typer.Option(help="Nodes taking part (torchrun --nnodes); start the same command on each.")]
NodeRank = Annotated[int, typer.Option(help="This node's rank (torchrun --node-rank).")]
RdzvEndpoint = Annotated[str | None, typer.Option(help="host:port of node 0 (torchrun --rdzv-endpoint).")]
Report = Annotated[str | None, typer.Option(help="Also write the run's HTML report to this file (the run folder "
                                                 "always gets report.html).")]
NoFallback = Annotated[bool, typer.Option("--no-fallback", help="End the run at an out-of-memory error instead of "
                                                                 "restarting with the next plan.")]
Override = Annotated[str | None, typer.Option(help="Resume a run whose settings changed, taking the new values of "
                                                   "these (comma-separated run settings or plan fields, e.g. "
                                                   "lr,batch_size); any other change is refused.")]


def launch(
    plan_file: Annotated[str, typer.Argument(help="A plan file with a \\[run] table (TOML or JSON), e.g. "
                                                  "profiles/runs/tiny-cpu.toml.")],
    *,
    output_dir: OutputDir = None,
    max_steps: MaxSteps = None,
    nnodes: Nnodes = 1,
    node_rank: NodeRank = 0,
    rdzv_endpoint: RdzvEndpoint = None,
    no_fallback: NoFallback = False,
    override: Override = None,
    report: Report = None,
) -> None:
    """Run the fine-tune of a plan file: its plan, its \\[run] settings, its \\[\\[fallback]] plans after an OOM.

    Writes metrics.jsonl, sharded checkpoints, the final model (save_pretrained) and report.html into the output
    folder; Ctrl-C or SIGTERM saves a checkpoint first, and the same command resumes exactly.

    Exit code 0: finished; 1: failed (out of memory with no plan left, or an error); 130: interrupted (checkpoint
    saved); 2: bad input.
    """
    from memtune.launch.runner import Torchrun, launch_command
    from memtune.planfile import read_plan_file

    path = Path(plan_file)
    if not path.is_file():
        raise ConfigError(f"plan file {plan_file} does not exist; write one with `memtune plan --out` or "
                          "`memtune tune --no-launch`")
    pf = read_plan_file(path)
    torchrun = Torchrun(nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint)
    out = output_dir
    if out is None and pf.run is not None and pf.run.output_dir:
        out = pf.run.resolved(path.resolve().parent).output_dir
    command = launch_command(path.resolve(), Path(out).resolve(), max_steps=max_steps, torchrun=torchrun,
                             fallback=not no_fallback) if out else None
    _run(pf, base_dir=path.resolve().parent, output_dir=out, max_steps=max_steps, torchrun=torchrun,
         fallback=not no_fallback, command=command, report=report,
         override=[k.strip() for k in (override or "").split(",") if k.strip()])


def tune(
    *,
    run_file: Annotated[str, typer.Option("--run", help="A file with a \\[run] table (a plan file will do; its model "
                                                        "and gpu are the defaults).")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="As for plan (default: the run file's).")] = None,
    gpu: Annotated[str | None, typer.Option("--gpu", "-g", help="The GPU to plan for (default: the run file's, "
                                                                "else the local one).")] = None,
    num_gpus: Annotated[int, typer.Option(help="GPUs per node.")] = 1,
    nodes: Annotated[int, typer.Option(help="Nodes.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Micro-batch per GPU, in sequences.")] = 1,
    seq_len: Annotated[int | None, typer.Option(help="Tokens per sequence (default: the longest sample of the data "
                                                     "with padding, 2048 with packing).")] = None,
    batching: Annotated[str, typer.Option(help="padding | packing")] = "padding",
    global_batch: Annotated[int | None, typer.Option(help="Sequences per optimizer step over all GPUs.")] = None,
    precision: Annotated[str | None, typer.Option(help="Fix the precision.")] = None,
    checkpointing: Annotated[str | None, typer.Option(help="Fix checkpointing.")] = None,
    peft: Annotated[str | None, typer.Option("--peft", help="Fix PEFT: none (full fine-tune) | lora.")] = None,
    quantization: Annotated[str | None, typer.Option(help="Fix quantization: none | 8bit | 4bit.")] = None,
    optimizer: Annotated[str | None, typer.Option("--optimizer", help="Fix the optimizer.")] = None,
    candidates: Annotated[int, typer.Option(help="Plans to validate. On the GPU planned for: at least this many "
                                                 "(and 3), plus every plan within the time model's error of the "
                                                 "cheapest; the fastest measured is launched. Emulated or without a "
                                                 "GPU: up to this many of the cheapest; the first that validates "
                                                 "is launched.")] = 3,
    validate_steps: Annotated[int, typer.Option(help="Measured steps per validation.")] = 3,
    output_dir: OutputDir = None,
    max_steps: MaxSteps = None,
    no_fallback: NoFallback = False,
    no_launch: Annotated[bool, typer.Option("--no-launch", help="Stop after writing OUTPUT_DIR/plan.toml (start "
                                                                "it with `memtune launch`, e.g. on several "
                                                                "nodes).")] = False,
    report: Report = None,
) -> None:
    """Plan, validate the best candidates, and launch the best that validated (the others as its fallbacks): on
    the GPU planned for, the fastest measured; emulated or without a GPU, the cheapest by the estimate.

    Exit codes as for launch.
    """
    from memtune.launch.runner import launch_command
    from memtune.launch.tune import PLAN_FILE, read_run_file
    from memtune.launch.tune import tune as run_tune
    from memtune.specs import detect_gpus

    rf = read_run_file(run_file)
    model = model or rf.model
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"--max-steps must be at least 1, not {max_steps}")
    if not model:
        raise ConfigError("pass --model (or put model = ... in the run file)")
    gpu = gpu or rf.gpu
    if not gpu:
        local = [d.profile for d in detect_gpus() if d.profile is not None]
        if not local:
            raise UnknownGpuError("no known GPU detected here: pass --gpu")
        gpu = local[0].name
    out = output_dir or rf.run.output_dir
    if not out:
        raise ConfigError("pass --output-dir DIR (or set output_dir in [run])")
    out_path = Path(out).expanduser().resolve()
    fixed = {k: v for k, v in {"precision": precision, "checkpointing": checkpointing, "peft": peft,
                                "quantization": quantization, "optimizer": optimizer}.items() if v is not None}
    console = Console(highlight=False)
    pf = run_tune(model=model, gpu=gpu, run=rf.run, output_dir=out_path, num_gpus=num_gpus, nodes=nodes,
                  batch_size=batch_size, seq_len=seq_len, batching=batching, global_batch=global_batch, fixed=fixed,
                  candidates=candidates, validate_steps=validate_steps, console=console)
    plan_path = out_path / PLAN_FILE
    console.print(f"plan file written to {escape(str(plan_path))} ({len(pf.fallbacks)} fallback(s))")
    if no_launch:
        return
    command = launch_command(plan_path, out_path, max_steps=max_steps, fallback=not no_fallback)
    _run(pf, base_dir=out_path, output_dir=out_path, max_steps=max_steps, fallback=not no_fallback, command=command,
         console=console, report=report)


def _run(pf, *, base_dir: Path, output_dir, max_steps, fallback: bool, command, torchrun=None,
         console: Console | None = None, report: str | None = None, override: list[str] | None = None) -> None:
    from memtune.launch.runner import Torchrun
    from memtune.launch.runner import launch as run_launch

    console = console or Console(highlight=False)
    try:
        result = run_launch(pf, base_dir=base_dir, output_dir=output_dir, max_steps=max_steps,
                            torchrun=torchrun or Torchrun(), fallback=fallback, command=command, console=console,
                            override=override or ())
    except KeyboardInterrupt:
        console.print("stopped without a checkpoint; the newest one is kept")
        raise typer.Exit(code=EXIT_INTERRUPTED) from None
    _summary(console, result)
    written = result.output_dir / "report.html"
    if report and written.is_file():
        import shutil

        shutil.copyfile(written, report)
        console.print(f"report written to {escape(report)}")
    if result.status == "interrupted":
        raise typer.Exit(code=EXIT_INTERRUPTED)
    if result.status != "finished":
        raise typer.Exit(code=EXIT_FAILED)


def _summary(console: Console, result) -> None:
    out = result.output_dir
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()] \
        if (out / "metrics.jsonl").exists() else []
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    parts = [f"[bold]{result.status}[/]"]
    if train:
        parts.append(f"step {train[-1]['step']}, loss {train[0]['loss']:.4f} -> {train[-1]['loss']:.4f}")
        speeds = [r["tokens_per_s"] for r in train[1:] if r.get("tokens_per_s")]
        if speeds:
            parts.append(f"{sum(speeds) / len(speeds):,.0f} tokens/s")
        peaks = [r["peak_allocated_bytes"] for r in train if r.get("peak_allocated_bytes")]
        estimate = (result.record.get("estimate") or {}).get("peak_allocated_bytes")
        if peaks:
            parts.append(f"peak {max(peaks) / 2**30:.2f} GiB" +
                         (f" (estimate {estimate / 2**30:.2f} GiB)" if estimate else ""))
    if evals:
        parts.append(f"eval loss {evals[-1]['eval_loss']:.4f}")
    console.print("; ".join(parts))
    if result.status == "failed" and result.message:
        console.print(f"[red]{escape(result.message)}[/]", soft_wrap=True)
    if result.status == "interrupted":
        console.print(f"resume with: {escape(result.record.get('command', ''))}", soft_wrap=True)
    console.print(f"run folder: {escape(str(out))}")

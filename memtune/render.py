"""Rich tables for the terminal. Pure presentation: every number comes from the library."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from memtune.estimate.breakdown import MemoryBreakdown
from memtune.estimate.categories import MemCategory, Phase, Verdict
from memtune.plan import summarize
from memtune.units import fmt_gib, gib


def render_breakdown(console: Console, spec, b: MemoryBreakdown) -> None:
    console.print(f"[bold]{escape(spec.name)}[/] ({spec.num_params / 1e9:.2f} B parameters) on [bold]{b.gpu}[/]: "
                  f"{escape(summarize(b.plan))}")
    table = Table(title="Peak memory per GPU (GiB)", title_justify="left")
    table.add_column("category")
    for phase in Phase:
        style = "bold" if phase == b.peak_phase else ""
        table.add_column(phase.value.replace("_", " "), justify="right", style=style)
    for cat in MemCategory:
        if cat in (MemCategory.ALLOCATOR_CACHE, MemCategory.RUNTIME):
            continue
        values = [b.phases[p].get(cat, 0) for p in Phase]
        if any(values):
            table.add_row(cat.value.replace("_", " "), *(f"{gib(v):.2f}" for v in values))
    table.add_row("[bold]allocated[/]", *(f"[bold]{gib(b.phase_peak(p)):.2f}[/]" for p in Phase), end_section=True)
    console.print(table)
    if b.traced_layers is not None and b.traced_layers < spec.num_layers:
        console.print(f"note: {spec.num_layers} layers, estimated from a trace of {b.traced_layers} extended to the "
                      "full depth (the fast path: peak allocated within about 2 % of a full trace)")
    usable = b.usable_bytes
    pool = b.gpu_reserved_bytes if b.gpu_reserved_bytes is not None else b.peak_reserved_bytes
    squeezed = (f" (the allocator releases its cache under pressure: {fmt_gib(b.peak_reserved_bytes)} without a limit)"
                if pool != b.peak_reserved_bytes else "")
    console.print(f"peak allocated {fmt_gib(b.peak_allocated_bytes)} ({b.peak_phase.value.replace('_', ' ')})"
                  f" + allocator cache {fmt_gib(pool - b.peak_allocated_bytes)}"
                  f" = reserved {fmt_gib(pool)}{squeezed}; + CUDA context/NCCL {fmt_gib(b.runtime_overhead_bytes)}"
                  f" = [bold]{fmt_gib(b.required_bytes)}[/] needed of {fmt_gib(usable)} usable"
                  f" ({fmt_gib(b.device_usable_bytes)} minus a {fmt_gib(b.margin_bytes)} margin)")
    if b.fits:
        console.print(f"[bold green]fits[/] with {fmt_gib(b.headroom_bytes)} to spare")
    elif b.verdict == Verdict.BORDERLINE:
        console.print(f"[bold yellow]borderline[/]: {b.verdict_reason} (`memtune validate --emulate-gpu {b.gpu}`)")
    else:
        console.print(f"[bold red]does not fit[/]: {fmt_gib(-b.headroom_bytes)} over")


def render_plan(console: Console, spec, gpu, result, *, top: int = 12) -> None:
    """The cheapest candidates (the chosen one marked), a count of the rest, and why the usual ways to run the
    job do not fit."""
    estimated = [c for c in result.candidates if c.breakdown]
    usable = (f" ({gib(estimated[0].breakdown.usable_bytes):.1f} GiB usable)"
              if estimated else "")
    table = Table(title_justify="left")
    for col, just in (("candidate", "left"), ("batch x acc", "right"), ("needs GiB", "right"),
                      ("headroom", "right"), ("tokens/s", "right"), ("verdict", "left"), ("by", "left")):
        table.add_column(col, justify=just, no_wrap=col != "candidate")
    styles = {Verdict.FITS: "green", Verdict.BORDERLINE: "yellow", Verdict.DOES_NOT_FIT: "red"}
    ranked = [c for c in result.ranked() if c.breakdown]
    fitting = [c for c in ranked if c.fits]
    shown = fitting[:top] if fitting else sorted(ranked, key=lambda c: c.breakdown.required_bytes)[:top]
    table.title = (f"{escape(spec.name)} on {gpu.name}{usable}: "
                   + ("the cheapest plans that fit" if fitting else "nothing fits; the closest"))
    if result.chosen is not None and result.chosen not in shown:
        shown.append(result.chosen)
    for c in shown:
        verdict = c.breakdown.verdict
        mark = "[bold]> [/]" if c is result.chosen else "  "
        table.add_row(mark + escape(c.label), f"{c.plan.batch_size} x {c.plan.grad_accum}",
                      f"{gib(c.breakdown.required_bytes):.2f}", f"{gib(c.breakdown.headroom_bytes):+.2f}",
                      f"{c.cost.tokens_per_s:,.0f}" + (" measured" if c.measured else ""),
                      f"[{styles.get(verdict, 'red')}]{verdict}[/]",
                      {"trace": "traced", "screen": "screened"}[c.breakdown.method])
    console.print(table)
    if any(c.measured for c in shown):
        console.print("tokens/s marked measured: that plan ran on this GPU (`memtune tune`); its measured speed, "
                      "counted in this data's real tokens", highlight=False)
    traced = sum(c.breakdown.method == "trace" for c in estimated)
    invalid = len(result.candidates) - len(estimated)
    console.print(f"{len(result.candidates)} candidates: {len(estimated)} estimated ({traced} traced, the rest "
                  f"screened in closed form), {sum(c.fits for c in estimated)} fit"
                  + (f", {invalid} cannot run" if invalid else ""), highlight=False)
    misses, kinds = [], set()
    for c in ranked:
        kind = (c.plan.peft, c.plan.quantization, c.plan.checkpointing)
        if not c.fits and kind not in kinds and c.plan.optimizer == "adamw":
            kinds.add(kind)
            misses.append(c)
    for c in misses[:6]:
        console.print(f"  {escape(c.label)}: {escape(c.reason)}{_screened(c)}", highlight=False)
    for c in result.candidates:
        if c.breakdown is None:
            console.print(f"  {escape(c.label)}: cannot run: {escape(c.reason)}", highlight=False)
    if result.data:
        d = result.data
        eff = f", padding keeps {100 * d['padding_efficiency']:.1f} % real tokens" if "padding_efficiency" in d else ""
        console.print(f"data: {d['samples']:,} samples, {d['tokens']:,} tokens; length p50 {d['p50']}, p99 {d['p99']}, "
                      f"max {d['max']}{eff}")
    ref = result.reference
    if ref is not None:
        console.print(f"{escape(ref.label)}: {escape(summarize(ref.plan))} -> {escape(ref.reason)}{_screened(ref)}")
    if result.chosen is None:
        console.print("[bold red]no candidate fits[/]: try a shorter --seq-len, a smaller --batch-size or more GPUs")
        return
    speed = "measured" if result.chosen.measured else "about"
    console.print(f"chosen: [bold]{result.chosen.label}[/] - the fewest GPU-seconds per trained token among the plans "
                  f"that fit ({speed} {result.chosen.cost.tokens_per_s:,.0f} tokens/s per GPU)")
    render_breakdown(console, spec, result.chosen.breakdown)


def _screened(c) -> str:
    """A note for a verdict that comes from the closed-form screen only (it was clear enough not to trace)."""
    return " (closed-form screen)" if c.breakdown is not None and c.breakdown.method == "screen" else ""


def render_gpus(console: Console, known, detected) -> None:
    table = Table(title="Known GPUs", title_justify="left")
    for col in ("name", "memory", "CC", "bf16", "bf16/fp16 TFLOP/s", "bandwidth", "interconnect"):
        table.add_column(col, no_wrap=col == "name")
    for g in known:
        dense = g.tflops.get("bf16") or g.tflops.get("fp16", 0)
        table.add_row(g.name, fmt_gib(g.memory_bytes, 1), ".".join(map(str, g.compute_capability)),
                      "yes" if g.bf16 else "no", f"{dense:g}", f"{g.bandwidth_gbs:g} GB/s",
                      f"{g.interconnect} ({g.interconnect_gbs:g} GB/s)")
    console.print(table)
    if not detected:
        console.print("No NVIDIA GPU detected on this machine (NVML not available).")
    for d in detected:
        profile = d.profile.name if d.profile else "[yellow]not in the table: only its memory is known[/]"
        console.print(f"GPU {d.index}: {escape(d.name)}, {fmt_gib(d.memory_bytes)} -> {profile}")


def render_models(console: Console, specs) -> None:
    table = Table(title="Model profiles", title_justify="left")
    for col in ("name", "type", "parameters", "layers", "hidden", "vocab", "tied", "context"):
        table.add_column(col, no_wrap=col == "name")
    for s in specs:
        table.add_row(s.name, s.model_type, f"{s.num_params:,}", str(s.num_layers), str(s.hidden_size),
                      str(s.vocab_size), "yes" if s.tie_word_embeddings else "no", str(s.max_position_embeddings))
    console.print(table)


def render_validation(console: Console, spec, record) -> None:
    est = record.estimate
    console.print(f"[bold]{escape(spec.name)}[/] for [bold]{record.gpu}[/] ({record.mode}, on "
                  f"{escape(record.device_name)}): {escape(summarize(record.plan))}")
    if record.mode == "dry-run":
        rank = record.ranks[0]
        table = Table(title="Traced on fake tensors (GiB per rank)", title_justify="left")
        for col in ("phase", "traced peak"):
            table.add_column(col, justify="right" if col != "phase" else "left")
        for phase, value in (rank.extra or {}).get("traced_phases", {}).items():
            table.add_row(phase.replace("_", " "), f"{gib(value):.2f}")
        console.print(table)
    elif not record.oom:
        table = Table(title="Estimated vs measured, peak allocated per rank (GiB)", title_justify="left")
        for col in ("phase", "estimated", "measured", "error"):
            table.add_column(col, justify="right" if col != "phase" else "left")
        for phase in Phase:
            measured = max((r.measured_phases or {}).get(phase.value, 0) for r in record.ranks)
            e = est.phase_peak(phase)
            table.add_row(phase.value.replace("_", " "), f"{gib(e):.2f}", f"{gib(measured):.2f}",
                          f"{100 * (e / measured - 1):+.2f} %" if measured else "-")
        table.add_row("reserved", f"{gib(est.peak_reserved_bytes):.2f}",
                      f"{gib(record.measured_peak_reserved_bytes):.2f}",
                      f"{100 * (est.peak_reserved_bytes / record.measured_peak_reserved_bytes - 1):+.2f} %")
        console.print(table)
        cats = Table(title="At the optimizer step, by category (GiB per rank)", title_justify="left")
        for col in ("category", "estimated", "measured"):
            cats.add_column(col, justify="right" if col != "category" else "left")
        measured_cats = (record.ranks[0].measured_categories or {}).get("optimizer_step", {})
        for cat in (MemCategory.PARAMETERS, MemCategory.GRADIENTS, MemCategory.OPTIMIZER_STATES):
            cats.add_row(cat.value.replace("_", " "), f"{gib(est.phases[Phase.OPTIMIZER_STEP][cat]):.2f}",
                         f"{gib(measured_cats.get(cat.value, 0)):.2f}")
        console.print(cats)
        r0 = record.ranks[0]
        console.print(f"{r0.step_time_s * 1000:.0f} ms/step, {r0.tokens_per_s:,.0f} tokens/s per rank; "
                      f"{r0.num_alloc_retries or 0} allocator retries")
    for note in record.notes:
        console.print(f"note: {escape(note)}")
    color = "green" if record.agrees else "red"
    console.print(f"[bold {color}]{escape(record.verdict)}[/]")

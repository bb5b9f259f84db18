"""The report page: the records' tables and figures laid out by a jinja2 template (autoescape on).

The page is one self-contained file: inline CSS, inline SVG figures, no script, no link to anything outside it, a
print stylesheet. Every name that comes from a record (model, GPU, labels, reasons, commands) goes through jinja2's
escaping; the figures' SVG is inlined as markup, and matplotlib escapes the text it writes there.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import pandas as pd

from memtune import __version__
from memtune.errors import MemtuneError
from memtune.estimate.categories import Phase, Verdict
from memtune.report import data, figures
from memtune.units import GiB, fmt_gib

VERDICT_CLASS = {Verdict.FITS: "ok", Verdict.BORDERLINE: "warn", Verdict.DOES_NOT_FIT: "bad", "cannot run": "bad"}
BAD_OUTCOMES = ("does not fit", "cannot run", "out of memory", "failed")
"""Texts of the report's verdict cells that are a failure (a validation's "does not fit on L4-24GB", an OOM)."""


@dataclass
class Table:
    """A table ready to print: header cells, rows of text cells, which columns are numbers, a class per row."""

    headers: list[str]
    rows: list[list[str]]
    numeric: set[int] = field(default_factory=set)
    row_classes: list[str] = field(default_factory=list)
    caption: str = ""
    verdict_column: int | None = None
    """A column whose cells are coloured by their verdict (fits, borderline, does not fit)."""

    def cell_class(self, row: int, col: int) -> str:
        classes = []
        if col in self.numeric:
            classes.append("num")
        if self.headers[col] == "reason":
            classes.append("reason")
        if col == self.verdict_column:
            classes.append(verdict_class(self.rows[row][col]))
        return " ".join(classes)


def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.PackageLoader("memtune.report", "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True)


def now() -> dt.datetime:
    """The time a report is made (``SOURCE_DATE_EPOCH`` fixes it, for reproducible files)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch and epoch.isdigit():
        return dt.datetime.fromtimestamp(int(epoch), dt.UTC)
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


# --- formatting --------------------------------------------------------------------------------------------------

def _g(num_bytes) -> str:
    """Bytes as a GiB number with two decimals, as in the terminal tables ('-' when unknown)."""
    if num_bytes is None or pd.isna(num_bytes):
        return "-"
    return f"{num_bytes / GiB:.2f}"


def _pct(ratio) -> str:
    return "-" if ratio is None or pd.isna(ratio) else f"{100 * ratio:+.2f} %"


def _rate(value) -> str:
    return "-" if value is None or pd.isna(value) else f"{value:,.0f}"


def plan_summary(plan: dict | None) -> str:
    """One line for a plan, in the words of ``memtune estimate`` (the same function writes both)."""
    from memtune.plan import summarize

    p = data.plan_of(plan)
    if p is not None:
        return summarize(p)
    return json.dumps(plan) if plan is not None else "-"


def plan_label(plan: dict | None) -> str:
    """The planner's short name for a plan ('full fine-tune + checkpointing')."""
    from memtune.plan import describe

    p = data.plan_of(plan)
    return describe(p) if p is not None else "-"


def plan_line(plan) -> str:
    """'label: summary' for a plan mapping (a run's plans tried, its fallbacks); other values as they are."""
    if isinstance(plan, dict):
        return f"{plan_label(plan)}: {plan_summary(plan)}" if data.plan_of(plan) is not None else json.dumps(plan)
    return str(plan)


def verdict_class(verdict: str) -> str:
    return VERDICT_CLASS.get(verdict) or ("bad" if str(verdict).startswith(BAD_OUTCOMES) else "ok")


# --- sections ----------------------------------------------------------------------------------------------------

def _gpu_facts(name: str) -> list[tuple[str, str]]:
    gpu = data.resolve_gpu(name)
    if gpu is None:
        return [("GPU", name), ("profile", "not in this memtune's GPU table")]
    dense = gpu.tflops.get("bf16") or gpu.tflops.get("fp16", 0)
    return [("GPU", gpu.name), ("memory", fmt_gib(gpu.memory_bytes)),
            ("compute capability", ".".join(map(str, gpu.compute_capability))), ("bf16", "yes" if gpu.bf16 else "no"),
            ("bf16/fp16 dense", f"{dense:g} TFLOP/s"), ("bandwidth", f"{gpu.bandwidth_gbs:g} GB/s"),
            ("interconnect", f"{gpu.interconnect} ({gpu.interconnect_gbs:g} GB/s)"), ("source", gpu.source)]


def _model_facts(name: str) -> list[tuple[str, str]]:
    spec = data.resolve_model(name)
    if spec is None:
        return [("model", name), ("config", "not found on this machine")]
    return [("model", spec.name), ("type", spec.model_type), ("parameters", f"{spec.num_params:,}"),
            ("layers", str(spec.num_layers)), ("hidden size", str(spec.hidden_size)),
            ("vocabulary", f"{spec.vocab_size:,}"), ("tied embeddings", "yes" if spec.tie_word_embeddings else "no"),
            ("context", f"{spec.max_position_embeddings:,} tokens")]


def _estimate_verdict(est: dict) -> tuple[str, str]:
    """(class, sentence) of an estimate's verdict, worded as ``memtune estimate`` words it."""
    if est["verdict"] == Verdict.FITS:
        return "ok", f"fits with {fmt_gib(est['headroom_bytes'])} to spare"
    if est["verdict"] == Verdict.BORDERLINE:
        return "warn", (f"borderline: {est['verdict_reason']} "
                        f"(`memtune validate --emulate-gpu {est['gpu']}`)")
    return "bad", f"does not fit: {fmt_gib(-est['headroom_bytes'])} over"


def _breakdown_section(est: dict) -> dict:
    frame = data.breakdown_frame(est)
    peak = est["peak_phase"]
    headers = ["category"] + [data.category_name(p.value) + (" (peak)" if p.value == peak else "") for p in Phase]
    rows = [[data.category_name(idx)] + [_g(v) for v in row] for idx, row in frame.iterrows()]
    table = Table(headers=headers, rows=rows, numeric={1, 2, 3},
                  row_classes=["total" if idx == "allocated" else "" for idx in frame.index],
                  caption="Peak memory per GPU (GiB), by category at each phase's peak")
    usable = est["device_usable_bytes"] - est["margin_bytes"]
    pool = est["gpu_reserved_bytes"] if est.get("gpu_reserved_bytes") is not None else est["peak_reserved_bytes"]
    squeezed = (f" (the allocator releases its cache under pressure: {fmt_gib(est['peak_reserved_bytes'])} without "
                f"a limit)" if pool != est["peak_reserved_bytes"] else "")
    sentence = (f"peak allocated {fmt_gib(est['peak_allocated_bytes'])} ({data.category_name(peak)}) + allocator "
                f"cache {fmt_gib(pool - est['peak_allocated_bytes'])} = reserved {fmt_gib(pool)}{squeezed}; + CUDA "
                f"context/NCCL {fmt_gib(est['runtime_overhead_bytes'])} = {fmt_gib(est['required_bytes'])} needed of "
                f"{fmt_gib(usable)} usable ({fmt_gib(est['device_usable_bytes'])} minus a "
                f"{fmt_gib(est['margin_bytes'])} margin)")
    cls, verdict = _estimate_verdict(est)
    return {"table": table, "sentence": sentence, "verdict": verdict, "verdict_class": cls,
            "calibration": est.get("calibration")}


def _plan_section(sources: data.Sources) -> dict | None:
    result = sources.plan_result
    if not result:
        return None
    frame = data.candidates_frame(result)
    chosen_rows = frame[frame["chosen"]]
    chosen = chosen_rows.iloc[0] if len(chosen_rows) else None
    out: dict = {"chosen_label": chosen["label"] if chosen is not None else None,
                 "chosen_summary": plan_summary(result.get("chosen")) if result.get("chosen") else None}
    if chosen is not None:
        out["why"] = (f"the fewest GPU-seconds per trained token among the plans that fit (about "
                      f"{_rate(chosen['tokens_per_s'])} tokens/s per GPU)")
    miss = result.get("closest_miss")
    out["closest_miss"] = ({"label": miss["label"], "reason": miss["reason"]} if miss else None)
    ref = result.get("llama_cookbook_default")
    out["reference"] = ({"label": ref["label"], "summary": plan_summary(ref.get("plan")), "reason": ref["reason"],
                         "verdict_class": verdict_class(ref.get("verdict", ""))} if ref else None)
    d = result.get("data")
    if d:
        eff = (f", padding keeps {100 * d['padding_efficiency']:.1f} % real tokens"
               if d.get("padding_efficiency") is not None else "")
        out["data_line"] = (f"{d.get('samples', 0):,} samples, {d.get('tokens', 0):,} tokens; length p50 "
                            f"{d.get('p50')}, p99 {d.get('p99')}, max {d.get('max')}{eff}")
        out["data_source"] = d.get("source")
    else:
        out["data_line"] = out["data_source"] = None
    by = frame["method"].astype(bool).any()
    rows, classes = [], []
    for _, c in frame.iterrows():
        rows.append([("> " if c["chosen"] else "") + c["display"], c["split"], _g(c["required_bytes"]),
                     _g(c["headroom_bytes"]), _rate(c["tokens_per_s"]), c["verdict"]]
                    + ([c["method"] or "-"] if by else []) + [c["reason"]])
        classes.append("chosen" if c["chosen"] else "")
    out["table"] = Table(headers=["candidate", "batch x acc", "needs (GiB)", "headroom (GiB)", "est. tokens/s",
                                  "verdict"] + (["by"] if by else []) + ["reason"],
                         rows=rows, numeric={1, 2, 3, 4}, row_classes=classes, verdict_column=5)
    estimated = frame[frame["required_bytes"].notna()]
    count = f"{len(frame)} candidates: {len(estimated)} estimated"
    if by:
        count += f" ({(estimated['method'] == 'traced').sum()} traced, the rest screened in closed form)"
    cannot = len(frame) - len(estimated)
    out["count"] = count + f", {int(estimated['fits'].sum())} fit" + (f", {cannot} cannot run" if cannot else "")
    shown = data.charted_candidates(frame)
    out["chart"] = out["chart_note"] = None
    out["chart_subset"] = (f"the {len(shown)} cheapest of the {len(estimated)} estimated candidates"
                           if len(shown) < len(estimated) else None)
    if len(shown):
        components, note = data.candidate_components(result, shown)
        device = sources.estimate["device_usable_bytes"] if sources.estimate else None
        gpu = data.resolve_gpu(sources.gpu)
        device = device or (gpu.memory_bytes if gpu else None)
        chosen_display = chosen["display"] if chosen is not None else None
        out["chart"] = figures.candidates_chart(components, usable_bytes=_usable(result), device_bytes=device,
                                                chosen=chosen_display,
                                                title=f"{sources.model} on {sources.gpu}: memory per GPU")
        out["chart_note"] = note
    return out


def _usable(result: dict) -> int:
    """Usable memory less the margin, which every estimated candidate's needs + headroom add up to."""
    for c in result["candidates"]:
        if c.get("required_bytes") is not None and c.get("headroom_bytes") is not None:
            return c["required_bytes"] + c["headroom_bytes"]
    return 0


def _validation_section(record: dict | None) -> dict | None:
    if not record:
        return None
    out: dict = {"mode": record["mode"], "device": record.get("device_name", ""), "verdict": record["verdict"],
                 "agrees": record["agrees"], "notes": record.get("notes") or [],
                 "summary": plan_summary(record["plan"]), "phases": None, "categories": None, "chart": None,
                 "speed": None, "traced": None, "oom": None,
                 "cap": fmt_gib(record["memory_cap_bytes"]) if record.get("memory_cap_bytes") else None}
    if record["mode"] == "dry-run":
        rank = record["ranks"][0]
        out["traced"] = Table(headers=["phase", "traced peak (GiB)"], numeric={1},
                              rows=[[data.category_name(p), _g(v)] for p, v in rank.get("traced_phases", {}).items()])
        return out
    if record.get("oom"):
        high = record.get("measured_peak_reserved_bytes")
        est = data.normalized_estimate(record["estimate"])
        out["oom"] = (f"out of memory on {record['gpu']}"
                      + (f" at {fmt_gib(high)} reserved" if high is not None else "")
                      + f"; the estimate needed {fmt_gib(est['required_bytes'])} ({est['verdict']})")
        return out
    phases = data.validation_phases_frame(record)
    cats = data.validation_categories_frame(record)
    out["phases"] = Table(headers=["", "estimated (GiB)", "measured (GiB)", "error"], numeric={1, 2, 3},
                          rows=[[r.what, _g(r.estimated), _g(r.measured), _pct(r.error)] for r in phases.itertuples()],
                          caption="Peak allocated per phase, and peak reserved (largest rank)")
    if cats is not None and len(cats):
        out["categories"] = Table(
            headers=["phase", "category", "estimated (GiB)", "measured (GiB)"], numeric={2, 3},
            rows=[[data.category_name(r.phase), data.category_name(r.category), _g(r.estimated), _g(r.measured)]
                  for r in cats.itertuples()],
            caption="By category at the start of each phase (rank 0); 'everything else' is the rest of the phase's "
                    "peak: activations, logits, temporaries, workspaces")
    out["chart"] = figures.validation_chart(phases, cats)
    r0 = record["ranks"][0]
    if r0.get("step_time_s"):
        out["speed"] = (f"{r0['step_time_s'] * 1000:.0f} ms/step, {r0['tokens_per_s']:,.0f} tokens/s per rank; "
                        f"{r0.get('num_alloc_retries', 0)} allocator retries")
    return out


def _timeline_section(sources: data.Sources) -> dict | None:
    t = data.timeline(sources)
    if t is None:
        return None
    return {"chart": figures.timeline_chart(t), "notes": list(t.notes), "source": t.source,
            "peak_allocated": fmt_gib(t.frame["allocated"].max()), "peak_reserved": fmt_gib(t.frame["reserved"].max())}


def _when(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float)):
        return dt.datetime.fromtimestamp(value, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    try:
        when = dt.datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    if when.tzinfo is None:
        return when.strftime("%Y-%m-%d %H:%M:%S")
    return when.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _run_section(sources: data.Sources) -> dict | None:
    run = sources.run
    if not run:
        return None
    train, evals = data.metrics_frames(sources.metrics)
    est = run.get("estimate") or {}
    pool = (est["device_usable_bytes"] - est["runtime_overhead_bytes"] - est["margin_bytes"]) if est else None
    out: dict = {"status": str(run.get("status", "-")), "started": _when(run.get("started")),
                 "finished": _when(run.get("finished")), "device": str(run.get("device", "-")),
                 "world_size": run.get("world_size", "-"), "summary": plan_summary(run.get("plan")),
                 "curves": None, "facts": [], "memory_note": None}
    tried = data.plans_tried_frame(run)
    out["tried"] = Table(headers=["plan", "outcome", "at step"], numeric={2}, rows=[
        [plan_line(t.plan), str(t.outcome), "-" if t.at_step is None or pd.isna(t.at_step) else str(int(t.at_step))]
        for t in tried.itertuples()]) if len(tried) else None
    out["fallbacks"] = [plan_line(f) for f in run.get("fallbacks") or []]
    if len(train):
        last = train.iloc[-1]
        facts = [("steps", f"{int(last['step']):,}"), ("last loss", f"{last['loss']:.4f}")]
        if len(evals):
            facts.append(("last eval loss", f"{evals.iloc[-1]['eval_loss']:.4f}"))
        if train["tokens_per_s"].notna().any():
            facts.append(("median tokens/s per GPU", _rate(train["tokens_per_s"].median())))
        if train["tokens"].notna().any():
            facts.append(("tokens trained", f"{int(train['tokens'].max()):,}"))
        if train["peak_allocated_bytes"].notna().any():
            facts.append(("highest peak allocated", fmt_gib(train["peak_allocated_bytes"].max())
                          + (f" (estimated {fmt_gib(est['peak_allocated_bytes'])})" if est else "")))
            facts.append(("highest peak reserved", fmt_gib(train["peak_reserved_bytes"].max())
                          + (f" (estimated {fmt_gib(est['peak_reserved_bytes'])})" if est else "")))
        else:
            out["memory_note"] = "no GPU memory was measured (the run was not on a CUDA device)"
        out["facts"] = facts
        out["curves"] = figures.run_curves(train, evals, usable_pool_bytes=pool,
                                           estimated_peak_bytes=est.get("peak_allocated_bytes"))
    return out


def _shell(cmd) -> str:
    if isinstance(cmd, (list, tuple)):
        return " ".join(c if "$" in str(c) else shlex.quote(str(c)) for c in cmd)
    return str(cmd)


def validate_command(model: str, gpu: str, plan: dict, *, mode: str = "emulated", steps: int | None = None,
                     tolerance: float | None = None) -> str:
    """The ``memtune validate`` line that checks ``plan`` (every plan knob the command line has)."""
    from memtune.plan import Plan

    p, default = data.plan_of(plan), Plan()
    if p is None:
        return "-"
    cmd = ["memtune", "validate", "--model", model]
    cmd += {"emulated": ["--emulate-gpu", gpu], "dry-run": ["--gpu", gpu, "--dry-run"]}.get(mode, ["--gpu", gpu])
    cmd += ["--precision", p.precision]
    for name in ("num_gpus", "nodes", "sharding", "checkpointing", "peft", "quantization", "optimizer", "attention",
                 "grad_accum"):
        if getattr(p, name) != getattr(default, name):
            cmd += [f"--{name.replace('_', '-')}", str(getattr(p, name))]
    if p.peft == "lora":
        for name in ("lora_rank", "lora_dropout"):
            if getattr(p, name) != getattr(default, name):
                cmd += [f"--{name.replace('_', '-')}", str(getattr(p, name))]
        if p.lora_targets != default.lora_targets:
            cmd += ["--lora-targets", ",".join(p.lora_targets)]
    for name in ("offload", "expandable_segments"):
        if getattr(p, name):
            cmd.append(f"--{name.replace('_', '-')}")
    cmd += ["--batch-size", str(p.batch_size), "--seq-len", str(p.seq_len)]
    if steps and steps != 5:
        cmd += ["--steps", str(steps)]
    if tolerance is not None and tolerance != 0.03:
        cmd += ["--tolerance", f"{tolerance:g}"]
    return _shell(cmd)


def plan_file_text(model: str, gpu: str, plan: dict) -> str:
    """The plan file (``memtune plan --out``) for the plan: ``validate --plan-file`` and ``check`` read it."""
    from memtune.planfile import toml_value

    p = data.plan_of(plan)
    items = p.to_dict().items() if p is not None else plan.items()
    return "\n".join([f"model = {toml_value(model)}", f"gpu = {toml_value(gpu)}", "", "[plan]",
                      *(f"{k} = {toml_value(v)}" for k, v in items)]) + "\n"


def _reproduce(sources: data.Sources) -> list[dict]:
    plan, model, gpu = sources.plan, sources.model_path, sources.gpu
    items = []
    if sources.run and sources.run.get("command"):
        items.append({"title": "The run's command", "text": _shell(sources.run["command"]), "lang": "shell"})
    if sources.run and isinstance(sources.run.get("run"), dict):
        items.append({"title": "The run's settings (run.json)", "text": json.dumps(sources.run["run"], indent=2),
                      "lang": "json"})
    if plan is None:
        return items
    record = sources.validation or {}
    steps = (record.get("ranks") or [{}])[0].get("steps")
    mode = record.get("mode") or "emulated"
    items.append({"title": "Check the plan on a GPU with memtune validate (--emulate-gpu caps a larger one to it)",
                  "text": validate_command(model, gpu, plan, mode=mode, steps=steps,
                                           tolerance=record.get("tolerance")), "lang": "shell"})
    items.append({"title": "Plan file, for memtune validate --plan-file plan.toml and memtune check plan.toml",
                  "text": plan_file_text(model, gpu, plan), "lang": "toml"})
    items.extend(e.to_json() for e in sources.exports)
    return items


def build_context(sources: data.Sources) -> dict:
    """Everything the template shows, computed from the records (``memtune.reporting.annotate`` fills in the estimated
    timeline and the exports a record lacks)."""
    figures.new_page()
    est = sources.estimate
    kind = sources.kind
    generated = now()
    title = f"{sources.model} on {sources.gpu}: {kind} report"
    ctx = {
        "title": title, "kind": kind, "model": sources.model, "gpu": sources.gpu, "origin": sources.origin,
        "generated": generated.strftime("%Y-%m-%d %H:%M UTC"), "generated_iso": generated.isoformat(),
        "version": __version__, "gpu_facts": _gpu_facts(sources.gpu), "model_facts": _model_facts(sources.model_path),
        "plan_summary": plan_summary(sources.plan) if sources.plan else None,
        "plan_label": plan_label(sources.plan) if sources.plan else None,
        "breakdown": _breakdown_section(est) if est else None,
        "plan": _plan_section(sources),
        "validation": _validation_section(sources.validation),
        "run": _run_section(sources),
        "timeline": _timeline_section(sources),
        "reproduce": _reproduce(sources),
    }
    ctx["headline"] = _headline(sources, ctx)
    return ctx


def _headline(sources: data.Sources, ctx: dict) -> dict:
    """The one-line answer at the top: the run's status, the validation's verdict, or the plan's."""
    if sources.run:
        status = ctx["run"]["status"]
        return {"class": "ok" if status in ("finished", "completed", "done") else "warn" if status == "running"
                else "bad", "text": f"run {status}"}
    if sources.validation:
        v = sources.validation
        return {"class": "ok" if v["agrees"] else "bad", "text": v["verdict"]}
    if ctx["breakdown"] and ctx["plan"] and ctx["plan"]["chosen_label"]:
        return {"class": ctx["breakdown"]["verdict_class"],
                "text": f"chosen: {ctx['plan']['chosen_label']} - {ctx['breakdown']['verdict']}"}
    return {"class": "bad", "text": "no candidate fits: try a shorter --seq-len, a smaller --batch-size or more GPUs"}


def render(sources: data.Sources) -> str:
    """The report page as HTML text."""
    context = build_context(sources)
    return _environment().get_template("report.html.j2").render(**context)


def write(text: str, out: Path | str) -> Path:
    """Write ``text`` to ``out`` (its folder made if needed) in one step: a reader never sees half a page."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    return out


# --- index -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class IndexEntry:
    file: str
    title: str
    kind: str
    model: str
    gpu: str
    date: str


def read_meta(path: Path) -> IndexEntry:
    """The title and the ``memtune:*`` meta tags of a report's head (a page memtune did not write gets its
    title, or its file name, and blanks)."""
    from html.parser import HTMLParser

    class Head(HTMLParser):
        def __init__(self):
            super().__init__()
            self.meta: dict[str, str] = {}
            self.title, self._in_title, self.done = "", False, False

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "meta" and (a.get("name") or "").startswith("memtune:"):
                self.meta[a["name"].removeprefix("memtune:")] = a.get("content") or ""
            self._in_title = tag == "title"

        def handle_endtag(self, tag):
            self._in_title = False
            self.done = self.done or tag == "head"

        def handle_data(self, text):
            if self._in_title:
                self.title += text

    parser = Head()
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            parser.feed(line)
            if parser.done:
                break
    m = parser.meta
    return IndexEntry(file=path.name, title=parser.title.strip() or path.name, kind=m.get("kind", ""),
                      model=m.get("model", ""), gpu=m.get("gpu", ""), date=m.get("date", ""))


def _short_date(iso: str) -> str:
    """'2026-11-28T18:02:48+00:00' -> '2026-11-28 18:02 UTC' (anything else as it is)."""
    try:
        return dt.datetime.fromisoformat(iso).astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        return iso


def render_index(folder: Path) -> str:
    entries = [read_meta(p) for p in sorted(folder.glob("*.html")) if p.name != "index.html"]
    entries.sort(key=lambda e: (e.date, e.file), reverse=True)
    entries = [dataclasses.replace(e, date=_short_date(e.date)) for e in entries]
    # Dated by its newest report, not by when it was written: the same reports give the same index.
    newest = entries[0].date if entries and entries[0].date else "no reports"
    return _environment().get_template("index.html.j2").render(
        title=f"memtune reports in {folder.resolve().name}", entries=[dataclasses.asdict(e) for e in entries],
        newest=newest, version=__version__)



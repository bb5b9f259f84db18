"""Reports of plans, validations and runs: read the records, complete them with what memtune computes but the
report only draws - the plan's estimated memory timeline and its exports to other tools (``memtune.records``) -
and render them (``memtune.report``, which never estimates). The commands that write reports call these."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from memtune.errors import ConfigError
from memtune.records import EstimatedTimeline


def write_report(source: Path | str, out: Path | str) -> Path:
    """Write the report of ``source`` - a run folder (run.json, metrics.jsonl, and plan.json/validation.json when
    present), a folder holding plan.json and/or validation.json, a plan result JSON or a validation JSON - to
    ``out``.

    Raises:
        ConfigError: ``source`` is missing or is none of these.
    """
    from memtune.report import data

    return _render(data.load_sources(source), out)


def plan_report(result_json: dict, out: Path | str) -> Path:
    """Write the report of a plan result (``PlanResult.to_json()``) to ``out``."""
    from memtune.report import data

    if not data.is_plan_result(result_json):
        raise ConfigError("not a plan result: expected the object `memtune plan --json` prints")
    return _render(data.Sources(origin="memtune plan", plan_result=result_json), out)


def validation_report(record_json: dict, out: Path | str) -> Path:
    """Write the report of a validation record (``ValidationRecord.to_json()``) to ``out``; a CUDA memory snapshot
    the record names is drawn as the memory timeline."""
    from memtune.report import data

    if not data.is_validation(record_json):
        raise ConfigError("not a validation record: expected the object `memtune validate --json` prints")
    return _render(data.Sources(origin="memtune validate", validation=record_json), out)


def _render(sources, out: Path | str) -> Path:
    from memtune.report import html

    annotate(sources)
    return html.write(html.render(sources), out)


def annotate(sources) -> None:
    """Fill ``sources.exports`` and, unless a CUDA snapshot will be drawn instead, ``sources.estimated_timeline``
    for the report's plan: the timeline a record of that plan carries, else computed here; the timeline is left
    out where the model or the GPU cannot be resolved on this machine."""
    from memtune.report import data

    plan = data.plan_of(sources.plan)
    if plan is None:
        return
    # what a record carries is for its own plan (a run's plan may be a fallback of the validated one)
    sources.estimated_timeline = next(
        (EstimatedTimeline.from_json(r["estimated_timeline"]) for r in (sources.run, sources.validation,
                                                                        sources.plan_result)
         if r and r.get("estimated_timeline")
         and (r.get("plan") if isinstance(r.get("plan"), dict) else r.get("chosen")) == sources.plan), None)
    spec = data.resolve_model(sources.model_path)
    from memtune.planner.export import plan_exports

    sources.exports = plan_exports((spec.hub_id if spec else None) or sources.model_path, plan)
    gpu = data.resolve_gpu(sources.gpu)
    if sources.estimated_timeline is None and spec is not None and gpu is not None and not sources.has_snapshot:
        from memtune.estimate.timeline import estimated_timeline

        sources.estimated_timeline = estimated_timeline(spec, plan, gpu)


# --- `memtune report` ---------------------------------------------------------------------------------------

def default_output(source: Path) -> Path:
    """Where a report goes without ``-o``: ``report.html`` in a folder, or the record's name with ``.html``."""
    return source / "report.html" if source.is_dir() else source.with_suffix(".html")


def report(
    source: Annotated[str | None, typer.Argument(help="A run folder (run.json, metrics.jsonl...), a plan result "
                                                      "(`memtune plan --json`) or a validation.json.")] = None,
    *,
    out: Annotated[str | None, typer.Option("--out", "-o", help="The HTML file to write (default: report.html in the "
                                                                "folder, or the record's name with .html).")] = None,
    index: Annotated[str | None, typer.Option(help="Write FOLDER/index.html listing the reports in FOLDER.")] = None,
) -> None:
    """Write a self-contained HTML report of a plan, a validation or a run; --index lists a folder's reports."""
    from rich.console import Console
    from rich.markup import escape

    from memtune.report import write_index

    if source is None and index is None:
        raise ConfigError("pass a run folder or record to report on, or --index FOLDER")
    console = Console()
    if source is not None:
        written = write_report(source, out or default_output(Path(source)))
        console.print(f"report written to {escape(str(written))}", highlight=False)
    if index is not None:
        written = write_index(index)
        console.print(f"index written to {escape(str(written))}", highlight=False)

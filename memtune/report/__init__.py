"""HTML reports: one self-contained page per plan, validation or run, and an index of the reports in a folder.

    write_report("runs/lg-l4", "reports/lg-l4.html")   # a run folder, a plan result or a validation record
    plan_report(result.to_json(), "plan.html")          # what `memtune plan --report` writes
    validation_report(record.to_json(), "val.html")     # what `memtune validate --report` writes
    write_index("reports")                              # reports/index.html

The page shows the GPU and the model; the chosen plan and why; each candidate's memory by category against the
GPU's usable memory; estimate vs measured after a validation; the memory timeline (measured from a CUDA snapshot,
else estimated from memtune's trace); a run's loss, throughput and memory curves; and the commands and exported
configs that reproduce it. ``memtune.report.data`` reads the records into pandas tables,
``memtune.report.figures`` draws them with matplotlib as inline SVG, ``memtune.report.html`` lays them out.
"""

from __future__ import annotations

from pathlib import Path

from memtune.errors import ConfigError

__all__ = ["plan_report", "validation_report", "write_index", "write_report"]


def write_report(source: Path | str, out: Path | str) -> Path:
    """Write the report of ``source`` - a run folder (run.json, metrics.jsonl, and plan.json/validation.json when
    present), a folder holding plan.json and/or validation.json, a plan result JSON or a validation JSON - to
    ``out``.

    Raises:
        ConfigError: ``source`` is missing or is none of these.
    """
    from memtune.report import data, html

    return html.write(html.render(data.load_sources(source)), out)


def plan_report(result_json: dict, out: Path | str) -> Path:
    """Write the report of a plan result (``PlanResult.to_json()``) to ``out``."""
    from memtune.report import data, html

    if not data.is_plan_result(result_json):
        raise ConfigError("not a plan result: expected the object `memtune plan --json` prints")
    return html.write(html.render(data.Sources(origin="memtune plan", plan_result=result_json)), out)


def validation_report(record_json: dict, out: Path | str) -> Path:
    """Write the report of a validation record (``ValidationRecord.to_json()``) to ``out``; a CUDA memory snapshot
    the record names is drawn as the memory timeline."""
    from memtune.report import data, html

    if not data.is_validation(record_json):
        raise ConfigError("not a validation record: expected the object `memtune validate --json` prints")
    return html.write(html.render(data.Sources(origin="memtune validate", validation=record_json)), out)


def write_index(folder: Path | str) -> Path:
    """Write ``folder/index.html``, listing the reports (``*.html``) in ``folder``: title, kind, model, GPU, date.

    Raises:
        ConfigError: ``folder`` is not a folder.
    """
    from memtune.report import html

    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"no such folder: {folder}")
    return html.write(html.render_index(folder), folder / "index.html")

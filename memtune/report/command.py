"""``memtune report``: rebuild a report from a run folder or a record, and index the reports of a folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from memtune.errors import ConfigError


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

    from memtune.report import write_index, write_report

    if source is None and index is None:
        raise ConfigError("pass a run folder or record to report on, or --index FOLDER")
    console = Console()
    if source is not None:
        written = write_report(source, out or default_output(Path(source)))
        console.print(f"report written to {escape(str(written))}", highlight=False)
    if index is not None:
        written = write_index(index)
        console.print(f"index written to {escape(str(written))}", highlight=False)

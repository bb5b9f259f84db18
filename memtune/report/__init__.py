"""HTML reports: one self-contained page per plan, validation or run, and an index of the reports in a folder.

    html.write(html.render(data.load_sources("runs/lg-l4")), "lg-l4.html")   # a run folder or a record
    write_index("reports")                                                   # reports/index.html

``memtune.reporting`` makes reports (reading the records, completing them with the estimated timeline and the
exports they lack, rendering); this package only reads and draws, and never estimates.

The page shows the GPU and the model; the chosen plan and why; each candidate's memory by category against the
GPU's usable memory; estimate vs measured after a validation; the memory timeline (measured from a CUDA snapshot,
else estimated from memtune's trace); a run's loss, throughput and memory curves; and the commands and exported
configs that reproduce it. ``memtune.report.data`` reads the records into pandas tables,
``memtune.report.figures`` draws them with matplotlib as inline SVG, ``memtune.report.html`` lays them out.
"""

from __future__ import annotations

from pathlib import Path

from memtune.errors import ConfigError

__all__ = ["write_index"]


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

"""Figures of a report: matplotlib charts rendered to SVG text that is inlined in the HTML.

Text in the figures is written as SVG ``<text>`` (``svg.fonttype = none``): matplotlib escapes it (a model named
``<script>`` is drawn as text, never markup), the page stays small, and the browser draws it with a local font.
Each SVG's element ids get a prefix of their own, so several figures can share one page.
"""

from __future__ import annotations

import io
import itertools
import re

import matplotlib

matplotlib.use("Agg")  # no display: figures are only ever written to SVG

import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend
import pandas as pd  # noqa: E402
from markupsafe import Markup  # noqa: E402

from memtune.estimate.categories import MemCategory  # noqa: E402
from memtune.report.data import Timeline, category_name  # noqa: E402
from memtune.units import GiB  # noqa: E402

STYLE = {
    "svg.fonttype": "none",
    "svg.hashsalt": "memtune",  # stable ids: the same report twice is the same file
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Arial", "Helvetica", "Liberation Sans"],
    "font.size": 10,
    "legend.fontsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.color": "#dddddd",
    "grid.linewidth": 0.6,
    "legend.frameon": False,
}

COLORS = {
    MemCategory.PARAMETERS.value: "#4e79a7",
    MemCategory.GRADIENTS.value: "#f28e2b",
    MemCategory.OPTIMIZER_STATES.value: "#e15759",
    MemCategory.ACTIVATIONS.value: "#76b7b2",
    MemCategory.LOGITS.value: "#59a14f",
    MemCategory.TEMPORARIES.value: "#edc948",
    MemCategory.FSDP_BUFFERS.value: "#b07aa1",
    MemCategory.WORKSPACE.value: "#9c755f",
    MemCategory.ALLOCATOR_CACHE.value: "#bab0ac",
    MemCategory.RUNTIME.value: "#555555",
    "pool": "#8cb5d9",
}
ESTIMATED, MEASURED, LIMIT = "#4e79a7", "#f28e2b", "#c0392b"
WIDTH_IN = 10.0

_ids = itertools.count(1)


def new_page() -> None:
    """Number the figures of the next page from 1 again (the same report is then the same file)."""
    global _ids
    _ids = itertools.count(1)


def to_svg(fig) -> Markup:
    """The figure as an inline ``<svg>`` element (no XML prolog, no metadata), its ids made unique on the page."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None, "Format": None,
                                                                  "Type": None})
    plt.close(fig)
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"\s*<metadata>.*?</metadata>", "", svg, flags=re.S)
    svg = re.sub(r"\s*<style type=\"text/css\">.*?</style>", "", svg, flags=re.S)  # would style the whole page
    prefix = f"f{next(_ids)}-"
    svg = re.sub(r'\bid="([^"]+)"', rf'id="{prefix}\1"', svg)
    svg = re.sub(r"url\(#([^)]+)\)", rf"url(#{prefix}\1)", svg)
    svg = re.sub(r'xlink:href="#([^"]+)"', rf'xlink:href="#{prefix}\1"', svg)
    svg = svg.replace("<svg ", '<svg role="img" ', 1)
    return Markup(svg)  # noqa: S704 - matplotlib escapes every text it writes into the SVG


def plain(text: str) -> str:
    """Text from a record, drawn as it is: a ``$`` would otherwise start matplotlib's math mode."""
    return str(text).replace("$", r"\$")


def _gib(values) -> list[float]:
    return [v / GiB for v in values]


def candidates_chart(components: pd.DataFrame, *, usable_bytes: int, device_bytes: int | None,
                     chosen: str | None, title: str) -> Markup:
    """Horizontal stacked bars: each candidate's memory by category, against the GPU's usable memory."""
    labels = list(components.index)
    height = 1.2 + 0.42 * len(labels)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(WIDTH_IN, height))
        left = pd.Series(0.0, index=components.index)
        for cat in components.columns:
            values = components[cat] / GiB
            if not values.any():
                continue
            name = "PyTorch pool (not split)" if cat == "pool" else category_name(cat)
            ax.barh([plain(x) for x in labels], values, left=left, color=COLORS.get(cat, "#999999"), label=name,
                    height=0.62, edgecolor="white", linewidth=0.4)
            left += values
        ax.axvline(usable_bytes / GiB, color=LIMIT, linewidth=1.4, label=f"usable ({usable_bytes / GiB:.2f} GiB)")
        if device_bytes:
            ax.axvline(device_bytes / GiB, color=LIMIT, linewidth=0.9, linestyle=":",
                       label=f"GPU memory ({device_bytes / GiB:.2f} GiB)")
        ax.invert_yaxis()
        ax.grid(axis="y", visible=False)
        ax.set_xlabel("GiB per GPU")
        ax.set_title(plain(title), loc="left")
        for tick in ax.get_yticklabels():
            if chosen is not None and tick.get_text() == plain(chosen):
                tick.set_fontweight("bold")
        axes_height = height * (plt.rcParams["figure.subplot.top"] - plt.rcParams["figure.subplot.bottom"])
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.5 / axes_height), ncol=4)
        return to_svg(fig)


def validation_chart(phases: pd.DataFrame, categories: pd.DataFrame | None) -> Markup:
    """Grouped bars: estimated and measured peak allocated per phase and reserved (left), and the separable
    categories at the optimizer step (right)."""
    with plt.rc_context(STYLE):
        panels = 2 if categories is not None and len(categories) else 1
        fig, axes = plt.subplots(1, panels, figsize=(WIDTH_IN, 2.8), squeeze=False)
        _grouped(axes[0][0], list(phases["what"]), phases["estimated"], phases["measured"], "Peak per phase")
        if panels == 2:
            step = categories[categories["phase"] == "optimizer_step"]
            _grouped(axes[0][1], [category_name(c) for c in step["category"]], step["estimated"], step["measured"],
                     "At the optimizer step, by category")
        axes[0][0].legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncol=2, borderaxespad=0.2)
        fig.tight_layout()
        return to_svg(fig)


def _grouped(ax, labels, estimated, measured, title) -> None:
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], _gib(estimated), width=0.4, color=ESTIMATED, label="estimated")
    ax.bar([x + 0.2 for x in xs], _gib(measured), width=0.4, color=MEASURED, label="measured")
    ax.set_xticks(list(xs), labels, rotation=20, ha="right")
    ax.set_ylabel("GiB per GPU")
    ax.set_title(title, loc="left", pad=22)
    ax.grid(axis="x", visible=False)


def timeline_chart(t: Timeline) -> Markup:
    """Allocated and reserved bytes over the step(s), against what the card leaves PyTorch."""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(WIDTH_IN, 3.0))
        f = t.frame
        ax.fill_between(f["x"], 0, f["allocated"] / GiB, step="post", color=ESTIMATED, alpha=0.35, linewidth=0)
        ax.step(f["x"], f["allocated"] / GiB, where="post", color=ESTIMATED, linewidth=0.9, label="allocated")
        ax.step(f["x"], f["reserved"] / GiB, where="post", color=MEASURED, linewidth=1.1, label="reserved")
        if t.limit_bytes:
            ax.axhline(t.limit_bytes / GiB, color=LIMIT, linewidth=1.2, linestyle="--",
                       label=f"{t.limit_label}: {t.limit_bytes / GiB:.2f} GiB")
        ax.set_xlabel(t.x_label)
        ax.set_ylabel("GiB")
        ax.set_ylim(bottom=0)
        ax.set_xlim(left=0)
        ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncol=3)
        return to_svg(fig)


def run_curves(train: pd.DataFrame, evals: pd.DataFrame, *, usable_pool_bytes: int | None,
               estimated_peak_bytes: int | None) -> Markup:
    """Loss (and eval loss), tokens/s and peak memory per step of a run, one panel each, sharing the step axis."""
    memory = train["peak_allocated_bytes"].notna().any() or train["peak_reserved_bytes"].notna().any()
    panels = 3 if memory else 2
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(panels, 1, figsize=(WIDTH_IN, 2.0 * panels + 0.4), sharex=True)
        ax = axes[0]
        ax.plot(train["step"], train["loss"], color=ESTIMATED, linewidth=1.0, label="training loss")
        if len(evals):
            ax.plot(evals["step"], evals["eval_loss"], color=MEASURED, marker="o", markersize=3, linewidth=1.0,
                    label="eval loss")
        ax.set_ylabel("loss")
        ax.legend(loc="upper right")
        ax = axes[1]
        ax.plot(train["step"], train["tokens_per_s"], color="#59a14f", linewidth=1.0)
        ax.set_ylabel("tokens/s per GPU")
        ax.set_ylim(bottom=0)
        if memory:
            ax = axes[2]
            ax.plot(train["step"], train["peak_allocated_bytes"] / GiB, color=ESTIMATED, linewidth=1.0,
                    label="peak allocated")
            ax.plot(train["step"], train["peak_reserved_bytes"] / GiB, color=MEASURED, linewidth=1.0,
                    label="peak reserved")
            if estimated_peak_bytes:
                ax.axhline(estimated_peak_bytes / GiB, color=ESTIMATED, linestyle=":", linewidth=1.0,
                           label=f"estimated peak allocated ({estimated_peak_bytes / GiB:.2f} GiB)")
            if usable_pool_bytes:
                ax.axhline(usable_pool_bytes / GiB, color=LIMIT, linestyle="--", linewidth=1.2,
                           label=f"left to PyTorch ({usable_pool_bytes / GiB:.2f} GiB)")
            ax.set_ylabel("GiB per GPU")
            ax.set_ylim(bottom=0)
            ax.legend(loc="lower right")
        axes[-1].set_xlabel("step")
        fig.tight_layout()
        return to_svg(fig)

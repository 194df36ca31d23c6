"""What the report's line plots share: a figure as data (panels of series, each point a mean over seeds with
its band), and one drawing of it to a PNG (matplotlib Agg, 120 dpi, as :mod:`bench.heatmap`).

A point's band is min-max over its seeds when it has two, mean ± sample std when it has three or more, and
none for one seed (:data:`BAND_RULE`, said in every figure's caption). The means are the report's own
(:class:`bench.report.Row` summaries): the plots compute no metric of their own.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.heatmap import slug

BAND_RULE = "band: min-max over seeds where a point has 2 seeds, mean ± std where it has 3 or more, none for 1"


@dataclass
class Point:
    """One plotted value: the mean over ``n`` seeds and its band (``lo`` to ``hi``)."""

    x: float
    mean: float
    lo: float
    hi: float
    n: int


@dataclass
class Series:
    """One line: its label, points in x order, and how it is drawn (``linestyle``, ``color`` index)."""

    label: str
    points: list[Point] = field(default_factory=list)
    linestyle: str = "-"
    color: int | None = None

    @property
    def x(self) -> list[float]:
        return [p.x for p in self.points]

    @property
    def means(self) -> list[float]:
        return [p.mean for p in self.points]


@dataclass
class Reference:
    """A horizontal line across a panel (a clean model's BA), with its band."""

    label: str
    point: Point


@dataclass
class Panel:
    """One axes: a y label and its series; ``ylim`` fixes the y range (percentages: 0 to 100)."""

    ylabel: str
    series: list[Series] = field(default_factory=list)
    references: list[Reference] = field(default_factory=list)
    ylim: tuple[float, float] | None = (0.0, 100.0)
    title: str = ""


@dataclass
class Figure:
    """A picture: ``name`` (the file's stem), a title and its panels side by side, sharing the x axis's
    label, scale (``logx``) and tick labels (``xticks``: position -> text, for categorical axes; ``integer_x``:
    whole numbers only, for epochs); at most ``columns`` panels a row."""

    name: str
    title: str
    xlabel: str
    panels: list[Panel] = field(default_factory=list)
    logx: bool = False
    xticks: dict[float, str] | None = None
    integer_x: bool = False
    columns: int = 3


def seed_values(row: Any, metric: str) -> list[float]:
    """The finite per-seed values of ``metric`` behind ``row``'s mean: its ok seeds that have one."""
    return [
        r.values[metric]
        for r in row.runs
        if r.status == "ok" and metric in r.values and not math.isnan(r.values[metric])
    ]


def band(mean: float, std: float, values: list[float]) -> tuple[float, float]:
    """The band of a mean over ``values`` (:data:`BAND_RULE`)."""
    if len(values) == 2:
        return min(values), max(values)
    if len(values) >= 3:
        return mean - std, mean + std
    return mean, mean


def row_point(row: Any, metric: str, x: float, scale: float = 100.0) -> Point | None:
    """``row``'s mean of ``metric`` (its report summary, times ``scale``) at ``x`` with its band, or None when
    no seed has a value."""
    summary = row.summaries[metric]
    if not summary.n:
        return None
    lo, hi = band(summary.mean, summary.std, seed_values(row, metric))
    return Point(x, summary.mean * scale, lo * scale, hi * scale, summary.n)


def values_point(values: list[float], x: float) -> Point | None:
    """The mean of ``values`` (one per seed) at ``x`` with its band, or None without values."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return None
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    lo, hi = band(mean, std, vals)
    return Point(x, mean, lo, hi, len(vals))


def file_name(*parts: str) -> str:
    """A picture's file stem from label parts (``asr-digits-pmoe``); "-" parts (defaults) left out."""
    return "-".join(slug(p) for p in parts if p and p != "-")


def unique_names(figures: Iterable[Figure]) -> list[Figure]:
    """``figures`` with a counter added to a name already taken (two labels that slug alike)."""
    seen: set[str] = set()
    out = []
    for fig in figures:
        name, i = fig.name, 2
        while name in seen:
            name, i = f"{fig.name}-{i}", i + 1
        seen.add(name)
        fig.name = name
        out.append(fig)
    return out


def draw_figure(fig: Figure, folder: Path) -> Path:
    """Draw ``fig`` to ``folder/<name>.png`` (120 dpi; the folder is created): one axes per panel, a line
    with markers and a shaded band per series, dashed references, one legend under the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    cols = max(1, min(fig.columns, len(fig.panels)))
    grid_rows = math.ceil(len(fig.panels) / cols)
    plot, axes = plt.subplots(grid_rows, cols, figsize=(4.2 * cols + 0.6, 3.4 * grid_rows + 0.2), squeeze=False)
    for ax in axes.flat[len(fig.panels) :]:
        ax.set_visible(False)
    handles: dict[str, Any] = {}
    for ax, panel in zip(axes.flat, fig.panels, strict=False):
        for i, series in enumerate(panel.series):
            if not series.points:
                continue
            color = colors[(i if series.color is None else series.color) % len(colors)]
            (line,) = ax.plot(
                series.x,
                series.means,
                marker="o",
                markersize=3.5,
                linestyle=series.linestyle,
                color=color,
                label=series.label,
            )
            ax.fill_between(
                series.x,
                [p.lo for p in series.points],
                [p.hi for p in series.points],
                color=color,
                alpha=0.18,
                linewidth=0,
            )
            handles.setdefault(series.label, line)
        for ref in panel.references:
            line = ax.axhline(ref.point.mean, color="0.35", linestyle="--", linewidth=1, label=ref.label)
            if ref.point.hi > ref.point.lo:
                ax.axhspan(ref.point.lo, ref.point.hi, color="0.5", alpha=0.12, linewidth=0)
            handles.setdefault(ref.label, line)
        if fig.logx:
            ax.set_xscale("log")
        if fig.xticks is not None:
            ax.set_xticks(list(fig.xticks), list(fig.xticks.values()))
        elif fig.logx:
            xs = sorted({x for s in panel.series for x in s.x})
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
            ax.minorticks_off()
        if fig.integer_x:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if panel.ylim is not None:
            ax.set_ylim(panel.ylim[0] - 2, panel.ylim[1] + 2)
        ax.set_xlabel(fig.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.set_title(panel.title, fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    plot.suptitle(fig.title, fontsize=9)
    if handles:
        plot.legend(
            list(handles.values()),
            list(handles),
            loc="lower center",
            fontsize=7,
            frameon=False,
            ncol=min(3, len(handles)),
            bbox_to_anchor=(0.5, -0.02 - 0.045 * math.ceil(len(handles) / 3)),
        )
    plot.tight_layout()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{fig.name}.png"
    plot.savefig(path, format="png", dpi=120, bbox_inches="tight")
    plt.close(plot)
    return path

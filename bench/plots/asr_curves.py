"""ASR and BA against the poison rate: one picture per data set x model (x training setting) with at least two
poison rates, one line per attack (trigger and application, as the report's tables name it), a band over
seeds, the clean model's BA as a dashed reference; a logarithmic x axis when the rates span more than a
decade. Drawn from the report's fp32 rows without a defense (the numbers of its main tables).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.plots.base import (
    BAND_RULE,
    Figure,
    Panel,
    Reference,
    Series,
    draw_figure,
    file_name,
    row_point,
    unique_names,
)

#: Rates spanning more than this ratio (highest / lowest) get a logarithmic x axis.
LOG_SPAN = 10.0


def asr_figures(rows: Iterable[Any]) -> list[Figure]:
    """One figure per (data set, model, training setting) whose attacked rows have two or more poison rates:
    an ASR panel and a BA panel, one series per attack (x: poison rate in %, y: the row's mean in %)."""
    groups: dict[tuple[str, str, str], list[Any]] = defaultdict(list)
    for r in rows:
        if r.quant == "fp32" and r.defense == "-":
            groups[(r.dataset, r.model, r.train)].append(r)
    figures = []
    for (dataset, model, train), members in groups.items():
        attacked = [r for r in members if r.attack != "clean" and r.poison_rate is not None]
        rates = sorted({r.poison_rate for r in attacked})
        if len(rates) < 2:
            continue
        by_attack: dict[str, list[Any]] = defaultdict(list)
        for r in attacked:
            by_attack[r.attack].append(r)
        panels = [Panel("ASR (%)", title="attack success rate"), Panel("BA (%)", title="clean accuracy")]
        for attack, lines in by_attack.items():
            lines.sort(key=lambda r: r.poison_rate)
            for panel, metric in zip(panels, ("asr", "ba"), strict=True):
                points = [row_point(r, metric, r.poison_rate * 100) for r in lines]
                panel.series.append(Series(attack, [p for p in points if p is not None]))
        clean = next((r for r in members if r.attack == "clean"), None)
        point = row_point(clean, "ba", 0.0) if clean is not None else None
        if point is not None:
            panels[1].references.append(Reference("clean model BA", point))
        title = f"ASR and BA vs poison rate: {dataset}, {model}" + (f", {train}" if train != "-" else "")
        figures.append(
            Figure(
                file_name("asr", dataset, model, train),
                f"{title}\n({BAND_RULE})",
                "poison rate (%)",
                panels,
                logx=rates[-1] > LOG_SPAN * rates[0] > 0,
            )
        )
    return unique_names(figures)


def draw_asr_curves(rows: Iterable[Any], folder: Path) -> list[Path]:
    """The PNGs of :func:`asr_figures` (``asr-<dataset>-<model>[-<train>].png``)."""
    return [draw_figure(fig, folder) for fig in asr_figures(rows)]

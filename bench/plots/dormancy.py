"""The dormancy picture: BA and ASR of an attacked model at fp32 and after PTQ at each bit-width, one line per
quantization scope / variant (line style per integer back-end, where the scenario has several) and per
defense stage, a band over seeds. A quantization-conditioned (qcb) backdoor shows as a low ASR at fp32 that
rises at the bit-width it was conditioned on. One picture per data set x model (x training setting) x attack
x poison rate, drawn from the rows of the report's Dormancy table, when the scenario has a quantization axis.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.plots.base import BAND_RULE, Figure, Panel, Series, draw_figure, file_name, row_point, unique_names
from bench.report import _bits, _bits_order, _pct, _variant

LINESTYLES = ("-", "--", ":", "-.")


def dormancy_figures(rows: Iterable[Any]) -> list[Figure]:
    """One figure per (data set, model, training setting, attack, poison rate): a BA and an ASR panel over the
    bit-widths (x: position in ``fp32, int16, ..., int2`` order), a series per (defense stage, scope/variant)
    starting from the same model's fp32 point. Nothing when every row is fp32."""
    rows = list(rows)
    if all(r.quant == "fp32" for r in rows):
        return []
    bits = sorted({_bits(r.quant) for r in rows}, key=_bits_order)
    position = {b: float(i) for i, b in enumerate(bits)}
    cells: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if r.attack != "clean":
            cells[(r.dataset, r.model, r.train, r.attack, r.poison_rate)][r.defense][r.quant] = r
    variants = sorted({_variant(r.quant) for r in rows if r.quant != "fp32"})
    scopes = list(dict.fromkeys(v.split("@", 1)[0] for v in variants))
    backends = list(dict.fromkeys(v.split("@", 1)[1] if "@" in v else "fake" for v in variants))
    figures = []
    for (dataset, model, train, attack, rate), by_defense in cells.items():
        show_defense = len(by_defense) > 1 or "-" not in by_defense
        panels = [Panel("BA (%)", title="clean accuracy"), Panel("ASR (%)", title="attack success rate")]
        for d, (defense, by_quant) in enumerate(by_defense.items()):
            for variant in sorted({_variant(q) for q in by_quant if q != "fp32"}):
                scope, _, backend = variant.partition("@")
                label = variant + (f" · {defense}" if show_defense else "")
                for panel, metric in zip(panels, ("ba", "asr"), strict=True):
                    points = []
                    for b in bits:
                        row = by_quant.get("fp32" if b == "fp32" else f"{b}/{variant}")
                        point = row_point(row, metric, position[b]) if row is not None else None
                        if point is not None:
                            points.append(point)
                    color = scopes.index(scope) + len(scopes) * d
                    style = LINESTYLES[backends.index(backend or "fake") % len(LINESTYLES)]
                    panel.series.append(Series(label, points, linestyle=style, color=color))
        if not any(s.points for p in panels for s in p.series):
            continue
        what = f"{attack} at {_pct(rate)}" + (f", {train}" if train != "-" else "")
        figures.append(
            Figure(
                file_name("dormancy", dataset, model, train, attack, _pct(rate)),
                f"Dormancy: {dataset}, {model}, {what}\n({BAND_RULE})",
                "weights' bit-width (PTQ)",
                panels,
                xticks={position[b]: b for b in bits},
            )
        )
    return unique_names(figures)


def draw_dormancy(rows: Iterable[Any], folder: Path) -> list[Path]:
    """The PNGs of :func:`dormancy_figures` (``dormancy-<dataset>-<model>[-<train>]-<attack>-<rate>.png``)."""
    return [draw_figure(fig, folder) for fig in dormancy_figures(rows)]

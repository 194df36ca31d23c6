"""Training curves: the mean training loss of every epoch, as each train job stored it (``epoch_losses`` in its
metrics, :func:`bench.train.fit`), one line per trained model (attack x poison rate, the clean model too), a
band over seeds. One picture per data set x model (x training setting), one panel per attack (trigger and
application) with a line per poison rate; the clean model's curve is dashed in every panel.

The models are those of the report's fp32 rows without a defense (each trained model once); the curves are
the stored losses of their train jobs (:attr:`bench.report.SeedRun.train_job`), read as stored.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.plots.base import BAND_RULE, Figure, Panel, Series, draw_figure, file_name, unique_names, values_point
from bench.report import OK, _pct, job_outcome
from bench.store import Store


def trained_rows(rows: Iterable[Any]) -> list[Any]:
    """The rows that stand for one trained model each: fp32, no defense."""
    return [r for r in rows if r.quant == "fp32" and r.defense == "-"]


def train_losses(store: Store, rows: Iterable[Any]) -> dict[str, list[float]]:
    """The stored per-epoch losses of the train jobs behind ``rows`` (:func:`trained_rows`), by job id; train
    jobs that failed, were not applicable or stored no losses are left out."""
    ids = sorted({r.train_job for row in trained_rows(rows) for r in row.runs if r.train_job})
    out = {}
    for job, record in store.records(ids).items():
        losses = record.metrics.get("epoch_losses")
        if job_outcome(record)[0] == OK and isinstance(losses, list) and losses:
            out[job] = [float(v) for v in losses]
    return out


def curve(row: Any, losses: dict[str, list[float]]) -> list[Any]:
    """``row``'s points: per epoch (1-based), the mean loss over its seeds whose train job stored that epoch."""
    per_seed = [losses[r.train_job] for r in row.runs if r.train_job in losses]
    epochs = max((len(v) for v in per_seed), default=0)
    points = [values_point([v[e] for v in per_seed if len(v) > e], float(e + 1)) for e in range(epochs)]
    return [p for p in points if p is not None]


def training_figures(rows: Iterable[Any], losses: dict[str, list[float]]) -> list[Figure]:
    """One figure per (data set, model, training setting) with stored losses: a panel per attack, a series per
    poison rate (x: epoch, y: mean loss), the clean model's series (dashed) in each panel."""
    groups: dict[tuple[str, str, str], list[Any]] = defaultdict(list)
    for r in trained_rows(rows):
        groups[(r.dataset, r.model, r.train)].append(r)
    figures = []
    for (dataset, model, train), members in groups.items():
        clean = [
            Series("clean model", curve(r, losses), linestyle="--", color=7) for r in members if r.attack == "clean"
        ]
        clean = [s for s in clean if s.points][:1]
        by_attack: dict[str, list[Any]] = defaultdict(list)
        for r in members:
            if r.attack != "clean":
                by_attack[r.attack].append(r)
        panels = []
        for attack, lines in by_attack.items():
            lines.sort(key=lambda r: r.poison_rate or 0.0)
            series = [
                Series(f"poison rate {_pct(r.poison_rate)}", curve(r, losses), color=i) for i, r in enumerate(lines)
            ]
            if any(s.points for s in series):
                panels.append(Panel("training loss (epoch mean)", [*series, *clean], ylim=None, title=attack))
        if not panels and clean:
            panels.append(Panel("training loss (epoch mean)", clean, ylim=None, title="clean"))
        if not panels:
            continue
        title = f"Training loss: {dataset}, {model}" + (f", {train}" if train != "-" else "")
        figures.append(
            Figure(
                file_name("training", dataset, model, train), f"{title}\n({BAND_RULE})", "epoch", panels, integer_x=True
            )
        )
    return unique_names(figures)


def draw_training_curves(rows: Iterable[Any], losses: dict[str, list[float]], folder: Path) -> list[Path]:
    """The PNGs of :func:`training_figures` (``training-<dataset>-<model>[-<train>].png``)."""
    return [draw_figure(fig, folder) for fig in training_figures(rows, losses)]

"""The attack x defense picture: mean DER per attacked model and defense stage, one heatmap per data set x model.

DER (BackdoorBench) = [max(0, ASR drop) - max(0, BA drop) + 1] / 2 against the same model before the
defense: 1 removes the backdoor at no accuracy cost, 0.5 changes nothing. Lines are attacks (with their
poison rate and training setting where those vary), columns defense stages; cells show the mean DER over
the seeds that have it (fp32 evaluation), grey where a defense is n/a or failed. Defenses applied to clean
models (``defend_clean``) have no backdoor to remove and no DER, so they are not drawn.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.heatmap import Heatmap, draw_heatmap, slug


def _line(row: Any, show_rate: bool, show_train: bool, full: bool = False) -> str:
    label = row.attack if full else row.attack.split(" (", 1)[0]
    if show_rate and row.poison_rate is not None:
        label += f" @{row.poison_rate * 100:g}%"
    return label + (f" [{row.train}]" if show_train else "")


def der_grid(rows: Iterable[Any]) -> dict[tuple[str, str], tuple[list[str], list[str], dict[tuple[str, str], Any]]]:
    """Per (data set, model): line labels, defense-stage columns and the row behind each cell."""
    defended = [r for r in rows if r.defense != "-" and r.quant == "fp32" and r.attack != "clean"]
    groups: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for r in defended:
        groups[(r.dataset, r.model)].append(r)
    out = {}
    for key, members in groups.items():
        show_rate = len({m.poison_rate for m in members}) > 1
        show_train = len({m.train for m in members}) > 1
        # the short name ("badnets") unless two attacks share it (image and badpatches): then the full one
        short: dict[str, set[str]] = defaultdict(set)
        for m in members:
            short[_line(m, show_rate, show_train)].add(m.attack)

        def line(
            m: Any, show_rate: bool = show_rate, show_train: bool = show_train, short: dict[str, set[str]] = short
        ) -> str:
            name = _line(m, show_rate, show_train)
            return name if len(short[name]) == 1 else _line(m, show_rate, show_train, full=True)

        cells = {(line(m), m.defense): m for m in members}
        lines = list(dict.fromkeys(line(m) for m in members))
        columns = list(dict.fromkeys(m.defense for m in members))
        out[key] = (lines, columns, cells)
    return out


def draw_der(rows: Iterable[Any], folder: Path) -> list[Path]:
    """One PNG per data set x model with a defended attacked model (``der-<dataset>-<model>.png``)."""
    written = []
    for (dataset, model), (lines, columns, cells) in der_grid(rows).items():
        grid = [[cells.get((line, column)) for column in columns] for line in lines]
        spec = Heatmap(
            values=[[row.der.mean if row is not None and row.der.n else None for row in line] for line in grid],
            texts=[["" if row is None else f"{row.der.mean:.2f}" if row.der.n else
                    {"n/a": "n/a", "failed": "failed"}.get(row.status, "-") for row in line] for line in grid],
            lines=lines, columns=columns, xlabel="defense / stage", colorbar="mean DER", cmap="RdYlGn",
            title=f"DER (1 = backdoor removed at no BA cost, 0.5 = no effect): {dataset}, {model}",
        )
        written.append(draw_heatmap(spec, folder / f"der-{slug(dataset)}-{slug(model)}.png"))
    return written

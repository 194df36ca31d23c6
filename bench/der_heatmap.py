"""The attack x defense picture: mean DER per attacked model and defense stage, one heatmap per data set x model.

DER (BackdoorBench) = [max(0, ASR drop) - max(0, BA drop) + 1] / 2 against the same model before the
defense: 1 removes the backdoor at no accuracy cost, 0.5 changes nothing. Lines are attacks (with their
poison rate and training setting where those vary), columns defense stages; cells show the mean DER over
the seeds that have it (fp32 evaluation), grey where a defense is n/a or failed. Defenses applied to clean
models (``defend_clean``) have no backdoor to remove and no DER, so they are not drawn.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def _line(row: Any, show_rate: bool, show_train: bool) -> str:
    label = row.attack.split(" (", 1)[0]
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
        cells = {(_line(m, show_rate, show_train), m.defense): m for m in members}
        lines = list(dict.fromkeys(_line(m, show_rate, show_train) for m in members))
        columns = list(dict.fromkeys(m.defense for m in members))
        out[key] = (lines, columns, cells)
    return out


def draw_der(rows: Iterable[Any], folder: Path) -> list[Path]:
    """One PNG per data set x model with a defended attacked model (``der-<dataset>-<model>.png``)."""
    grids = der_grid(rows)
    if not grids:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for (dataset, model), (lines, columns, cells) in grids.items():
        values = np.full((len(lines), len(columns)), np.nan)
        texts = [["" for _ in columns] for _ in lines]
        for i, line in enumerate(lines):
            for j, column in enumerate(columns):
                row = cells.get((line, column))
                if row is None:
                    continue
                if row.der.n:
                    values[i, j] = row.der.mean
                    texts[i][j] = f"{row.der.mean:.2f}"
                else:
                    texts[i][j] = {"n/a": "n/a", "failed": "failed"}.get(row.status, "-")
        fig, ax = plt.subplots(figsize=(1.4 + 0.75 * len(columns), 1.2 + 0.45 * len(lines)))
        image = ax.imshow(np.ma.masked_invalid(values), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.set_facecolor("#dddddd")
        for i in range(len(lines)):
            for j in range(len(columns)):
                ax.text(j, i, texts[i][j], ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(columns)), columns, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(lines)), lines, fontsize=7)
        ax.set_xlabel("defense / stage")
        ax.set_title(f"DER (1 = backdoor removed at no BA cost, 0.5 = no effect): {dataset}, {model}", fontsize=8)
        fig.colorbar(image, ax=ax, label="mean DER")
        path = folder / f"der-{_slug(dataset)}-{_slug(model)}.png"
        fig.savefig(path, format="png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"

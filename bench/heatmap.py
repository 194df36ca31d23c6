"""One annotated heatmap PNG: the drawing the report's pictures (transfer matrix, DER) share."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Heatmap:
    """What to draw: ``values`` [lines][columns] (None = no value, drawn grey), a text per cell, labels."""

    values: list[list[float | None]]
    texts: list[list[str]]
    lines: list[str]
    columns: list[str]
    title: str
    xlabel: str
    ylabel: str = ""
    colorbar: str = ""
    cmap: str = "Reds"
    vmin: float = 0.0
    vmax: float = 1.0
    white_above: float | None = None  # cell text in white above this value (dark colours)


def slug(text: str) -> str:
    """``text`` as a file-name part."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def draw_heatmap(spec: Heatmap, path: Path) -> Path:
    """Draw ``spec`` to ``path`` (PNG, 120 dpi); the folder is created."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.array([[np.nan if v is None else v for v in line] for line in spec.values], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.85 * len(spec.columns), 1.2 + 0.5 * len(spec.lines)))
    image = ax.imshow(np.ma.masked_invalid(values), cmap=spec.cmap, vmin=spec.vmin, vmax=spec.vmax, aspect="auto")
    ax.set_facecolor("#dddddd")  # cells without a value: n/a, failed, pending
    for i, line in enumerate(spec.texts):
        for j, text in enumerate(line):
            dark = spec.white_above is not None and np.nan_to_num(values[i, j]) > spec.white_above
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
    ax.set_xticks(range(len(spec.columns)), spec.columns, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(spec.lines)), spec.lines, fontsize=7)
    ax.set_xlabel(spec.xlabel)
    ax.set_ylabel(spec.ylabel)
    ax.set_title(spec.title, fontsize=8)
    fig.colorbar(image, ax=ax, label=spec.colorbar)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path

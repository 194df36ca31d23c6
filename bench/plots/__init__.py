"""Line plots of a report, each drawn from the rows the report already holds (no metric computed twice):

* :mod:`bench.plots.asr_curves`: ASR and BA against the poison rate, per attack;
* :mod:`bench.plots.dormancy`: BA and ASR against the bit-width, per quantization scope / back-end;
* :mod:`bench.plots.training_curves`: the stored per-epoch training loss of every trained model.

:func:`draw_plots` draws them all into one folder; :func:`bench.report.report_blocks` places each kind in its
section (the markdown report links the PNGs, the HTML page embeds them).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.store import Store

#: The kinds of plot, as :func:`draw_plots` keys them and :func:`bench.report.report_blocks` reads them.
KINDS = ("asr", "dormancy", "training")


def draw_plots(rows: Iterable[Any], folder: Path, store: Store) -> dict[str, list[Path]]:
    """Every plot of ``rows`` (a store's report rows) as PNGs in ``folder``, by kind; a kind without data
    has an empty list. The training curves read the train jobs' stored losses from ``store``."""
    from bench.plots.asr_curves import draw_asr_curves
    from bench.plots.dormancy import draw_dormancy
    from bench.plots.training_curves import draw_training_curves, train_losses

    rows = list(rows)
    return {
        "asr": draw_asr_curves(rows, folder),
        "dormancy": draw_dormancy(rows, folder),
        "training": draw_training_curves(rows, train_losses(store, rows), folder),
    }

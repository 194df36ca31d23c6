"""The transfer matrix of quantization-conditioned backdoors: where does a dormant backdoor wake?

A qcb attack (``objective: {name: qcb, ...}``) is trained against one quantizer: a bit-width, scope,
granularity and symmetry of the fake quantizer, or a stand-in for a deploy back-end's own quantizer. A
user deploys it with whatever tool-chain they have. The matrix puts one line per attacked model (rows:
the quantizer the attack was trained against; plain poisoning is a line "none" beside it, for contrast)
and one column per evaluated quantization config and back-end; a cell holds ASR and, beside it, BA
(percent, mean over the seeds the cell has). It is drawn as a heatmap of ASR per data set x model too.

Quantization labels come from :class:`bench.quant.QuantConfig`: ``int<B>/<scope>[/channel][/sym][/act]``
for the fake quantizer and the same followed by ``@<backend>`` for an integer back-end.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import document as doc
from bench.heatmap import Heatmap, draw_heatmap, slug

#: Column of a model without an objective (plain data poisoning): it was trained against no quantizer.
PLAIN = "none (plain poisoning)"


def backend_of(label: str) -> str:
    """The back-end of a quantization label: ``fake`` unless the label ends in ``@<backend>``."""
    return label.rsplit("@", 1)[1] if "@" in label else "fake"


def _bits_of(label: str) -> int:
    match = re.match(r"int(\d+)", label)
    return int(match.group(1)) if match else 32


def column_order(label: str) -> tuple[int, str, int, str]:
    """fp32 first, then the fake quantizer, then each back-end; within one, wider bit-widths first."""
    if label == "fp32":
        return (0, "", 0, "")
    backend = backend_of(label)
    return (1 if backend == "fake" else 2, backend, -_bits_of(label), label)


def trained_against(attack: dict[str, Any] | None) -> str | None:
    """The quantizer an attack spec was trained against, as a quantization label, :data:`PLAIN` for plain
    poisoning, None for the clean model."""
    if not attack:
        return None
    objective = attack.get("objective")
    if not objective:
        return PLAIN
    parts = [f"int{objective.get('target_bits', 4)}", str(objective.get("scope", "whole"))]
    if objective.get("granularity") == "channel":
        parts.append("channel")
    if objective.get("symmetric"):
        parts.append("sym")
    if objective.get("activations"):
        parts.append("act")
    label = "/".join(parts)
    backend = objective.get("target_backend")
    return f"{label}@{backend}" if backend and backend != "fake" else label


@dataclass
class TransferLine:
    """One attacked model's line: its setting, what it was trained against, and a cell per quant label."""

    dataset: str
    model: str
    train: str
    attack: str
    poison_rate: float | None
    against: str
    cells: dict[str, Any]  # quant label -> Row


def transfer_lines(rows: Iterable[Any]) -> list[TransferLine]:
    """The matrix's lines from report rows (``bench.report.Row``), undefended models only; empty unless
    some attack has a quantization-conditioned objective."""
    rows = [r for r in rows if r.defense == "-" and r.attack != "clean"]
    if not any((r.specs.get("attack") or {}).get("objective") for r in rows):
        return []
    lines: dict[tuple[Any, ...], TransferLine] = {}
    for r in rows:
        key = (r.dataset, r.model, r.train, r.attack, r.poison_rate)
        if key not in lines:
            lines[key] = TransferLine(*key, trained_against(r.specs.get("attack")) or PLAIN, {})
        lines[key].cells[r.quant] = r
    return sorted(lines.values(), key=lambda t: (t.dataset, t.model, t.against != PLAIN, t.against, t.attack,
                                                   t.train, t.poison_rate or 0.0))


def columns(lines: list[TransferLine]) -> list[str]:
    """Every quantization label of the lines, in :func:`column_order`."""
    return sorted({q for line in lines for q in line.cells}, key=column_order)


def cell_text(row: Any) -> str:
    """``ASR (BA)`` in percent over the seeds with a result; ``n/a`` / ``failed`` / ``-`` without one."""
    if row is None:
        return "-"
    if not row.ba.n:
        return {"failed": "failed", "n/a": "n/a"}.get(row.status, "-")
    asr = f"{row.asr.mean * 100:.1f}" if row.asr.n else "-"
    return f"{asr} ({row.ba.mean * 100:.1f})"


def _seeds(line: TransferLine) -> str:
    counts = sorted({r.ba.n for r in line.cells.values() if r.ba.n})
    return "-" if not counts else str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


def transfer_table(rows: Iterable[Any], pictures: list[str] | None = None) -> list[str]:
    """The markdown section: one table per data set x model, lines = attacked models, columns = configs."""
    return doc.markdown_lines(transfer_blocks(rows, pictures))


def transfer_blocks(rows: Iterable[Any], pictures: list[str] | None = None) -> list[doc.Block]:
    """The section as report blocks (:mod:`bench.document`), for the markdown report and the HTML page."""
    lines = transfer_lines(rows)
    if not lines:
        return []
    out = [doc.heading(2, "Transfer matrix"),
           doc.paragraph("Where does a quantization-conditioned backdoor wake? One line per attacked model, by the "
                         f"quantizer its attack was trained against ('{PLAIN}': an ordinary backdoor, for contrast); "
                         "one column per evaluated quantizer: the fake quantizer (Eq. 2) by label, an integer "
                         "back-end as `label@backend`. Cells: ASR (BA), percent, mean over n seeds; n/a: the "
                         "back-end cannot apply that config.")]
    groups: dict[tuple[str, str], list[TransferLine]] = defaultdict(list)
    for line in lines:
        groups[(line.dataset, line.model)].append(line)
    for (dataset, model), members in groups.items():
        cols = columns(members)
        show_train = len({m.train for m in members}) > 1
        show_rate = len({m.poison_rate for m in members}) > 1
        table = []
        for m in members:
            rate = [] if not show_rate else [f"{(m.poison_rate or 0) * 100:g}%"]
            table.append([m.against, m.attack] + ([m.train] if show_train else []) + rate + [_seeds(m)]
                         + [cell_text(m.cells.get(c)) for c in cols])
        headers = (["trained against", "attack"] + (["train"] if show_train else [])
                   + (["poison rate"] if show_rate else []) + ["n", *cols])
        out += [doc.heading(3, f"{dataset}, {model}"), doc.table(table, headers, numparse=True)]
    return out + doc.images(pictures)


def draw_transfer(rows: Iterable[Any], folder: Path) -> list[Path]:
    """One heatmap PNG per data set x model (ASR colour, "ASR / BA" written in each cell) in ``folder``;
    nothing when there is no quantization-conditioned attack."""
    groups: dict[tuple[str, str], list[TransferLine]] = defaultdict(list)
    for line in transfer_lines(rows):
        groups[(line.dataset, line.model)].append(line)
    written = []
    for (dataset, model), members in groups.items():
        cols = columns(members)
        cells = [[m.cells.get(c) for c in cols] for m in members]
        shown = [[row is not None and bool(row.ba.n and row.asr.n) for row in line] for line in cells]
        spec = Heatmap(
            values=[[row.asr.mean * 100 if ok else None for row, ok in zip(line, oks, strict=True)]
                    for line, oks in zip(cells, shown, strict=True)],
            texts=[[f"{row.asr.mean * 100:.0f}\n{row.ba.mean * 100:.0f}" if ok else
                    (cell_text(row) if row is not None else "") for row, ok in zip(line, oks, strict=True)]
                   for line, oks in zip(cells, shown, strict=True)],
            lines=[f"{m.against}\n{m.attack.split(' (', 1)[0]}" for m in members],
            columns=[c.replace("@", "\n@") for c in cols],
            title=f"Transfer matrix: {dataset}, {model}", xlabel="evaluated quantizer (cells: ASR over BA, %)",
            ylabel="trained against", colorbar="ASR (%)", cmap="Reds", vmin=0, vmax=100, white_above=60,
        )
        written.append(draw_heatmap(spec, folder / f"transfer-{slug(dataset)}-{slug(model)}.png"))
    return written

"""The report as data: a list of blocks (headings, paragraphs, tables, pictures, notes) that the markdown
report (:func:`markdown_lines`) and the HTML page (:mod:`bench.report_html`) both render.

Every section of :mod:`bench.report` and :mod:`bench.transfer` builds blocks once; a renderer only lays them
out, so the two formats show the same tables with the same cell texts and compute nothing of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tabulate import tabulate

HEADING, TEXT, TABLE, IMAGE, LINKS, NOTES = "heading", "text", "table", "image", "links", "notes"


@dataclass
class Block:
    """One piece of a report.

    ``kind``: heading (``level``, ``text``), text (a paragraph in markdown syntax: ``**bold**``,
    ```code```), table (``headers``, ``rows`` of cell texts; ``numparse``: the markdown grid aligns
    numeric-looking columns as numbers), image (``text``: the picture's path as the report shows it), links
    (``items``: paths) or notes (``items``: a table's numbered footnotes, ``[1]`` first)."""

    kind: str
    text: str = ""
    level: int = 0
    headers: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    items: list[str] = field(default_factory=list)
    numparse: bool = False


def heading(level: int, text: str) -> Block:
    return Block(HEADING, text=text, level=level)


def paragraph(text: str) -> Block:
    return Block(TEXT, text=text)


def table(rows: list[list[Any]], headers: list[str], numparse: bool = False) -> Block:
    return Block(TABLE, headers=list(headers), rows=[list(r) for r in rows], numparse=numparse)


def images(paths: list[str] | None) -> list[Block]:
    return [Block(IMAGE, text=p) for p in paths or []]


def links(paths: list[str]) -> Block:
    return Block(LINKS, items=list(paths))


def notes(texts: list[str]) -> list[Block]:
    """The footnotes block of a table, nothing when there are none."""
    return [Block(NOTES, items=list(texts))] if texts else []


def md_text(text: str) -> str:
    """Text safe inside a markdown table cell or list item (no pipes, no line breaks)."""
    return " ".join(text.replace("|", "/").split())


def markdown_grid(block: Block) -> str:
    """A github-markdown table; without ``numparse`` its cells print exactly as formatted ("90.0" stays)."""
    return tabulate(block.rows, headers=block.headers, tablefmt="github", disable_numparse=not block.numparse)


def markdown_lines(blocks: list[Block]) -> list[str]:
    """The blocks as markdown lines, each block followed by an empty line."""
    lines: list[str] = []
    for b in blocks:
        if b.kind == HEADING:
            lines.append(f"{'#' * b.level} {b.text}")
        elif b.kind == TEXT:
            lines.append(b.text)
        elif b.kind == TABLE:
            lines.append(markdown_grid(b))
        elif b.kind == IMAGE:
            lines.append(f"![{Path(b.text).stem}]({b.text})")
        elif b.kind == LINKS:
            lines += [f"- [{Path(p).name}]({p})" for p in b.items]
        elif b.kind == NOTES:
            lines += [f"- [{i}] {md_text(t)}" for i, t in enumerate(b.items, start=1)]
        else:
            raise ValueError(f"unknown block kind {b.kind!r}")
        lines.append("")
    return lines

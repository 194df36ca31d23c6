"""The report as one self-contained HTML page: ``bench report RUN [RUN ...] --format html``.

The page is built from the same blocks as the markdown report (:func:`bench.report.report_blocks`, see
:mod:`bench.document`): the same sections, tables and cell texts, nothing computed twice. On top of them it
adds what a browser gives: tables sorted by a click on a header (numbers by value, "mean ± std" cells by
their mean, "-" and empty cells last), the trigger, routing and heatmap pictures embedded as base64 data
URIs, a provenance section (code version and commit of every stored job, the scenario as stored), and over
several runs an index linking each. No network: CSS and JavaScript are inline and the page's
Content-Security-Policy refuses any other source.
"""

from __future__ import annotations

import base64
import html
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench import document as doc
from bench import report as reporting
from bench.der_heatmap import draw_der
from bench.plots import draw_plots
from bench.store import Store
from bench.transfer import draw_transfer

#: Picture types embedded in the page; other files a report links are named, not embedded.
MEDIA_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".svg": "image/svg+xml",
    ".webp": "image/webp",
}
#: Cells that hold no value: they sort last in either direction.
EMPTY_CELLS = ("", "-")

CSS = """
:root { --fg: #1d232a; --muted: #5b6572; --line: #d5dbe1; --head: #eef2f6; --accent: #24578f; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       margin: 0; background: #fff; }
header.page { background: #1f3b5a; color: #fff; padding: 14px 28px; }
header.page h1 { margin: 0; font-size: 20px; }
header.page p { margin: 4px 0 0; color: #c8d6e5; }
nav.toc { padding: 8px 28px; border-bottom: 1px solid var(--line); background: #f8fafc; font-size: 13px; }
nav.toc a { color: var(--accent); margin-right: 14px; text-decoration: none; white-space: nowrap; }
main { padding: 8px 28px 40px; max-width: 1600px; }
section.run { border-top: 3px solid #1f3b5a; margin-top: 24px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin-top: 20px; }
p { max-width: 110ch; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px; }
pre { background: #f4f6f8; padding: 10px; overflow: auto; max-height: 420px; border: 1px solid var(--line); }
.table-wrap { overflow-x: auto; margin: 8px 0 12px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
thead th { background: var(--head); position: sticky; top: 0; }
table.sortable thead th { cursor: pointer; user-select: none; }
table.sortable thead th::after { content: " \\2195"; color: #9aa5b1; font-size: 11px; }
table.sortable thead th[aria-sort="ascending"]::after { content: " \\25B2"; color: var(--accent); }
table.sortable thead th[aria-sort="descending"]::after { content: " \\25BC"; color: var(--accent); }
tbody tr:nth-child(even) { background: #fafbfc; }
tbody tr:hover { background: #eef5ff; }
ol.notes { font-size: 12.5px; color: var(--muted); }
figure { margin: 12px 0; }
figure img { max-width: 100%; border: 1px solid var(--line); }
figcaption { font-size: 12px; color: var(--muted); }
dl.meta { display: grid; grid-template-columns: max-content auto; gap: 2px 16px; }
dl.meta dt { color: var(--muted); } dl.meta dd { margin: 0; }
"""

#: Click a header: sort its table's rows by that column, ascending then descending. Numbers (a leading
#: number: "12.5 ± 0.3 (n=2)" sorts by 12.5, "5%" by 5) before text; text compared with numbers inside by
#: value; "-" and empty cells last either way; ties keep the original order.
JS = """
(function () {
  "use strict";
  var EMPTY = %s;
  var collator = new Intl.Collator(undefined, {numeric: true, sensitivity: "base"});
  var NUMBER = /^[+-]?(?:\\d+\\.?\\d*|\\.\\d+)(?:e[+-]?\\d+)?/i;
  function key(cell) {
    var text = cell.textContent.trim();
    if (EMPTY.indexOf(text) >= 0) return {empty: true};
    var m = text.match(NUMBER);
    return m ? {num: parseFloat(m[0])} : {text: text};
  }
  function compare(a, b) {
    if (a.empty || b.empty) return 0;
    if (a.num !== undefined && b.num !== undefined) return a.num - b.num;
    if (a.num !== undefined) return -1;
    if (b.num !== undefined) return 1;
    return collator.compare(a.text, b.text);
  }
  function sortBy(th) {
    var table = th.closest("table"), body = table.tBodies[0];
    var col = Array.prototype.indexOf.call(th.parentNode.children, th);
    var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
    Array.prototype.forEach.call(th.parentNode.children, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
    var rows = Array.prototype.map.call(body.rows, function (row, i) {
      return {row: row, i: i, key: key(row.cells[col] || row.insertCell())};
    });
    rows.sort(function (a, b) {
      if (a.key.empty !== b.key.empty) return a.key.empty ? 1 : -1;
      return dir * compare(a.key, b.key) || a.i - b.i;
    });
    rows.forEach(function (r) { body.appendChild(r.row); });
  }
  document.querySelectorAll("table.sortable thead th").forEach(function (th) {
    th.title = "sort by this column";
    th.addEventListener("click", function () { sortBy(th); });
  });
})();
""" % ("[" + ", ".join(f'"{e}"' for e in EMPTY_CELLS) + "]")

#: What the page may load: nothing but itself (inline style and script, data: images).
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

_NUMERIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?(%| ±| \(|$)", re.IGNORECASE)


def esc(value: Any) -> str:
    """``value`` as HTML text (quotes escaped too, so it is safe in attributes)."""
    return html.escape(str(value), quote=True)


def inline(text: str) -> str:
    """A paragraph of the report as HTML: escaped, then its markdown ``**bold**`` and ```code```."""
    out = esc(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", out)


def data_uri(path: Path) -> str | None:
    """The picture at ``path`` as a data URI; None for a missing file or a type a page cannot show."""
    media = MEDIA_TYPES.get(path.suffix.lower())
    if media is None or not path.is_file():
        return None
    return f"data:{media};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def anchor(prefix: str, text: str, taken: set[str]) -> str:
    """A unique element id for a heading (letters, digits and dashes only)."""
    base = f"{prefix}-{re.sub(r'[^a-z0-9]+', '-', text.lower()).strip('-') or 'section'}"
    name, i = base, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    taken.add(name)
    return name


def _figure(path: str) -> str:
    uri = data_uri(Path(path))
    name = Path(path).name
    if uri is None:
        return f'<p class="missing">picture not embedded: {esc(name)}</p>'
    return f'<figure><img src="{uri}" alt="{esc(Path(path).stem)}"><figcaption>{esc(name)}</figcaption></figure>'


def table_html(block: doc.Block) -> str:
    """A sortable table: the block's headers and cell texts, escaped, numbers right-aligned."""
    head = "".join(f'<th scope="col">{esc(h)}</th>' for h in block.headers)
    body = []
    for row in block.rows:
        cells = "".join(
            f'<td class="num">{esc(c)}</td>' if _NUMERIC.match(str(c)) else f"<td>{esc(c)}</td>" for c in row
        )
        body.append(f"<tr>{cells}</tr>")
    return (
        f'<div class="table-wrap"><table class="sortable"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def blocks_html(
    blocks: list[doc.Block], prefix: str, toc: list[tuple[str, str]], taken: set[str], shift: int = 0
) -> str:
    """The blocks as HTML; level-2 headings are listed in ``toc`` as (id, title). ``shift`` lowers every
    heading (a run's report inside a page over several runs)."""
    out = []
    for b in blocks:
        if b.kind == doc.HEADING:
            ident = anchor(prefix, b.text, taken)
            level = min(6, b.level + shift)
            if b.level == 2:
                toc.append((ident, b.text))
            out.append(f'<h{level} id="{ident}">{esc(b.text)}</h{level}>')
        elif b.kind == doc.TEXT:
            out.append(f"<p>{inline(b.text)}</p>")
        elif b.kind == doc.TABLE:
            out.append(table_html(b))
        elif b.kind == doc.IMAGE:
            out.append(_figure(b.text))
        elif b.kind == doc.LINKS:
            out += [_figure(p) for p in b.items]
        elif b.kind == doc.NOTES:
            out.append('<ol class="notes">' + "".join(f"<li>{esc(t)}</li>" for t in b.items) + "</ol>")
        else:
            raise ValueError(f"unknown block kind {b.kind!r}")
    return "\n".join(out)


def provenance_blocks(meta: dict[str, Any], scenario: dict[str, Any] | None) -> tuple[list[doc.Block], str]:
    """The provenance section: which code computed the stored jobs (``meta["provenance"]``), which code
    rendered the page, and the scenario as the store holds it (YAML, shown as preformatted text)."""
    blocks = [doc.heading(2, "Provenance")]
    entries = meta.get("provenance") or []
    if entries:
        blocks.append(
            doc.table(
                [[e["version"], e["git_commit"], e["jobs"]] for e in entries],
                ["pmoe-bench version", "git commit", "stored jobs"],
            )
        )
    blocks.append(
        doc.table(
            [
                ["rendered by", f"pmoe-bench {meta.get('version', '?')}"],
                ["rendered at commit", meta.get("git_commit", "unknown")],
                ["device", meta.get("device", "?")],
                ["store", meta.get("store", "?")],
            ],
            ["what", "value"],
        )
    )
    spec = yaml.safe_dump(scenario, sort_keys=False, allow_unicode=True) if scenario else ""
    return blocks, spec


@dataclass
class RunPage:
    """One run's part of the page: its name, its HTML and its table of contents."""

    name: str
    ident: str
    body: str
    toc: list[tuple[str, str]]
    summary: dict[str, Any]


def run_section(store: Store, index: int, taken: set[str], shift: int) -> RunPage:
    """One run's report as HTML: the markdown report's blocks (heatmaps drawn into a temporary folder and
    embedded), then its provenance."""
    from bench import runner

    rows, meta = runner.report_rows(store)
    prefix = f"run{index}"
    with tempfile.TemporaryDirectory(prefix="pmoe-html-") as tmp:
        folder = Path(tmp)
        blocks = reporting.report_blocks(
            rows,
            meta,
            pictures=runner._relative_pictures(store, None),
            routing_pictures=runner._relative_pictures(store, None, "analysis_pictures"),
            transfer_pictures=[str(p) for p in draw_transfer(rows, folder)],
            der_pictures=[str(p) for p in draw_der(rows, folder)],
            plots={k: [str(p) for p in v] for k, v in draw_plots(rows, folder, store).items()},
        )
        if blocks and blocks[0].kind == doc.HEADING and blocks[0].level == 1:
            blocks = blocks[1:]  # the report's title: the page's header (one run) or the run's heading
        toc: list[tuple[str, str]] = []
        body = blocks_html(blocks, prefix, toc, taken, shift)  # pictures are read here, while they exist
    extra, spec = provenance_blocks(meta, store.get_meta("scenario"))
    body += "\n" + blocks_html(extra, prefix, toc, taken, shift)
    if spec:
        body += f"\n<h{3 + shift}>Scenario (as stored)</h{3 + shift}>\n<pre>{esc(spec)}</pre>"
    board = reporting.leaderboard(
        [r for r in rows if r.quant == "fp32" and r.defense == "-"], reporting._required(rows, meta)
    )
    commits = sorted({e["git_commit"] for e in meta.get("provenance") or []})
    summary = {
        "scenario": meta.get("scenario", store.root.name),
        "store": str(store.root),
        "rows": len(rows),
        "jobs": sum(e["jobs"] for e in meta.get("provenance") or []),
        "reached": sum(e["status"] == "reached" for e in board),
        "entries": len(board),
        "commits": ", ".join(c[:12] + ("+dirty" if c.endswith("+dirty") else "") for c in commits) or "-",
    }
    return RunPage(str(meta.get("scenario", store.root.name)), f"{prefix}-top", body, toc, summary)


def render_html(stores: list[Store]) -> str:
    """The page over ``stores``: one run's report as its own page, several runs under an index."""
    if not stores:
        raise ValueError("render_html needs at least one run")
    taken: set[str] = set()
    several = len(stores) > 1
    pages = [run_section(store, i, taken, shift=1 if several else 0) for i, store in enumerate(stores)]
    if several:
        title = f"pmoe-bench: {len(pages)} runs"
        index = doc.table(
            [
                [
                    p.summary["scenario"],
                    p.summary["rows"],
                    p.summary["jobs"],
                    f"{p.summary['reached']} of {p.summary['entries']}",
                    p.summary["commits"],
                    p.summary["store"],
                ]
                for p in pages
            ],
            ["run", "report rows", "stored jobs", "attacks reaching the headline rule", "commits", "store"],
        )
        links = "".join(f'<a href="#{p.ident}">{esc(p.name)}</a>' for p in pages)
        top = (
            f'<header class="page"><h1>{esc(title)}</h1><p>{len(pages)} runs; click a table header to sort.'
            f'</p></header>\n<nav class="toc">{links}</nav>\n<main>\n<h2 id="index">Runs</h2>\n'
            f"{table_html(index)}"
        )
        sections = []
        for p in pages:
            nav = "".join(f'<a href="#{i}">{esc(t)}</a>' for i, t in p.toc)
            sections.append(
                f'<section class="run" id="{p.ident}"><h2>{esc(p.name)}</h2>'
                f'<nav class="toc">{nav}</nav>\n{p.body}</section>'
            )
        content = top + "\n" + "\n".join(sections) + "\n</main>"
    else:
        p = pages[0]
        title = f"pmoe-bench report: {p.name}"
        nav = "".join(f'<a href="#{i}">{esc(t)}</a>' for i, t in p.toc)
        content = (
            f'<header class="page" id="{p.ident}"><h1>{esc(title)}</h1><p>Click a table header to sort.'
            f'</p></header>\n<nav class="toc">{nav}</nav>\n<main>\n{p.body}\n</main>'
        )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<link rel="icon" href="data:,">\n'
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{content}\n"
        f"<script>{JS}</script>\n</body>\n</html>\n"
    )

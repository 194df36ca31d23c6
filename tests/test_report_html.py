"""``bench report --format html``: one self-contained page built from the markdown report's own tables.

Plain-Python tests parse the page (``html.parser``) and compare its tables with the markdown report's; the
browser tests open the page of a tiny real run in headless Chromium (Debian's ``/usr/bin/chromium``,
driven by Playwright) and check that it loads cleanly, shows the leaderboard, sorts on a click and
embeds its pictures.

Without Chromium or Playwright the browser tests fail when the environment variable ``CI`` is set (CI
installs both: a missing browser there is a broken CI, not a reason to skip) and are skipped with the
reason otherwise (a developer's machine without Chromium can still run everything else).
"""

from __future__ import annotations

import html
import os
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from typer.testing import CliRunner

from bench import document as doc
from bench.cli import app
from bench.report_html import blocks_html, render_html
from tests.conftest import run_with_page, tiny_scenario
from tests.test_report import BADNETS, cell, ev, write_store

CHROMIUM = Path(os.environ.get("PMOE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Two seeds (mean ± std cells), two poison rates, a defense (DER heatmap, threat models) and int8 PTQ
#: (dormancy): every kind of section a small run has, in about half a minute on one core.
SCENARIO = tiny_scenario(
    seeds=[0, 1],
    poison_rates=[0.05, 0.2],
    defenses=[{"name": "fine-tuning", "epochs": 1}],
    quantization={"bits": ["fp32", 8]},
)


# -- reading tables back ---------------------------------------------------------------------------------


class Tables(HTMLParser):
    """Every ``<table>`` of a page as (headers, rows) of cell texts, in document order; every ``src``."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: list[tuple[list[str], list[list[str]]]] = []
        self.sources: list[str] = []
        self.hrefs: list[str] = []
        self._cell: list[str] | None = None
        self._row: list[str] | None = None
        self._in_head = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if found.get("src") is not None:
            self.sources.append(found["src"] or "")
        if tag in ("a", "link") and found.get("href") is not None:
            self.hrefs.append(found["href"] or "")
        if tag == "table":
            self.tables.append(([], []))
        elif tag == "thead":
            self._in_head = True
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            headers, rows = self.tables[-1]
            if self._in_head:
                headers.extend(self._row)
            else:
                rows.append(self._row)
            self._row = None
        elif tag == "thead":
            self._in_head = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def html_tables(page: str) -> Tables:
    parser = Tables()
    parser.feed(page)
    return parser


def markdown_tables(markdown: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every github table of a markdown report as (headers, rows) of stripped cell texts."""
    out, block = [], []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif block:
            out.append((block[0], block[2:]))  # block[1]: the |---| line
            block = []
    return out


# -- a tiny real run, its markdown report and its page -----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("html-run")
    cli, run, page = run_with_page(root, SCENARIO)
    md = cli.invoke(app, ["report", str(run), "--out", str(root / "site" / "tiny.md")], catch_exceptions=False)
    assert md.exit_code == 0, md.output
    return {
        "run": run,
        "page": page,
        "html": page.read_text(encoding="utf-8"),
        "markdown": (root / "site" / "tiny.md").read_text(encoding="utf-8"),
    }


def test_the_pages_tables_are_the_markdown_reports_tables(tiny_run):
    md_tables = markdown_tables(tiny_run["markdown"])
    page = html_tables(tiny_run["html"])
    sections = ["## digits · pmoe", "## Leaderboard", "## Defenses", "## Accuracy under quantization", "## Dormancy"]
    for heading in sections:  # the run has every kind of section the issue names
        assert heading in tiny_run["markdown"], heading
        assert f">{heading[3:]}</h2>" in tiny_run["html"], heading
    assert "Threat models" in tiny_run["html"]
    assert len(md_tables) >= 6
    # the page holds the same tables, cell for cell and in the same order; then its provenance tables
    assert page.tables[: len(md_tables)] == md_tables
    numbers = [c for _, rows in md_tables for row in rows for c in row if re.match(r"\d+\.\d ± \d", c)]
    assert numbers, "two seeds give mean ± std cells"
    provenance = page.tables[len(md_tables)]
    assert provenance[0] == ["pmoe-bench version", "git commit", "stored jobs"]
    assert sum(int(row[2]) for row in provenance[1]) > 0
    assert "Scenario (as stored)" in tiny_run["html"] and "fine-tuning" in tiny_run["html"]


def test_the_page_needs_nothing_but_itself(tiny_run):
    page = html_tables(tiny_run["html"])
    assert len(page.sources) >= 2  # the trigger picture and the DER heatmap
    assert all(src.startswith("data:image/png;base64,") for src in page.sources)
    assert all(href.startswith(("#", "data:")) for href in page.hrefs)
    assert "Content-Security-Policy\" content=\"default-src 'none'" in html.unescape(tiny_run["html"])


def test_text_is_escaped_and_several_runs_share_one_indexed_page(tmp_path, tiny_run):
    hostile = "<script>alert(1)</script> & co"
    store = write_store(
        tmp_path / "fake",
        [(cell(0), ev(0.9)), (cell(0, BADNETS, 0.1), ev(0.88, 0.95))],
        scenario={"name": hostile, "seeds": [0]},
    )
    page = render_html([store])
    assert hostile not in page and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in page
    assert blocks_html([doc.paragraph("**a <b>** `c&d`")], "x", [], set()) == (
        "<p><strong>a &lt;b&gt;</strong> <code>c&amp;d</code></p>"
    )

    cli = CliRunner()
    out = tmp_path / "index.html"
    made = cli.invoke(
        app,
        ["report", str(tiny_run["run"]), str(tmp_path / "fake"), "--format", "html", "--out", str(out)],
        catch_exceptions=False,
    )
    assert made.exit_code == 0, made.output
    both = out.read_text(encoding="utf-8")
    index = html_tables(both).tables[0]
    assert index[0][0] == "run" and [row[0] for row in index[1]] == ["tiny", hostile]
    ids = re.findall(r'id="([^"]+)"', both)
    assert len(ids) == len(set(ids)) and {"run0-top", "run1-top"} <= set(ids)
    refused = cli.invoke(app, ["report", str(tiny_run["run"]), str(tmp_path / "fake")])
    assert refused.exit_code == 2 and "only --format html" in refused.output


# -- in a browser ------------------------------------------------------------------------------------------


def _no_browser(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run the browser tests (.ci/run installs Debian's chromium)")
    pytest.skip(f"{reason} (set up: apt-get install chromium; pip install -e '.[test]')")


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        _no_browser(f"no Chromium at {CHROMIUM}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _no_browser("the playwright package is not installed")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, tiny_run):
    """The tiny run's page, opened from its file, with every console error, page error and request kept."""
    tab = browser.new_page(viewport={"width": 1400, "height": 900})
    seen: dict[str, list[str]] = {"errors": [], "failed": [], "requests": []}
    tab.on("console", lambda m: seen["errors"].append(m.text) if m.type == "error" else None)
    tab.on("pageerror", lambda e: seen["errors"].append(str(e)))
    tab.on("requestfailed", lambda r: seen["failed"].append(r.url))
    tab.on("request", lambda r: seen["requests"].append(r.url))
    tab.goto(tiny_run["page"].as_uri(), wait_until="load")
    yield tab, seen
    tab.close()


def column(tab: Any, table: Any, header: str) -> list[str]:
    """The texts of one column of ``table`` (a locator), top to bottom as shown."""
    headers = [h.strip() for h in table.locator("thead th").all_inner_texts()]
    index = headers.index(header) + 1
    return [t.strip() for t in table.locator(f"tbody tr td:nth-child({index})").all_inner_texts()]


def test_the_page_loads_without_errors_or_requests(page):
    tab, seen = page
    assert seen["errors"] == [] and seen["failed"] == []
    assert all(url.startswith(("file:", "data:")) for url in seen["requests"]), seen["requests"]
    images = tab.locator("img")
    assert images.count() >= 2
    for i in range(images.count()):
        src, width = images.nth(i).evaluate("img => [img.getAttribute('src'), img.naturalWidth]")
        assert src.startswith("data:image/png;base64,") and width > 100  # embedded and decoded


def test_a_screenshot_shows_the_leaderboard(page, tmp_path):
    tab, _ = page
    board = tab.locator("#run0-leaderboard ~ .table-wrap table").first
    board.scroll_into_view_if_needed()
    assert board.is_visible()
    assert column(tab, board, "attack") == ["badnets"]
    shot = tmp_path / "leaderboard.png"
    board.screenshot(path=str(shot))
    tab.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    with Image.open(shot) as image:
        assert image.width > 300 and image.height > 30
        colours = image.convert("L").getextrema()
        assert colours[1] - colours[0] > 100  # text on a background, not a blank box


def _leading(text: str) -> float:
    return float(re.match(r"[+-]?\d+(\.\d+)?", text).group(0))  # type: ignore[union-attr]


def test_clicking_a_header_sorts_the_rows_numbers_by_value(page):
    tab, _ = page
    table = tab.locator("#run0-digits-pmoe ~ .table-wrap table").first
    before = column(tab, table, "ASR")
    assert len(before) == 3 and any("±" in c for c in before)  # clean, 5%, 20%; mean ± std over 2 seeds
    asr = table.locator("thead th", has_text=re.compile("^ASR$"))
    asr.click()
    ascending = column(tab, table, "ASR")
    assert sorted(ascending) == sorted(before)
    shown = [c for c in ascending if c not in ("-", "")]
    assert [_leading(c) for c in shown] == sorted(_leading(c) for c in shown)  # by the mean, as numbers
    assert ascending[len(shown) :] == ["-"] * (len(ascending) - len(shown))  # no value: last
    assert asr.get_attribute("aria-sort") == "ascending"
    asr.click()
    descending = column(tab, table, "ASR")
    shown = [c for c in descending if c not in ("-", "")]
    assert [_leading(c) for c in shown] == sorted((_leading(c) for c in shown), reverse=True)
    # whole rows move: the attack and rate cells follow their ASR
    rows = {tuple(r.split("\t")[:3]) for r in table.locator("tbody tr").all_inner_texts()}
    table.locator("thead th", has_text="poison rate").click()
    assert {tuple(r.split("\t")[:3]) for r in table.locator("tbody tr").all_inner_texts()} == rows
    rates = column(tab, table, "poison rate")
    assert rates == ["5%", "20%", "-"]  # 5 before 20 (numbers, not text), the clean row's "-" last

"""The report's line plots (bench/plots): ASR and BA vs poison rate, the dormancy picture, training curves.

One tiny real run (two seeds, two poison rates a decade apart, BadNets on the image and as BadPatches, PTQ at
int4 in two scopes, two epochs) is made once for the module; its markdown report must link every PNG and its
HTML page embed them, and every plotted number must be the report's own: the ASR / BA means are the main
tables' cells, the dormancy means the Dormancy table's, the loss curves the train jobs' stored losses.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bench import runner
from bench.plots.asr_curves import asr_figures
from bench.plots.base import band, values_point
from bench.plots.dormancy import dormancy_figures
from bench.plots.training_curves import train_losses, training_figures
from bench.store import open_existing
from tests.conftest import run_with_page, tiny_scenario
from tests.test_report import cells_of, section

SCENARIO = tiny_scenario(
    seeds=[0, 1],
    train={"epochs": 2, "batch_size": 32, "lr": 0.05},
    attacks=[
        {"name": "badnets", "size": 2, "position": "top-left", "target": 0, "apply": {"grid": ["image", "badpatches"]}}
    ],
    poison_rates=[0.02, 0.25],
    quantization={"bits": ["fp32", 4], "scopes": ["whole", "experts"]},
)
ATTACKS = ("badnets (apply=badpatches)", "badnets (apply=image)")
PNGS = ["asr-digits-pmoe.png", "training-digits-pmoe.png"] + [
    f"dormancy-digits-pmoe-badnets-apply-{apply}-{rate}.png"
    for apply in ("image", "badpatches")
    for rate in ("2", "25")
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("plots-run")
    cli, run, page = run_with_page(root, SCENARIO)
    store = open_existing(run)
    rows, _ = runner.report_rows(store)
    return {
        "store": store,
        "rows": rows,
        "report": root / "reports" / "tiny.md",
        "markdown": (root / "reports" / "tiny.md").read_text(encoding="utf-8"),
        "html": page.read_text(encoding="utf-8"),
    }


def _check_png(data: bytes, where: str) -> None:
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG", where
    width, height = image.size
    assert 500 <= width <= 4000 and 300 <= height <= 3000, (where, image.size)
    colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 20, f"{where}: looks blank"


# -- the pictures: written, linked from the markdown, embedded in the page ------------------------------------


def test_every_plot_is_a_png_linked_from_its_section(tiny_run):
    folder = tiny_run["report"].parent / "tiny"
    markdown = tiny_run["markdown"]
    drawn = sorted(p.name for p in folder.glob("*.png") if p.name.startswith(("asr-", "dormancy-", "training-")))
    assert drawn == sorted(PNGS)
    for name in PNGS:
        _check_png((folder / name).read_bytes(), name)
        link = f"![{Path(name).stem}](tiny/{name})"
        assert markdown.count(link) == 1, link
    # each kind in its own section, after the tables it draws
    assert section(markdown, "## ASR and BA vs poison rate").index("](tiny/asr-") < section(
        markdown, "## ASR and BA vs poison rate"
    ).index("\n## ")
    assert "## Leaderboard" in markdown.split("## ASR and BA vs poison rate")[0]
    dormancy = section(markdown, "## Dormancy").split("\n## ")[0]
    assert dormancy.count("](tiny/dormancy-") == 4
    assert "min-max over the seeds where a point has 2" in dormancy
    assert section(markdown, "## Training curves").split("\n## ")[0].count("](tiny/training-") == 1


def test_the_page_embeds_every_plot(tiny_run):
    embedded = dict(
        (alt, src)
        for src, alt in re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="([^"]+)">', tiny_run["html"])
    )
    for name in PNGS:
        stem = Path(name).stem
        assert stem in embedded, stem
        _check_png(base64.b64decode(embedded[stem]), stem)
    assert ">ASR and BA vs poison rate</h2>" in tiny_run["html"] and ">Training curves</h2>" in tiny_run["html"]


# -- the numbers: the report's own -----------------------------------------------------------------------------


def _markdown_cell(markdown: str, attack: str, rate: str, column: str) -> str:
    """The cell of ``column`` on the main table's line of ``attack`` at ``rate``."""
    lines = head_table(markdown)
    headers = cells_of(lines[0])
    found = [cells_of(line) for line in lines[2:] if cells_of(line)[:2] == [attack, rate]]
    assert len(found) == 1, (attack, rate)
    return found[0][headers.index(column)]


def head_table(markdown: str) -> list[str]:
    table = section(markdown, "## digits · pmoe").split("\n\n")[1]
    return table.splitlines()


def test_asr_curves_are_the_main_tables_numbers(tiny_run):
    store, rows, markdown = tiny_run["store"], tiny_run["rows"], tiny_run["markdown"]
    (fig,) = asr_figures(rows)
    assert fig.name == "asr-digits-pmoe" and fig.logx  # 2% to 25%: more than a decade
    asr, ba = fig.panels
    assert [s.label for s in asr.series] == list(ATTACKS) == [s.label for s in ba.series]
    for panel, column, metric in ((asr, "ASR", "asr"), (ba, "BA", "ba")):
        for series in panel.series:
            assert series.x == [2.0, 25.0]
            for point in series.points:
                cell = _markdown_cell(markdown, series.label, f"{point.x:g}%", column)
                assert cell.startswith(f"{point.mean:.1f} ± "), (series.label, point, cell)
                assert cell.endswith("(n=2)") and point.n == 2
                # the band over two seeds is their min and max, read here from the stored evaluations
                row = next(
                    r
                    for r in rows
                    if r.attack == series.label
                    and r.poison_rate * 100 == point.x
                    and r.quant == "fp32"
                    and r.defense == "-"
                )
                stored = [store.get(r.eval_job).metrics[metric] * 100 for r in row.runs]
                assert len(stored) == 2
                assert point.lo == pytest.approx(min(stored)) and point.hi == pytest.approx(max(stored))
    (clean,) = ba.references
    clean_line = next(line for line in head_table(markdown) if line.startswith("| clean"))
    assert cells_of(clean_line)[cells_of(head_table(markdown)[0]).index("BA")].startswith(f"{clean.point.mean:.1f} ± ")
    # rates within a decade: a linear axis
    narrowed = [dataclasses.replace(r, poison_rate=0.1) if r.poison_rate == 0.25 else r for r in rows]
    assert not asr_figures(narrowed)[0].logx
    # one poison rate: no picture
    assert asr_figures([r for r in rows if r.poison_rate != 0.25]) == []


def test_dormancy_lines_are_the_dormancy_tables_cells(tiny_run):
    rows, markdown = tiny_run["rows"], tiny_run["markdown"]
    figures = dormancy_figures(rows)
    assert sorted(f"{f.name}.png" for f in figures) == sorted(p for p in PNGS if p.startswith("dormancy-"))
    table = section(markdown, "## Dormancy").split("\n\n")[2].splitlines()
    headers = cells_of(table[0])
    lines = [cells_of(line) for line in table[2:]]
    checked = 0
    for fig in figures:
        assert fig.xticks == {0.0: "fp32", 1.0: "int4"}
        ba, asr = fig.panels
        assert [s.label for s in ba.series] == ["experts", "whole"] == [s.label for s in asr.series]
        attack, rate = next(
            (a, r)
            for a in ATTACKS
            for r in ("2%", "25%")
            if fig.name.endswith(f"{a.split('=')[1].rstrip(')')}-{r.rstrip('%')}")
        )
        for b_series, a_series in zip(ba.series, asr.series, strict=True):
            (line,) = [
                x
                for x in lines
                if x[headers.index("attack")] == attack
                and x[headers.index("poison rate")] == rate
                and x[headers.index("scope/variant")] == b_series.label
            ]
            for b_point, a_point in zip(b_series.points, a_series.points, strict=True):
                cell = line[headers.index(fig.xticks[b_point.x])]
                assert cell == f"{b_point.mean:.1f} / {a_point.mean:.1f}", (fig.name, cell)
                checked += 1
    assert checked == 4 * 2 * 2  # 4 models x 2 scopes x (fp32, int4)
    assert dormancy_figures([r for r in rows if r.quant == "fp32"]) == []


def test_training_curves_are_the_stored_losses(tiny_run):
    store, rows = tiny_run["store"], tiny_run["rows"]
    # the expected curves, straight from the plan's cells and the train jobs' records
    expected: dict[tuple[str, str], list[list[float]]] = {}
    for c in store.get_meta("cells"):
        if (c.get("quant") or {}).get("label", "fp32") != "fp32" or c.get("defense"):
            continue
        key = ("clean", "-") if c["attack"] is None else (c["attack"]["apply"], f"{c['poison_rate'] * 100:g}%")
        expected.setdefault(key, []).append(store.get(c["train_job"]).metrics["epoch_losses"])
    assert len(expected) == 5 and all(len(v) == 2 and len(v[0]) == 2 for v in expected.values())
    (fig,) = training_figures(rows, train_losses(store, rows))
    assert fig.name == "training-digits-pmoe" and [p.title for p in fig.panels] == list(ATTACKS)
    seen = set()
    for panel in fig.panels:
        apply = panel.title.split("=")[1].rstrip(")")
        for series in panel.series:
            key = ("clean", "-") if series.label == "clean model" else (apply, series.label.split()[-1])
            seen.add(key)
            runs = expected[key]
            assert series.x == [1.0, 2.0]
            for epoch, point in enumerate(series.points):
                per_seed = [losses[epoch] for losses in runs]
                assert point.mean == pytest.approx(sum(per_seed) / 2)
                assert (point.lo, point.hi) == pytest.approx((min(per_seed), max(per_seed)))
    assert seen == set(expected)


def test_the_band_is_min_max_for_two_seeds_and_std_from_three():
    assert band(0.5, 0.1, [0.4, 0.7]) == (0.4, 0.7)
    # three or more values: mean +- std, not their min and max (values chosen so that the two differ)
    assert band(0.5, 0.1, [0.2, 0.5, 0.8]) == pytest.approx((0.4, 0.6))
    assert band(0.5, 0.0, [0.5]) == (0.5, 0.5)
    point = values_point([1.0, 2.0, 6.0, float("nan")], 4.0)
    assert (point.x, point.mean, point.n) == (4.0, 3.0, 3)
    # the sample std of 1, 2, 6 is sqrt(7) (the population std, sqrt(14/3), and min-max, (1, 6), differ)
    assert (point.lo, point.hi) == pytest.approx((3.0 - 7**0.5, 3.0 + 7**0.5))
    assert values_point([float("nan")], 1.0) is None

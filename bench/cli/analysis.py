"""``bench analyze`` and ``bench show-triggers``: pictures of what the trigger does and where it is routed.

``analyze``: routing pictures and metrics of a run's stored models; metrics go to stderr as a table, the
written files to stdout (one path a line). ``show-triggers``: clean vs triggered images of a scenario's
attacks, without training; the written files to stdout. User mistakes exit 2 with one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from bench import runner
from bench.analysis.study import AnalysisOptions, SettingResult, analyze_run
from bench.cli.common import PluginsOpt, ScenarioArg, err, fail
from bench.errors import BenchError

#: Metrics shown in the table, in order (all of them are in the ``*-metrics.json`` files).
ROWS = (
    ("ba", "BA (stored)"),
    ("asr", "ASR (stored)"),
    ("route_rate_any", "trigger routed, any expert"),
    ("route_rate_e*", "trigger routed, expert {i}"),
    ("route_rate_clean_any", "same patches kept on clean"),
    ("route_jaccard_mean", "Jaccard clean vs triggered"),
    ("route_expert_overlap", "overlap between experts"),
    ("load_cv_mean", "load CV (mean of experts)"),
)


def show_triggers(
    scenario: ScenarioArg,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Folder for the PNGs (default: reports/<name>/, "
                                                  "where `bench run` puts them).")] = None,
    plugins: PluginsOpt = None,
) -> None:
    """Draw clean vs triggered test images for every attack of a scenario, without training anything."""
    try:
        written = runner.show_triggers(scenario, out_dir, plugins)
    except BenchError as exc:
        raise fail(exc) from None
    if not written:
        err.print("the scenario has no attack to draw")
    for path in written:
        typer.echo(str(path))


def analyze(
    run_dir: Annotated[Path, typer.Argument(help="A run directory, e.g. runs/quickstart, or its scenario file.")],
    images: Annotated[int, typer.Option("--images", help="Test images drawn in the selection maps.")] = 4,
    image_seed: Annotated[int, typer.Option("--image-seed", help="Seed that picks those images.")] = 0,
    attack: Annotated[str | None, typer.Option(help="Only this attack (trigger name), e.g. badnets.")] = None,
    apply: Annotated[str | None, typer.Option(help="Only this application: image or badpatches.")] = None,
    rate: Annotated[float | None, typer.Option(help="Only this poison rate, e.g. 0.05.")] = None,
    seed: Annotated[int | None, typer.Option(help="Only this seed.")] = None,
    dataset: Annotated[str | None, typer.Option(help="Only this data set.")] = None,
    model: Annotated[str | None, typer.Option(help="Only this model name.")] = None,
    test_images: Annotated[
        int | None, typer.Option("--test-images", help="Route a seeded subset of this many test images "
                                 "for metrics, heat maps and histograms (default: the whole test set).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default RUN_DIR/analysis).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 512,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
) -> None:
    """Which expert sees the trigger: per-expert patch maps (clean vs triggered, clean / backdoored /
    defended models), selection heat maps, patch-value histograms and routing metrics."""
    options = AnalysisOptions(
        dataset=dataset, model=model, attack=attack, apply=apply, rate=rate, seed=seed, images=images,
        image_seed=image_seed, test_images=test_images, batch_size=batch_size, device=device,
    )
    try:
        results = analyze_run(run_dir, out, options)
    except BenchError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True, soft_wrap=True)
        raise typer.Exit(2) from None
    for result in results:
        for note in result.skipped:
            err.print(f"[yellow]skipped[/] {note}", highlight=False, soft_wrap=True)
    for result in results:
        err.print(metrics_table(result))
    err.print("shares of images in [0, 1]; definitions in bench/analysis/routing.py, every metric in the "
              "*-metrics.json files")
    for result in results:
        for path in result.files:
            typer.echo(str(path))


def metrics_table(result: SettingResult) -> Table:
    """One column per analyzed model of a setting, one row per metric (stored BA / ASR first)."""
    table = Table(title=result.group.title, title_justify="left")
    table.add_column("metric", no_wrap=True)
    for label in result.metrics:
        table.add_column(label, justify="right")
    columns = list(result.metrics.values())
    for key, name in ROWS:
        if key.endswith("*"):
            experts = max(sum(k.startswith(key[:-1]) for k in m) for m in columns)
            for i in range(experts):
                table.add_row(name.format(i=i + 1), *(_fmt(m.get(f"{key[:-1]}{i}")) for m in columns))
        elif any(key in m for m in columns):
            table.add_row(name, *(_fmt(m.get(key)) for m in columns))
    return table


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{float(value):.2f}"

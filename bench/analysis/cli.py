"""``bench analyze RUN_DIR``: routing pictures and metrics of a run's stored models.

The lead's CLI registers :func:`analyze` as a command (``app.command("analyze")(analyze)``); ``app``
here is the same command alone, for ``python -m bench.analysis.cli`` and tests. Metrics go to stderr as
a table, the written files to stdout (one path a line), user mistakes exit 2 with one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from bench.analysis.study import AnalysisOptions, SettingResult, analyze_run
from bench.errors import BenchError

err = Console(stderr=True)

#: Metrics shown in the table (all of them are in the ``*-metrics.json`` file).
COLUMNS = (
    ("ba", "BA"),
    ("asr", "ASR"),
    ("route_rate_any", "routed"),
    ("route_rate_clean_any", "routed (clean)"),
    ("route_jaccard_mean", "Jaccard"),
    ("route_expert_overlap", "overlap"),
    ("load_cv_mean", "load CV"),
)


def analyze(
    run_dir: Annotated[Path, typer.Argument(help="A run directory, e.g. runs/quickstart.")],
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
    err.print("routed: share of triggered images on which some expert keeps a patch the trigger touches; "
              "definitions in bench/analysis/routing.py, every metric in the *-metrics.json files")
    for result in results:
        for path in result.files:
            typer.echo(str(path))


def metrics_table(result: SettingResult) -> Table:
    """One row per analyzed model of a setting: stored BA / ASR beside the routing metrics."""
    table = Table(title=result.group.title, title_justify="left")
    table.add_column("model", no_wrap=True)
    for _, head in COLUMNS:
        table.add_column(head, justify="right")
    table.add_column("routed per expert", justify="right")
    for label, metrics in result.metrics.items():
        experts = sorted((k for k in metrics if k.startswith("route_rate_e")), key=lambda k: int(k[12:]))
        table.add_row(
            label, *(_fmt(metrics.get(key)) for key, _ in COLUMNS),
            " ".join(f"{metrics[k]:.2f}" for k in experts) or "-",
        )
    return table


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{float(value):.3f}"


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=analyze.__doc__)
app.command()(analyze)

if __name__ == "__main__":
    app()

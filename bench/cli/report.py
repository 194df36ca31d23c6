"""``bench report`` and ``bench export``: a stored run rendered again, or handed to a tracking tool."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from bench import runner
from bench.cli.common import EXPORT_TARGETS, REPORT_FORMATS, RunsDirOpt, choices, err, fail
from bench.errors import BenchError


def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="A run directory, e.g. runs/quickstart, or its scenario "
                                                   "file; with --format html, several make one page.")],
    fmt: Annotated[str, typer.Option("--format", help="md, csv, json or html (one self-contained page).",
                                     **choices(REPORT_FORMATS))] = "md",
    out_path: Annotated[Path | None, typer.Option("--out", help="Write to this file instead of stdout.")] = None,
    runs_dir: RunsDirOpt = Path("runs"),
) -> None:
    """Render the leaderboard of a finished (or partial) run again."""
    if fmt not in REPORT_FORMATS:
        err.print(f"[bold red]error:[/] --format: must be md, csv, json or html, got {fmt!r}")
        raise typer.Exit(2)
    if len(run_dirs) > 1 and fmt != "html":
        err.print(f"[bold red]error:[/] {len(run_dirs)} runs given: only --format html makes one report of several")
        raise typer.Exit(2)
    try:
        if fmt == "html":
            from bench.report_html import render_html

            text = render_html([runner.open_run(d, runs_dir) for d in run_dirs])  # pictures embedded
        else:
            store = runner.open_run(run_dirs[0], runs_dir)
            # pictures are linked relative to the file written (absolute on stdout, which has no folder)
            text = runner.render(store, fmt, relative_to=out_path.parent.resolve() if out_path is not None else None,
                                 picture_dir=out_path.parent / out_path.stem if out_path is not None else None)
    except BenchError as exc:
        raise fail(exc) from None
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(text, encoding="utf-8")
        err.print(f"wrote {out_path}")
    else:
        typer.echo(text)


def export(
    run_dir: Annotated[Path, typer.Argument(help="A run directory, e.g. runs/quickstart, or its scenario file.")],
    to: Annotated[str, typer.Option("--to", help="mlflow or tensorboard.", **choices(EXPORT_TARGETS))],
    uri: Annotated[str | None, typer.Option("--uri", help="mlflow: the tracking URI (default sqlite:///<run>/"
                                            "mlflow.db); tensorboard: the output folder (default <run>/tensorboard).")]
    = None,
    runs_dir: RunsDirOpt = Path("runs"),
) -> None:
    """Export every job of a run to MLflow or TensorBoard: one tracked run per job (needs the optional
    extra "track")."""
    from bench import export as exporting

    try:
        exporting.require(to)
        summary = exporting.export(runner.open_run(run_dir, runs_dir), to, uri)
    except BenchError as exc:
        raise fail(exc) from None
    err.print(escape(summary.line()), highlight=False, soft_wrap=True)
    typer.echo(summary.where)

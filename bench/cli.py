"""The ``bench`` command: a thin Typer skin over :mod:`bench.runner`.

Messages and progress go to stderr, data (plans as JSON, reports) to stdout, so ``bench report ... |
jq`` works. User mistakes exit with code 2 and a one-line message; a failing run exits 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench import runner
from bench.analysis.cli import analyze
from bench.errors import BenchError
from bench.plan import Job
from bench.scaffold import new_command
from bench.search_cli import search

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="pmoe-bench: backdoor attacks and defenses on patch-level Mixture-of-Experts classifiers.",
)
err = Console(stderr=True)
out = Console()

ScenarioArg = Annotated[Path, typer.Argument(help="Scenario YAML file, e.g. scenarios/quickstart.yaml.")]
PluginsOpt = Annotated[
    list[str] | None, typer.Option("--plugins", help="Plugin file or folder to load (repeatable).")
]
RunsDirOpt = Annotated[Path, typer.Option("--runs-dir", help="Where result stores live (runs/<name>/).")]
SmokeOpt = Annotated[bool, typer.Option("--smoke", help="Every kind of cell at toy scale, as its own study "
                                        "<name>-smoke: first seed, highest rate, 1 epoch, 64/32 images.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a field of the scenario file: "
                                                 "--set train.epochs=1 --set poison_rates=[0.01] (dotted path, "
                                                 "YAML value; repeatable).")]
DataRootOpt = Annotated[Path | None, typer.Option("--data-root", help="Every data set with a root reads from "
                                                  "this folder (overrides the scenario's root).")]


def _fail(exc: BenchError) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, markup=True, soft_wrap=True)
    return typer.Exit(2)


class RichReporter:
    """Progress bars: one for jobs, one per training in flight (its epochs when they are reported here;
    with ``--workers`` several trainings run in other processes and show as they start and finish)."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"), console=console, transient=False,
        )
        self.jobs_task: int | None = None
        self.job_tasks: dict[str, int] = {}
        self.epoch_task: int | None = None

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def start(self, total: int, skipped: int) -> None:
        info = f"{skipped} already done" if skipped else ""
        self.jobs_task = self.progress.add_task("jobs", total=total, info=info)

    def job_started(self, job: Job) -> None:
        if job.kind == "train":
            spec = job.spec
            what = "clean" if spec["attack"] is None else f"{spec['attack']['name']}@{spec['poison_rate']:g}"
            label = f"  train {spec['model']['name']}/{spec['dataset']['name']} {what} seed {spec['seed']}"
            self.epoch_task = self.job_tasks[job.id] = self.progress.add_task(
                label, total=spec["train"]["epochs"], info=""
            )

    def epoch(self, epoch: int, epochs: int, loss: float) -> None:
        if self.epoch_task is not None:
            self.progress.update(self.epoch_task, completed=epoch, info=f"loss {loss:.3f}")

    def job_finished(self, job: Job, seconds: float) -> None:
        task = self.job_tasks.pop(job.id, None)
        if task is not None:
            self.progress.remove_task(task)
            if task == self.epoch_task:
                self.epoch_task = None
        if self.jobs_task is not None:
            self.progress.advance(self.jobs_task)


def _plan_table(summary: dict[str, object]) -> Table:
    table = Table(title=f"plan: {summary['scenario']}", show_header=True)
    table.add_column("what")
    table.add_column("total", justify="right")
    table.add_column("done", justify="right")
    table.add_column("to run", justify="right")
    table.add_row("cells", str(summary["cells"]), "", "")
    if summary.get("not_applicable"):
        table.add_row("  of which n/a (no job)", str(summary["not_applicable"]), "", "")
    for kind, counts in summary["jobs"].items():  # type: ignore[union-attr]
        table.add_row(f"{kind} jobs", str(counts["total"]), str(counts["done"]), str(counts["total"] - counts["done"]))
    table.add_row("training images to process", "", "", f"{summary['pending_training_images']:,}")
    return table


def _not_applicable_lines(summary: dict[str, object]) -> list[str]:
    """One line per reason a cell is n/a, with its count."""
    reasons = summary.get("not_applicable_reasons") or {}
    return [f"n/a ({count} cells): {reason}" for reason, count in reasons.items()]  # type: ignore[union-attr]


@app.command()
def plan(
    scenario: ScenarioArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON on stdout.")] = False,
    runs_dir: RunsDirOpt = Path("runs"),
    plugins: PluginsOpt = None,
    smoke: SmokeOpt = False,
    data_root: DataRootOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Show the expanded matrix: cells, distinct trainings, evaluations, what is already done."""
    try:
        prepared = runner.prepare(scenario, plugins, smoke, data_root, overrides)
        root = runner.store_dir(runs_dir, prepared.resolved.name)
        done = runner.Store(root).done_ids() if (root / "results.db").exists() else set()
    except BenchError as exc:
        raise _fail(exc) from None
    summary = prepared.plan.summary(done)
    if as_json:
        summary["jobs_detail"] = [
            {"id": j.id, "kind": j.kind, "deps": list(j.deps), "done": j.id in done, "spec": j.spec}
            for j in prepared.plan.jobs
        ]
        out.print_json(json.dumps(summary))
    else:
        err.print(_plan_table(summary))
        for line in _not_applicable_lines(summary):
            err.print(escape(line), highlight=False, soft_wrap=True)


@app.command()
def run(
    scenario: ScenarioArg,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Plan only; same as `bench plan`.")] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="Delete this scenario's store and start over.")] = False,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:1 ... (overrides the scenario).")] = None,
    runs_dir: RunsDirOpt = Path("runs"),
    reports_dir: Annotated[Path, typer.Option("--reports-dir", help="Where reports are written.")] = Path("reports"),
    as_json: Annotated[bool, typer.Option("--json", help="With --dry-run: the plan as JSON.")] = False,
    plugins: PluginsOpt = None,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Jobs run at once, one process each "
                                         "(several GPUs: one per worker).")] = 1,
    executor: Annotated[str, typer.Option("--executor", help="local (this machine) or ray (a Ray cluster).")]
    = "local",
    address: Annotated[str | None, typer.Option("--address", help="With --executor ray: the cluster's address "
                                                "(auto, ray://host:10001); default: a local Ray cluster.")] = None,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Run the jobs recorded as failed "
                                               "(diverged, out of memory) again.")] = False,
    smoke: SmokeOpt = False,
    data_root: DataRootOpt = None,
    artifacts_dir: Annotated[Path | None, typer.Option("--artifacts-dir", help="Model files go to DIR/<name>/ "
                                                       "(shared storage for a cluster); the results database "
                                                       "stays in --runs-dir (keep it on a local disk).")] = None,
    cpus_per_job: Annotated[float | None, typer.Option("--cpus-per-job", help="With --executor ray: CPUs per "
                                                       "job worker (default 1).")] = None,
    gpus_per_job: Annotated[float | None, typer.Option("--gpus-per-job", help="With --executor ray: GPUs per job "
                                                       "worker, 0.25 = four on one GPU (default: 1 for CUDA, "
                                                       "0 for CPU).")] = None,
    overrides: SetOpt = None,
) -> None:
    """Run a scenario: train, evaluate, write the report. Resumes whatever is already stored.

    Exit code 0 when every job succeeded (or is not applicable), 1 when some job failed (the rest still
    ran; the report shows the failed cells), 2 for a mistake in the scenario or options."""
    if dry_run:
        plan(scenario, as_json=as_json, runs_dir=runs_dir, plugins=plugins, smoke=smoke, data_root=data_root,
             overrides=overrides)
        return
    try:
        with RichReporter(err) as reporter:
            outcome = runner.run(scenario, runs_dir, reports_dir, fresh, device, plugins, reporter, workers,
                                 executor, address, retry_failed, smoke, data_root, artifacts_dir,
                                 cpus_per_job, gpus_per_job, overrides)
    except BenchError as exc:
        raise _fail(exc) from None
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]: finished jobs are stored; run the same command again to resume.")
        raise typer.Exit(130) from None
    s = outcome.summary
    if outcome.regenerated:
        err.print(f"[yellow]recomputed {len(outcome.regenerated)} stored job(s)[/] whose model file was missing "
                  "or not whole", highlight=False)
    if s.retried:
        err.print(f"[yellow]{len(s.retried)} job(s) sent again[/] after their Ray worker died", highlight=False)
    err.print(
        f"ran {len(s.ran)} jobs in {s.seconds:.1f} s ({s.skipped} already done); "
        f"report: [bold]{outcome.report_path}[/]"
    )
    typer.echo(runner.render(outcome.store, "md"))
    if outcome.failed:
        err.print(f"[bold red]{len(outcome.failed)} job(s) failed[/] (the report shows their cells as failed; "
                  "`bench run --retry-failed` runs them again):", highlight=False)
        for line in runner.failure_lines(outcome.store, outcome.failed):
            err.print(f"  {escape(line)}", highlight=False)
        raise typer.Exit(1)


@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="A run directory, e.g. runs/quickstart, or its scenario "
                                                   "file; with --format html, several make one page.")],
    fmt: Annotated[str, typer.Option("--format", help="md, csv, json or html (one self-contained page).")] = "md",
    out_path: Annotated[Path | None, typer.Option("--out", help="Write to this file instead of stdout.")] = None,
    runs_dir: RunsDirOpt = Path("runs"),
) -> None:
    """Render the leaderboard of a finished (or partial) run again."""
    if fmt not in ("md", "csv", "json", "html"):
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
        raise _fail(exc) from None
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(text, encoding="utf-8")
        err.print(f"wrote {out_path}")
    else:
        typer.echo(text)


@app.command("export")
def export(
    run_dir: Annotated[Path, typer.Argument(help="A run directory, e.g. runs/quickstart, or its scenario file.")],
    to: Annotated[str, typer.Option("--to", help="mlflow or tensorboard.")],
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
        raise _fail(exc) from None
    err.print(escape(summary.line()), highlight=False, soft_wrap=True)
    typer.echo(summary.where)


@app.command("show-triggers")
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
        raise _fail(exc) from None
    if not written:
        err.print("the scenario has no attack to draw")
    for path in written:
        typer.echo(str(path))


@app.command("plugins")
def list_plugins(
    kind: Annotated[str | None, typer.Option(help="model, dataset, trigger (or attack) or defense.")] = None,
    pattern: Annotated[str, typer.Argument(help="Glob on the component name.")] = "*",
    plugins: PluginsOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the components as JSON instead of a table.")] = False,
) -> None:
    """List every known component with its source, parameters and one-line doc."""
    from bench.plugins import load_plugins
    from bench.registry import KINDS, REGISTRY

    try:
        kind = "trigger" if kind == "attack" else kind  # scenarios say attacks:, the registry trigger
        if kind is not None and kind not in KINDS:
            raise BenchError(f"--kind: must be one of {', '.join(KINDS)}, got {kind!r}")
        load_plugins(plugins or [])
        components = list(REGISTRY.list(kind, pattern))
    except BenchError as exc:
        raise _fail(exc) from None
    if as_json:
        typer.echo(json.dumps([
            {"kind": c.kind, "name": c.name, "source": c.source, "doc": c.doc, **_threat_model(c),
             "parameters": [{"name": p.name, "type": str(p.annotation), "required": p.required,
                             **({} if p.required else {"default": p.default})} for p in c.params]}
            for c in components], indent=2, default=repr))
        return
    table = Table(show_lines=False)
    for col in ("kind", "name", "source", "parameters", "doc"):
        table.add_column(col, overflow="fold")
    for comp in components:
        params = ", ".join(
            f"{p.name}: {p.annotation}" + ("" if p.required else f" = {p.default!r}") for p in comp.params
        )
        sees = _threat_model(comp)
        doc = comp.doc + (f" [sees: {' + '.join(sees['sees'])}]" if sees else "")
        table.add_row(comp.kind, comp.name, comp.source, params, doc)
    out.print(table)


def _threat_model(component: object) -> dict[str, list[str]]:
    """``{"sees": [...]}`` for a defense (what its threat model hands it), else nothing."""
    if getattr(component, "kind", None) != "defense":
        return {}
    from bench.defenses.base import DEFAULT_SEES, THREAT_MODEL

    sees = getattr(getattr(component, "factory", None), "sees", DEFAULT_SEES)
    return {"sees": [k for k in THREAT_MODEL if k in sees]}


def _version(value: bool) -> None:
    if value:
        from bench import __version__
        from bench.store import git_commit

        typer.echo(f"pmoe-bench {__version__} (commit {git_commit()})")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and the code's git commit, then exit.")] = False,
) -> None:
    """pmoe-bench: backdoor attacks and defenses on patch-level Mixture-of-Experts classifiers."""


app.command("analyze")(analyze)
app.command("new")(new_command)
app.command("search")(search)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()

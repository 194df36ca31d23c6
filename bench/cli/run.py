"""``bench plan`` and ``bench run``: a scenario's matrix, and running it with progress bars on stderr.

User mistakes exit 2 with a one-line message; a run in which some job failed exits 1.
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
from bench.cli.common import (
    EXECUTORS,
    DataRootOpt,
    DeviceOpt,
    PluginsOpt,
    ReportsDirOpt,
    RunsDirOpt,
    ScenarioArg,
    SetOpt,
    SmokeOpt,
    choices,
    err,
    fail,
    out,
)
from bench.errors import BenchError
from bench.plan import Job


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
        raise fail(exc) from None
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


def run(
    scenario: ScenarioArg,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Plan only; same as `bench plan`.")] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="Delete this scenario's store and start over.")] = False,
    device: DeviceOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
    reports_dir: ReportsDirOpt = Path("reports"),
    as_json: Annotated[bool, typer.Option("--json", help="With --dry-run: the plan as JSON.")] = False,
    plugins: PluginsOpt = None,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Jobs run at once, one process each "
                                         "(several GPUs: one per worker).")] = 1,
    executor: Annotated[str, typer.Option("--executor", help="local (this machine) or ray (a Ray cluster).",
                                          **choices(EXECUTORS))] = "local",
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
        raise fail(exc) from None
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

"""``bench search``: the Typer command over :func:`bench.search.run_search`, with rich progress on stderr.

Several processes may run ``bench search`` on one study at once (extra workers share its storage). User
mistakes (a bad search block, a study made for another scenario, a bad storage URL) exit 2 with a one-line
message; the report goes to stdout.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.cli.common import DeviceOpt, ReportsDirOpt, RunsDirOpt, err, fail
from bench.errors import BenchError

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from bench.plan import Job
    from bench.search import SearchOutcome

def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _points(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f} points"


class SearchProgress:
    """Rich progress on stderr: a bar of trials, a bar of the epochs in flight, one line per trial with
    its value and the best so far."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"), console=console,
        )
        self.trials_task: Any = None
        self.epoch_task: Any = None

    def __enter__(self) -> SearchProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    # -- trials -------------------------------------------------------------------------------------
    def search_started(self, study: optuna.Study, planned: int | None, done: int) -> None:
        info = f"study '{study.study_name}': {done} finished before"
        if planned == 0:
            info += "; budget reached (--n-trials N adds trials)"
        self.trials_task = self.progress.add_task("trials", total=planned, info=info)

    def trial_started(self, number: int, params: dict[str, Any]) -> None:
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        self.progress.update(self.trials_task, info=f"trial {number}: {shown}")

    def trial_finished(self, study: optuna.Study, trial: FrozenTrial) -> None:
        from bench.search import best_of

        self._drop_epochs()
        self.progress.advance(self.trials_task)
        line = f"{_trial_line(trial)}   {_best_line(best_of(study).front, len(study.directions))}"
        self.console.print(escape(line), highlight=False, soft_wrap=True)

    # -- jobs of the trial in flight (bench.execute.local.Reporter) ---------------------------------
    def start(self, total: int, skipped: int) -> None: ...

    def job_started(self, job: Job) -> None:
        self._drop_epochs()
        if job.kind == "train":
            what = "clean baseline" if job.spec["attack"] is None else "attacked model"
            epochs = job.spec["train"]["epochs"]
            self.epoch_task = self.progress.add_task(f"  train {what}", total=epochs, info="")

    def epoch(self, epoch: int, epochs: int, loss: float) -> None:
        if self.epoch_task is not None:
            self.progress.update(self.epoch_task, completed=epoch, info=f"loss {loss:.3f}")

    def job_finished(self, job: Job, seconds: float) -> None: ...

    def _drop_epochs(self) -> None:
        if self.epoch_task is not None:
            self.progress.remove_task(self.epoch_task)
            self.epoch_task = None


def _trial_line(trial: FrozenTrial) -> str:
    from optuna.trial import TrialState

    head = f"trial {trial.number}"
    if trial.state == TrialState.PRUNED and "invalid" in trial.user_attrs:
        return f"{head} skipped: {trial.user_attrs['invalid']}"
    if trial.state == TrialState.PRUNED:
        steps = trial.intermediate_values
        last = max(steps) if steps else None
        at = f" at epoch {last} (intermediate {steps[last]:.3f})" if last is not None else ""
        return f"{head} pruned{at}"
    if trial.state != TrialState.COMPLETE:
        return f"{head} {trial.state.name.lower()}"
    m = trial.user_attrs.get("metrics", {})
    values = ", ".join(f"{v:.3f}" for v in trial.values or [])
    ok = "" if all(v <= 0 for v in trial.constraints.values()) else " (violates a constraint)"
    reused = " (all jobs reused)" if trial.user_attrs.get("ran_jobs") == 0 else ""
    worst_drop = m.get("worst_ba_drop")
    worst = f" (worst {_points(worst_drop)})" if worst_drop is not None and worst_drop != m.get("ba_drop") else ""
    return (f"{head} value {values}{ok}; ASR fp32 {_pct(m.get('asr'))}, ASR@target {_pct(m.get('asr_q'))}, "
            f"BA drop {_points(m.get('ba_drop'))}{worst}{reused}")


def _best_line(front: list[FrozenTrial], objectives: int) -> str:
    if not front:
        return "| best: none feasible yet"
    if objectives > 1:
        return f"| Pareto front: trials {', '.join(str(t.number) for t in front)}"
    best = front[0]
    return f"| best {best.values[0]:.3f} (trial {best.number})"


def _summary(outcome: SearchOutcome) -> Table:
    prepared = outcome.prepared
    table = Table(title=f"search '{outcome.study.study_name}': "
                  + ("Pareto front" if prepared.spec.objective == "multi" else "best trial"))
    table.add_column("trial", justify="right")
    for p in prepared.params:
        table.add_column(p.target)
    for col in ("ASR@target", "ASR fp32", "BA", "BA drop"):
        table.add_column(col, justify="right")
    for t in outcome.best.front:
        m = t.user_attrs.get("metrics", {})
        mark = "*" if outcome.best.chosen is not None and t.number == outcome.best.chosen.number else ""
        table.add_row(f"{t.number}{mark}", *[f"{t.params.get(p.name)!s:.8}" for p in prepared.params],
                      _pct(m.get("asr_q")), _pct(m.get("asr")), _pct(m.get("ba")), _points(m.get("ba_drop")))
    return table


ScenarioArg = Annotated[Path, typer.Argument(help="Scenario YAML with a search: block.")]
NTrialsOpt = Annotated[int | None, typer.Option(
    "--n-trials", min=1, help="Run this many more trials (default: up to the block's n_trials in total).")]
TimeoutOpt = Annotated[float | None, typer.Option(
    "--timeout", min=0.0, help="Start no new trial after this many seconds (default: the block's).")]
StorageOpt = Annotated[str | None, typer.Option(
    "--storage", help="Optuna storage URL (default: sqlite:///runs/<name>/search.db).")]
StudyOpt = Annotated[str | None, typer.Option("--study", help="Study name (default: the scenario's name).")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Sampler seed (default: the block's).")]
PluginsOpt = Annotated[list[str] | None, typer.Option("--plugins", help="Plugin file or folder; repeatable.")]

def search(
    scenario: ScenarioArg,
    n_trials: NTrialsOpt = None,
    timeout: TimeoutOpt = None,
    storage: StorageOpt = None,
    study: StudyOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
    reports_dir: ReportsDirOpt = Path("reports"),
    plugins: PluginsOpt = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Override a field of the scenario file, "
                                                        "e.g. --set train.epochs=1 (dotted path, YAML value; "
                                                        "repeatable).")] = None,
) -> None:
    """Search a scenario's parameters with Optuna (resumable, shareable); write best.yaml and a report."""
    import optuna

    from bench.search import run_search

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with SearchProgress(err) as progress:
            outcome = run_search(
                scenario, n_trials=n_trials, timeout=timeout, storage=storage, study_name=study, seed=seed,
                runs_dir=runs_dir, reports_dir=reports_dir, device=device, plugins=plugins, reporter=progress,
                overrides=overrides,
            )
    except BenchError as exc:
        raise fail(exc) from None
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]: finished trials and jobs are stored; the same command resumes.")
        raise typer.Exit(130) from None
    if outcome.best.front:
        err.print(_summary(outcome))
    else:
        err.print("[yellow]no best trial yet[/]: no trial finished, or none satisfies the constraints")
    where = f"; best scenario: [bold]{outcome.best_yaml}[/]" if outcome.best_yaml else ""
    done = f"{len(outcome.ran)} trials in {outcome.seconds:.1f} s"
    err.print(f"{done}; report: [bold]{outcome.report_path}[/]{where}")
    typer.echo(outcome.report_path.read_text(encoding="utf-8"))


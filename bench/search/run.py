"""The search's front door: prepare -> open the study -> run trials -> best.yaml and report.

Budget: without ``n_trials`` the session works towards the block's ``n_trials`` finished (complete or
pruned) trials of the whole study, so running the same command again after a stop finishes the budget and
then does nothing, as ``bench run`` does with jobs; several processes share that total. ``n_trials``
(``--n-trials``) runs that many more trials in this session, on top of whatever the study holds.
``timeout`` (the block's, or ``--timeout``) stops starting new trials after that many seconds.

Enqueued points: at the start of a session and after each of its trials, an ``enqueue:`` point whose
trial did not finish (Ctrl-C, an error, a killed process: see :mod:`bench.search.study` for how a dead
process's RUNNING trial is told from a live one's) is enqueued again, so a resumed search tries it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import optuna
from optuna.study import MaxTrialsCallback
from optuna.trial import FrozenTrial, TrialState

from bench.execute.local import Reporter
from bench.jobs import JobContext
from bench.plan import build
from bench.runner import Prepared as RunPrepared
from bench.runner import check_data
from bench.search.output import Best, best_of, to_markdown, write_best_yaml
from bench.search.prepare import PreparedSearch, enqueued_points, prepare_search
from bench.search.study import (
    default_storage,
    fingerprint,
    finished,
    make_pruner,
    make_sampler,
    open_storage,
    open_study,
    retry_enqueued,
)
from bench.search.trial import TrialRunner
from bench.store import Store
from bench.train import resolve_device


class SearchReporter(Reporter, Protocol):
    """Progress of a search: the job hooks of :class:`bench.execute.local.Reporter`, plus trials."""

    def search_started(self, study: optuna.Study, planned: int | None, done: int) -> None: ...
    def trial_started(self, number: int, params: dict[str, Any]) -> None: ...
    def trial_finished(self, study: optuna.Study, trial: FrozenTrial) -> None: ...


@dataclass
class SearchOutcome:
    """What a session did and left: the study, this session's trials, the answer, the files."""

    prepared: PreparedSearch
    study: optuna.Study
    storage: str
    ran: list[int]
    seconds: float
    best: Best
    best_yaml: Path | None
    report_path: Path


def run_search(
    path: str | Path,
    *,
    n_trials: int | None = None,
    timeout: float | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    seed: int | None = None,
    runs_dir: str | Path = "runs",
    reports_dir: str | Path = "reports",
    device: str | None = None,
    plugins: list[str] | None = None,
    reporter: SearchReporter | None = None,
    overrides: list[str] | None = None,
) -> SearchOutcome:
    """Run (or resume, or join) the search of a scenario file; write ``best.yaml`` and the report
    (``overrides``: ``--set key=value`` texts applied to the file first)."""
    prepared = prepare_search(path, plugins, overrides)
    root = Path(runs_dir) / prepared.name
    url = storage or default_storage(runs_dir, prepared.name)
    name = study_name or prepared.name
    study = open_study(
        open_storage(url), name, prepared.spec, make_sampler(prepared.spec, seed), make_pruner(prepared.spec),
        fingerprint(prepared.base, prepared.spec, prepared.target), prepared.source,
    )
    points = enqueued_points(prepared)
    retry_enqueued(study, points)

    store = Store(root)
    dev = resolve_device(device or prepared.resolved.scenario.device)
    ctx = JobContext(store, dev)
    check_data(RunPrepared(prepared.resolved, build(prepared.resolved)), ctx.dataset)
    runner = TrialRunner(prepared, store, dev, ctx, reporter,
                         on_start=reporter.trial_started if reporter is not None else None)

    to_run, callbacks = _budget(prepared, study, n_trials)
    seconds = timeout if timeout is not None else prepared.spec.timeout
    ran: list[int] = []

    def after(study: optuna.Study, trial: FrozenTrial) -> None:
        ran.append(trial.number)
        retry_enqueued(study, points)  # a trial that went stale during this session: its point again
        if reporter is not None:
            reporter.trial_finished(study, trial)

    if reporter is not None:
        reporter.search_started(study, to_run, finished(study))
    start = time.perf_counter()
    try:
        if to_run is None or to_run > 0:
            study.optimize(runner, n_trials=to_run, timeout=seconds, callbacks=[*callbacks, after],
                           gc_after_trial=False)
    finally:  # also after Ctrl-C or a failing trial: the report and best.yaml show what finished
        outcome = finish(prepared, study, url, store, Path(reports_dir), ran, time.perf_counter() - start)
    return outcome


def _budget(
    prepared: PreparedSearch, study: optuna.Study, n_trials: int | None
) -> tuple[int | None, list[Any]]:
    """Trials this session may start, and the callback that stops it at the study's total."""
    if n_trials is not None:
        return n_trials, []
    budget = prepared.spec.budget
    if budget is None:
        return None, []
    stop = MaxTrialsCallback(budget, states=(TrialState.COMPLETE, TrialState.PRUNED))
    return max(0, budget - finished(study)), [stop]


def finish(
    prepared: PreparedSearch, study: optuna.Study, url: str, store: Store, reports_dir: Path, ran: list[int],
    seconds: float,
) -> SearchOutcome:
    """Write ``best.yaml`` (when a best trial exists) and the report; point the store's report at the
    best trial's plan so ``bench report runs/<name>`` shows it."""
    best = best_of(study)
    best_yaml = None
    if best.chosen is not None:
        best_yaml = write_best_yaml(prepared, best.chosen, study.study_name, store.root / "best.yaml")
        resolved = prepared.variant(best.chosen.params, f"trial {best.chosen.number}")
        store.set_meta("scenario", resolved.scenario.model_dump())
        store.set_meta("source", str(best_yaml))
        store.set_meta("cells", [c.to_dict() for c in build(resolved).cells])
    shown = _safe_url(url)
    report = reports_dir / f"{prepared.name}-search.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(to_markdown(prepared, study, shown, best, best_yaml), encoding="utf-8")
    return SearchOutcome(prepared, study, shown, ran, seconds, best, best_yaml, report)


def _safe_url(url: str) -> str:
    """The storage URL with any password hidden."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an URL SQLAlchemy cannot parse was rejected earlier; show it as given
        return url

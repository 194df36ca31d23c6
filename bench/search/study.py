"""The Optuna side of a search: storage, sampler, pruner, and creating or joining a study by name.

The study lives in a database (``runs/<name>/search.db``, SQLite, by default; any SQLAlchemy URL Optuna
accepts otherwise) and is opened with ``load_if_exists=True``: a stopped search resumes by name and several
``bench search`` processes share one study. The study remembers which scenario and objective it was made
for (a fingerprint in its user attributes), so a changed scenario fails with a message instead of mixing
incomparable trials. Ranges may change between sessions (Optuna handles a changed search space).

Samplers are seeded per trial: trial ``n`` is proposed by a sampler seeded with ``(seed, n)``. The run is
reproducible, and a resumed session or a second process, whose trials have other numbers, never replays
the first session's proposals (a plainly seeded sampler would propose the same first points again).

Interrupted trials and the ``enqueue:`` points. Every trial a ``bench search`` process runs records a
heartbeat in the storage every :data:`HEARTBEAT_SECONDS` (Optuna's heartbeat). A Ctrl-C leaves the trial
FAIL; a killed process leaves it RUNNING with a heartbeat that stops. The rule (:func:`retry_enqueued`,
at the start of a session and after each of its trials):

* a RUNNING trial whose last heartbeat is older than :data:`GRACE_SECONDS` belongs to a dead process and
  is marked FAIL (Optuna's ``fail_stale_trials``);
* a RUNNING trial with a fresh heartbeat, or with none at all (a process that records none, e.g. an
  older pmoe-bench), may belong to a live process sharing the study: it is never touched;
* an enqueued point is enqueued again unless some trial holds it COMPLETE, PRUNED, WAITING or RUNNING;
  so a point whose trial failed (Ctrl-C, an error, a dead process) is retried, once per check.

Two processes that start at the same moment may both enqueue a point whose trial failed (Optuna's
enqueueing is not atomic); the point then runs twice, which costs time but never mixes results.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from bench.errors import BenchError
from bench.search.objectives import DIRECTIONS
from bench.search.spec import SearchSpec

#: Study user attribute holding what the study was created for.
FINGERPRINT_ATTR = "pmoe_bench"
_SEED_STRIDE = 1_000_003
_OPEN_ATTEMPTS = 8
#: A running trial records a heartbeat this often (seconds).
HEARTBEAT_SECONDS = 30
#: A RUNNING trial whose heartbeat is older than this belongs to a dead process (seconds). Above the
#: interval plus SQLite's lock wait (60 s), so a live process on a busy database is never taken for dead.
GRACE_SECONDS = 150
#: States in which a trial holds its point: done, about to run, or running in a live process.
_HOLDING = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.WAITING, TrialState.RUNNING)


class SearchStorageError(BenchError):
    """A study database that cannot be opened, or a study made for something else."""


def default_storage(runs_dir: str | Path, name: str) -> str:
    """``sqlite:///<abs>/runs/<name>/search.db`` (the folder is created)."""
    root = Path(runs_dir) / name
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(root / 'search.db').resolve()}"


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna RDB storage for ``url``; SQLite waits up to a minute for a lock held by another process.

    Processes that open a new database at the same moment race to create its tables and version row; the
    loser's database error (``OperationalError``, ``IntegrityError``) is retried: the tables exist by then.
    Heartbeats are on (see the module docstring), so a trial left RUNNING by a dead process can be told
    from one a live process runs."""
    from sqlalchemy.exc import DBAPIError

    kwargs: dict[str, Any] = {"heartbeat_interval": HEARTBEAT_SECONDS, "grace_period": GRACE_SECONDS}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    attempt = 0
    while True:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, **kwargs)
        except DBAPIError as exc:
            attempt += 1
            if attempt >= _OPEN_ATTEMPTS:
                raise SearchStorageError(f"--storage: cannot open '{url}': {exc.orig}") from None
            time.sleep(0.2 * attempt)
        except Exception as exc:  # SQLAlchemy raises many types for a bad URL or a missing driver
            raise SearchStorageError(f"--storage: cannot open '{url}': {exc}") from None


class TrialSeededSampler(BaseSampler):
    """Delegates to a fresh sampler per trial, made by ``factory(seed_for(trial.number))``.

    The samplers we wrap keep no state between trials beyond their random generator (TPE, NSGA-II and
    random sampling read the study's history from storage), so re-creating one per trial changes only the
    seed.
    """

    def __init__(self, factory: Callable[[int], BaseSampler], seed: int) -> None:
        self._factory = factory
        self._seed = seed
        self._number: int | None = None
        self._inner: BaseSampler | None = None

    def seed_for(self, number: int) -> int:
        return (self._seed * _SEED_STRIDE + number) % 2**32

    def _for(self, trial: FrozenTrial) -> BaseSampler:
        if self._inner is None or self._number != trial.number:
            self._number, self._inner = trial.number, self._factory(self.seed_for(trial.number))
        return self._inner

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self._for(trial).before_trial(study, trial)

    def after_trial(
        self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        self._for(trial).after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        """Nothing to do: every trial's seed derives from its number."""


def make_sampler(spec: SearchSpec, seed: int | None = None) -> BaseSampler:
    """The declared sampler (``tpe`` | ``nsga2`` | ``random``), seeded per trial."""
    factories: dict[str, Callable[[int], BaseSampler]] = {
        "tpe": lambda s: optuna.samplers.TPESampler(seed=s, n_startup_trials=spec.startup_trials),
        "nsga2": lambda s: optuna.samplers.NSGAIISampler(seed=s, population_size=spec.population_size),
        "random": lambda s: optuna.samplers.RandomSampler(seed=s),
    }
    return TrialSeededSampler(factories[spec.sampler], spec.seed if seed is None else seed)


def make_pruner(spec: SearchSpec) -> optuna.pruners.BasePruner:
    """Median pruner over epochs, or none. No trial is pruned during its first ``warmup_epochs`` epochs
    (epochs count from 1; a qcb warm-up reports no values at all, see :mod:`bench.search.trial`)."""
    pruning = spec.pruning
    if pruning.name == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(
        n_startup_trials=pruning.startup_trials, n_warmup_steps=pruning.warmup_epochs + 1
    )


def fingerprint(base: dict[str, Any], spec: SearchSpec, target: str | None) -> dict[str, Any]:
    """What makes two sessions' trials comparable: the scenario without its search block, the objective
    and its constraints, and the searched paths (not their ranges)."""
    what = {
        "scenario": {k: v for k, v in base.items() if k != "description"},
        "objective": spec.objective,
        "target_quant": target,
        "tau": spec.tau if spec.objective == "dormant" else None,
        **({"asleep_quant": sorted(spec.asleep_quant)} if spec.asleep_quant else {}),  # old studies stay valid
        "epsilon": spec.epsilon if spec.objective != "multi" else None,
        **({"epsilon_at": spec.epsilon_at} if spec.epsilon_at != "fp32" else {}),  # old studies stay valid
        "paths": sorted(p.path for p in spec.params),
    }
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"digest": digest, **what}


def open_study(
    storage: optuna.storages.BaseStorage,
    name: str,
    spec: SearchSpec,
    sampler: BaseSampler,
    pruner: optuna.pruners.BasePruner,
    made_for: dict[str, Any],
    where: str,
) -> Study:
    """Create the study ``name`` or join it; refuse one that was made for another scenario or objective."""
    directions = list(DIRECTIONS[spec.objective])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study = optuna.create_study(
                storage=storage, study_name=name, sampler=sampler, pruner=pruner, directions=directions,
                load_if_exists=True,
            )
    except ValueError as exc:
        raise SearchStorageError(f"{where}: study '{name}': {exc}; pass --study NEW_NAME") from None
    have = [d.name.lower() for d in study.directions]
    if have != directions:
        raise SearchStorageError(
            f"{where}: study '{name}' optimises {have}, objective '{spec.objective}' needs {directions}; "
            "pass --study NEW_NAME for a new study"
        )
    stored = study.user_attrs.get(FINGERPRINT_ATTR)
    if stored is None:
        if study.trials:
            raise SearchStorageError(
                f"{where}: study '{name}' holds trials `bench search` did not make; pass --study NEW_NAME"
            )
        study.set_user_attr(FINGERPRINT_ATTR, made_for)
    elif stored.get("digest") != made_for["digest"]:
        changed = [k for k in made_for if k != "digest" and stored.get(k) != made_for[k]]
        raise SearchStorageError(
            f"{where}: study '{name}' was made for a different search ({', '.join(changed)} changed since); "
            "its trials would not compare. Pass --study NEW_NAME, or restore the scenario"
        )
    return study


def finished(study: Study) -> int:
    """Trials that count towards the budget: complete or pruned."""
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))



def fail_stale(study: Study) -> None:
    """Mark FAIL the RUNNING trials whose heartbeat stopped more than :data:`GRACE_SECONDS` ago (their
    process died); trials of live processes, and trials without any heartbeat, are left alone."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def holds(trial: FrozenTrial, point: dict[str, Any]) -> bool:
    """Whether ``trial`` was made for ``point`` (its enqueued values, else its sampled ones)."""
    params = trial.system_attrs.get("fixed_params", trial.params)
    return params.keys() == point.keys() and all(params[k] == v for k, v in point.items())


def retry_enqueued(study: Study, points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Enqueue every point no trial holds (COMPLETE, PRUNED, WAITING, or RUNNING in a live process),
    after failing the trials of dead processes; returns the points enqueued. A point whose trial failed
    is thus tried again (see the module docstring for the rule)."""
    fail_stale(study)
    trials = study.get_trials(deepcopy=False, states=_HOLDING)
    added: list[dict[str, Any]] = []
    for point in points:
        if point not in added and not any(holds(t, point) for t in trials):
            study.enqueue_trial(point)
            added.append(point)
    return added

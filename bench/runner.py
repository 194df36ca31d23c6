"""The library's front door for a whole study: load -> plan -> check data -> execute -> report.

The CLI is a thin skin over these functions; tests and notebooks call them directly.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench import __version__
from bench import plan as planning
from bench import report as reporting
from bench import scenario as scenarios
from bench.claims import check_claims
from bench.data.base import TensorData
from bench.der_heatmap import draw_der
from bench.errors import BenchError, ScenarioError
from bench.execute.local import ExecutionSummary, Reporter, execute
from bench.execute.pool import execute_parallel
from bench.execute.ray_cluster import RayCluster, check_shares, execute_ray
from bench.jobs import DatasetCache, JobContext
from bench.plots import draw_plots
from bench.precision import hardware_key
from bench.provenance import mixed_hardware_warning
from bench.registry import REGISTRY
from bench.store import JobRecord, Store, git_commit, open_existing, remove_store
from bench.train import resolve_device
from bench.transfer import draw_transfer


@dataclass
class Prepared:
    """A validated scenario and its plan."""

    resolved: scenarios.ResolvedScenario
    plan: planning.Plan
    smoke: bool = False  # the plan is the toy plan of :func:`bench.smoke.smoke_plan`

    def for_device(self, device: torch.device) -> Prepared:
        """This scenario planned for ``device``: the same plan when its ``auto`` settings
        (:mod:`bench.precision`) resolve alike there, else planned again for it."""
        if self.plan.hardware == hardware_key(device):
            return self
        from bench.smoke import smoke_plan

        plan = planning.build(self.resolved, device)
        return _checked(Prepared(self.resolved, smoke_plan(plan) if self.smoke else plan, self.smoke))


def prepare(path: str | Path, plugins: list[str] | None = None, smoke: bool = False,
            data_root: str | Path | None = None, overrides: list[str] | None = None) -> Prepared:
    """Load and validate a scenario file and plan it (no data is loaded, nothing runs). ``smoke``: its toy
    version (:mod:`bench.smoke`); ``data_root``: every data set reads from this folder; ``overrides``:
    ``--set key=value`` texts applied to the file before validation (:mod:`bench.overrides`)."""
    path = Path(path)
    if not smoke and data_root is None and not overrides:
        resolved = scenarios.load(path, extra_plugins=plugins)
        return _checked(Prepared(resolved, planning.build(resolved)))
    return prepare_raw(scenarios.read_yaml(path), str(path), path.parent, plugins, smoke, data_root, overrides)


def prepare_raw(raw: dict[str, Any], source: str, base_dir: Path, plugins: list[str] | None = None,
                smoke: bool = False, data_root: str | Path | None = None,
                overrides: list[str] | None = None) -> Prepared:
    """:func:`prepare` of a scenario given as a mapping (``source`` names it in messages; relative paths in
    it are relative to ``base_dir``)."""
    from bench.overrides import apply_overrides, describe
    from bench.plugins import load_plugins
    from bench.smoke import smoke_plan, smoke_scenario, with_data_root

    raw = apply_overrides(raw, overrides or [])
    if isinstance(raw.get("plugins"), list):  # toy parameters come from the components, plugins included
        load_plugins([*raw["plugins"], *(plugins or [])], base_dir=base_dir, source=source)
    root = str(data_root) if data_root is not None else None
    if smoke:
        raw = smoke_scenario(raw, root)
    elif root is not None:
        raw = with_data_root(raw, root)
    source = f"{source}{describe(overrides or [])}" + (" (smoke)" if smoke else "")
    resolved = scenarios.resolve(raw, source=source, base_dir=base_dir, extra_plugins=plugins)
    plan = planning.build(resolved)
    return _checked(Prepared(resolved, smoke_plan(plan) if smoke else plan, smoke))


def _checked(prepared: Prepared) -> Prepared:
    """Plan-time checks that need the cells: every published value matches at most one of them, and every
    claim picks a row of the report at each of its evaluations (a smoke run has no claims: see
    :func:`bench.smoke.smoke_scenario`)."""
    reference = prepared.resolved.scenario.reference
    cells = [c.to_dict() for c in prepared.plan.cells]
    if reference is not None:
        reporting.check_reference(reference.model_dump(), cells, prepared.resolved.source)
    claims = prepared.resolved.scenario.report.claims
    if claims:
        rows = reporting.aggregate(cells, {})
        for i, result in enumerate(check_claims([c.model_dump() for c in claims], rows, 1)):
            if result.problem:
                raise ScenarioError(f"{prepared.resolved.source}: report.claims[{i}] ({result.claim.text!r}): "
                                    f"{result.problem}")
    return prepared


def store_dir(runs_dir: str | Path, name: str) -> Path:
    return Path(runs_dir) / name


DatasetOf = Callable[[dict[str, Any]], TensorData]


def check_data(prepared: Prepared, dataset_of: DatasetOf) -> None:
    """Load every data set once (before any training; ``dataset_of`` caches, e.g. ``JobContext.dataset``)
    and check attack targets against its classes."""
    for dataset in prepared.resolved.datasets:
        data = dataset_of(dataset)
        _check_declared(dataset, data)
        for i, attack in enumerate(prepared.resolved.attacks):
            if attack["target"] is not None and attack["target"] >= data.num_classes:  # None: all-to-all
                entry = planning.origin_of(prepared.resolved.origins, "attacks", i)
                raise ScenarioError(
                    f"{prepared.resolved.source}: attacks[{entry}].target: "
                    f"{attack['target']} is not a class of dataset '{dataset['name']}' "
                    f"(valid: 0..{data.num_classes - 1})"
                )
            if attack.get("mode") == "clean-label":
                _check_clean_label(prepared, dataset["name"], data, i, attack["target"])


def _check_clean_label(prepared: Prepared, dataset: str, data: TensorData, i: int, target: int) -> None:
    """Clean-label poisoning draws only target-class images: every poison rate must find enough of them
    (checked before any training, so no run stops half-way on it)."""
    from bench.attacks.poison import poison_count

    n = len(data.train_y)
    available = int((data.train_y == target).sum())
    for rate in prepared.resolved.scenario.poison_rates:
        if poison_count(n, rate) > available:
            entry = planning.origin_of(prepared.resolved.origins, "attacks", i)
            raise ScenarioError(
                f"{prepared.resolved.source}: poison_rates: {rate:g} asks for {poison_count(n, rate)} of the {n} "
                f"training images of '{dataset}', but attacks[{entry}] (mode clean-label) can poison only the "
                f"{available} images of class {target}; use a rate of at most {available / n:.4g}, another "
                "target, or mode dirty"
            )


def _check_declared(dataset: dict[str, Any], data: TensorData) -> None:
    """The loaded data set must be what it declared to the planner (shape, classes): plans were checked
    against the declaration."""
    from bench.data.info import declared_info
    from bench.registry import REGISTRY

    info = declared_info(REGISTRY.get("dataset", dataset["name"]).factory,
                         {k: v for k, v in dataset.items() if k != "name"})
    if info is not None and (info.input_shape != data.input_shape or info.num_classes != data.num_classes):
        raise BenchError(
            f"dataset '{dataset['name']}' declares {info.num_classes} classes of {info.input_shape} images but "
            f"loaded {data.num_classes} classes of {data.input_shape}; its `info` declaration must match its data"
        )


PICTURE_IMAGES = 4


def trigger_pictures(
    prepared: Prepared, dataset_of: DatasetOf, out_dir: Path, store: Store | None = None
) -> list[Path]:
    """One PNG per data set x model: clean test images beside every attack's triggered version
    (like Figures 2 and 3 of the BadPatches paper), drawn over the model's patch grid. Needs no trained
    model: the grid comes from the model's architecture. A learned trigger (input-aware's generator) is drawn
    only with a ``store`` holding a train job of its cell, as that job trained it (:func:`learned_trigger`)."""
    from bench.attacks.pictures import trigger_grid_png
    from bench.jobs import build_model, build_trigger

    written = []
    if not prepared.resolved.attacks:
        return written
    for dataset in prepared.resolved.datasets:
        data = dataset_of(dataset)
        gen = torch.Generator().manual_seed(0)
        pick = torch.randperm(len(data.test_y), generator=gen)[:PICTURE_IMAGES].to(data.test_x.device)
        for m_index, model_spec in enumerate(prepared.resolved.models):
            model = build_model(model_spec, data)
            triggers = {}
            for attack in prepared.resolved.attacks:
                grid = attack.get("trigger_grid")
                label = f"{attack['name']} ({attack['apply']}{f' {grid[0]}x{grid[1]}' if grid else ''})"
                if label in triggers:
                    label = f"{label} #{len(triggers) + 1}"
                try:
                    trigger = build_trigger(attack, model)
                    learned = getattr(trigger, "learned", False)
                    if learned and not learned_trigger(trigger, prepared, store, dataset, model_spec, attack):
                        continue  # not trained yet: run() draws it once its train job is done
                    triggers[label] = trigger
                except BenchError:
                    continue  # e.g. badpatches on a model without a routing grid
            if not triggers:
                continue
            path = out_dir / f"triggers-{dataset['name']}-{model_spec['name']}-{m_index}.png"
            title = f"{dataset['name']} / {model_spec['name']}: clean vs triggered"
            written.append(trigger_grid_png(data.test_x[pick].cpu(), triggers, path, model.patch_grid, title))
    return written


def learned_trigger(trigger: Any, prepared: Prepared, store: Store | None, dataset: dict[str, Any],
                    model: dict[str, Any], attack: dict[str, Any]) -> bool:
    """Restore a learned trigger from the first stored train job of its data set, model and attack (the
    scenario's first poison rate, seed and train setting that has one); False when none is stored."""
    from bench.jobs import restore_trigger

    if store is None:
        return False
    done = store.done_ids()
    for cell in prepared.plan.cells:
        if (cell.attack is attack and cell.dataset is dataset and cell.model is model and cell.train_job in done
                and cell.defense is None):
            try:
                restore_trigger(trigger, store, cell.train_job)
            except BenchError:
                continue
            return True
    return False


def show_triggers(path: str | Path, out_dir: str | Path | None = None, plugins: list[str] | None = None,
                  reports_dir: str | Path = "reports") -> list[Path]:
    """The trigger pictures of a scenario without running it (default: ``reports/<name>/``, where a run
    writes them too); data sets are loaded on the CPU and checked as a run checks them."""
    prepared = prepare(path, plugins)
    dataset_of = DatasetCache(torch.device("cpu"))
    check_data(prepared, dataset_of)
    target = Path(out_dir) if out_dir is not None else Path(reports_dir) / prepared.resolved.name
    return trigger_pictures(prepared, dataset_of, target)


@dataclass
class RunOutcome:
    summary: ExecutionSummary
    report_path: Path
    store: Store
    failed: list[str]  # jobs of the plan recorded as failed (now or in an earlier run)
    regenerated: list[str] = field(default_factory=list)  # done jobs rerun: their model file was not whole


def run(
    path: str | Path,
    runs_dir: str | Path = "runs",
    reports_dir: str | Path = "reports",
    fresh: bool = False,
    device: str | None = None,
    plugins: list[str] | None = None,
    reporter: Reporter | None = None,
    workers: int = 1,
    executor: str = "local",
    address: str | None = None,
    retry_failed: bool = False,
    smoke: bool = False,
    data_root: str | Path | None = None,
    artifacts_dir: str | Path | None = None,
    cpus_per_job: float | None = None,
    gpus_per_job: float | None = None,
    overrides: list[str] | None = None,
) -> RunOutcome:
    """Run a scenario to completion (resuming whatever the store already holds) and write its report;
    ``workers > 1`` runs independent jobs at once in worker processes (:mod:`bench.execute.pool`);
    ``executor="ray"`` runs them on a Ray cluster (:mod:`bench.execute.ray_cluster`), each job on
    ``cpus_per_job`` CPUs and ``gpus_per_job`` GPUs. ``artifacts_dir``: model files go to
    ``<artifacts_dir>/<name>/`` (shared storage for a cluster) while the results database stays in
    ``<runs_dir>/<name>/`` (a local disk). ``overrides``: ``--set key=value`` texts (:mod:`bench.overrides`)."""
    _check_options(executor, address, workers, cpus_per_job, gpus_per_job)
    prepared = prepare(path, plugins, smoke, data_root, overrides)
    return run_prepared(prepared, runs_dir, reports_dir, fresh, device, reporter, workers, executor, address,
                        retry_failed, artifacts_dir, cpus_per_job, gpus_per_job)


def run_prepared(
    prepared: Prepared,
    runs_dir: str | Path = "runs",
    reports_dir: str | Path = "reports",
    fresh: bool = False,
    device: str | None = None,
    reporter: Reporter | None = None,
    workers: int = 1,
    executor: str = "local",
    address: str | None = None,
    retry_failed: bool = False,
    artifacts_dir: str | Path | None = None,
    cpus_per_job: float | None = None,
    gpus_per_job: float | None = None,
) -> RunOutcome:
    """:func:`run` of a scenario already validated and planned (a file's, or a dict's: :mod:`bench.api`)."""
    _check_options(executor, address, workers, cpus_per_job, gpus_per_job)
    requested = device or prepared.resolved.scenario.device
    cluster = RayCluster(address) if executor == "ray" else None
    try:
        dev = cluster.device(requested) if cluster is not None else local_device(requested)
        prepared = prepared.for_device(dev)
        if cluster is not None:
            check_shares(cpus_per_job or 1.0, gpus_per_job, dev)
        name = prepared.resolved.name
        root = store_dir(runs_dir, name)
        if fresh:
            remove_store(root)  # only what a store wrote, and only a folder that is one
        store = Store(root, Path(artifacts_dir) / name if artifacts_dir is not None else None)
        if retry_failed:
            store.delete(failed_jobs(prepared.plan, store))
        store.set_meta("scenario", prepared.resolved.scenario.model_dump())
        store.set_meta("source", prepared.resolved.source)
        store.set_meta("cells", [c.to_dict() for c in prepared.plan.cells])
        store.set_meta("defenses", prepared.plan.defenses)
        store.set_meta("device", str(dev))
        # one process: its jobs reuse the data loaded here; else the workers load their own and this
        # process loads (and downloads, once) on the CPU only, holding no CUDA context
        ctx = JobContext(store, dev) if executor == "local" and workers == 1 else None
        dataset_of = ctx.dataset if ctx is not None else DatasetCache(torch.device("cpu"))
        check_data(prepared, dataset_of)
        pictures = trigger_pictures(prepared, dataset_of, Path(reports_dir) / name)
        store.set_meta("pictures", [str(p.resolve()) for p in pictures])
        del dataset_of
        regenerated = regenerate_broken_inputs(prepared.plan, store)
        if cluster is not None:
            summary = execute_ray(prepared.plan, store, dev, reporter, cpus_per_job=cpus_per_job or 1.0,
                                  gpus_per_job=gpus_per_job, plugin_files=prepared.resolved.plugin_files,
                                  data_base=os.getcwd())
        elif workers > 1:
            summary = execute_parallel(prepared.plan, store, dev, workers, reporter,
                                       plugin_files=prepared.resolved.plugin_files)
        else:
            summary = execute(prepared.plan, store, dev, reporter, ctx=ctx)
        factories = [REGISTRY.get("trigger", a["name"]).factory for a in prepared.resolved.attacks]
        if any(getattr(f, "learned", False) for f in factories):
            # learned triggers (input-aware) exist only now: draw the pictures again with them
            pictures = trigger_pictures(prepared, DatasetCache(torch.device("cpu")), Path(reports_dir) / name, store)
            store.set_meta("pictures", [str(p.resolve()) for p in pictures])
    finally:
        if cluster is not None:
            cluster.close()
    report_path = write_report(store, Path(reports_dir) / f"{name}.md")
    return RunOutcome(summary, report_path, store, failed_jobs(prepared.plan, store), regenerated)


def _check_options(executor: str, address: str | None, workers: int, cpus_per_job: float | None,
                   gpus_per_job: float | None) -> None:
    """Option combinations that cannot work, before anything is loaded."""
    if executor not in ("local", "ray"):
        raise BenchError(f"--executor: must be local or ray, got {executor!r}")
    if address is not None and executor != "ray":
        raise BenchError("--address: only --executor ray connects to a cluster")
    if workers > 1 and executor == "ray":
        raise BenchError("--workers: the Ray executor runs as many jobs as the cluster has room for; drop --workers")
    for option, value in (("--cpus-per-job", cpus_per_job), ("--gpus-per-job", gpus_per_job)):
        if value is not None and executor != "ray":
            raise BenchError(f"{option}: only --executor ray gives jobs shares of a node; use --workers locally")
    if executor == "ray":
        check_shares(cpus_per_job if cpus_per_job is not None else 1.0, gpus_per_job)


def local_device(requested: str) -> torch.device:
    """The device of a run on this machine; CUDA must be usable here (else one line, not a traceback in
    the first job)."""
    try:
        dev = resolve_device(requested)
    except RuntimeError:
        raise BenchError(f"--device {requested}: not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise BenchError(f"--device {requested}: PyTorch sees no CUDA device on this machine "
                             f"(torch {torch.__version__}); use --device cpu or auto")
        if dev.index is not None and dev.index >= count:
            raise BenchError(f"--device {requested}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    return dev


def regenerate_broken_inputs(plan: planning.Plan, store: Store) -> list[str]:
    """Forget the recorded jobs whose model file a pending job would read but that is missing, partial or
    corrupt (checked against the checksum stored with its row), and the recorded jobs computed from them,
    so they run again before it; each is reported naming the job and the file. The broken jobs' ids."""
    from bench.execute.claims import forget_broken, say

    forgotten: list[str] = []
    while True:
        done = store.done_ids()
        problems = {}
        for job in plan.pending(done):
            for dep in job.deps:
                if dep in done and dep not in problems:
                    problem = store.check_input(dep, job.spec.get("stage") if job.kind == "evaluate" else None)
                    if problem:
                        problems[dep] = problem
        if not problems:
            return forgotten
        for dep, problem in sorted(problems.items()):
            record = store.get(dep)
            if record is None:
                continue  # forgotten just now, as computed from another broken job
            dependents = forget_broken(plan, store, dep)
            say(f"the model file of job {dep} ({record.kind}) is broken: {problem}; recomputing job {dep}"
                + (f" and {len(dependents)} job(s) computed from it" if dependents else ""))
            forgotten.append(dep)


def failed_jobs(plan: planning.Plan, store: Store) -> list[str]:
    """Ids of the plan's jobs recorded as failed (their own failure or an input's), in plan order."""
    records = store.records([job.id for job in plan.jobs])
    return [job.id for job in plan.jobs if job.id in records and "failed" in records[job.id].metrics]


def failure_lines(store: Store, ids: list[str], limit: int = 10) -> list[str]:
    """One line per failed job that failed on its own (not through an input), at most ``limit``."""
    records = store.records(ids)
    own = [records[i] for i in ids if i in records and "failed_input" not in records[i].metrics]
    lines = [f"{r.id} ({r.kind}): {r.metrics['failed']}" for r in own[:limit]]
    if len(own) > limit:
        lines.append(f"... and {len(own) - limit} more")
    return lines


def report_rows(store: Store) -> tuple[list[reporting.Row], dict[str, Any]]:
    """Aggregated rows and metadata of a store's latest plan."""
    cells = store.get_meta("cells")
    if cells is None:
        raise BenchError(f"{store.root}: this store holds no plan yet; run `bench run SCENARIO` first")
    defenses = store.get_meta("defenses", [])
    ids = sorted(({c["eval_job"] for c in cells} | {c["clean_eval_job"] for c in cells}
                  | {c["base_eval_job"] for c in cells if c.get("base_eval_job")} | {d["job"] for d in defenses})
                 - {""})  # n/a cells have no job
    records = store.records(ids)
    scenario = store.get_meta("scenario") or {}
    meta = {
        "scenario": scenario.get("name", store.root.name),
        "reference": scenario.get("reference"),
        "version": __version__,
        "git_commit": git_commit(),
        "device": store.get_meta("device", "?"),
        "store": str(store.root),
    }
    meta["min_seeds"] = reporting.required_seeds(scenario, cells)
    meta["detections"] = reporting.detections(defenses, records)
    behind = _with_inputs(store, records)
    meta["provenance"] = reporting.provenance(behind)
    meta["hardware_warning"] = mixed_hardware_warning(behind.values())  # CPU and GPU rows mixed: say so
    rows = reporting.aggregate(cells, records)
    claims = (scenario.get("report") or {}).get("claims") or []
    meta["claims"] = [r.to_dict() for r in check_claims(claims, rows, meta["min_seeds"])]
    return rows, meta


def _with_inputs(store: Store, records: dict[str, JobRecord]) -> dict[str, JobRecord]:
    """``records`` and, transitively, the stored jobs they were computed from (defenses, trainings)."""
    out = dict(records)
    wanted = {d for r in records.values() for d in r.deps} - out.keys()
    while wanted:
        found = store.records(sorted(wanted))
        out.update(found)
        wanted = {d for r in found.values() for d in r.deps} - out.keys()
    return out


def render(store: Store, fmt: str = "md", relative_to: Path | None = None, picture_dir: Path | None = None) -> str:
    """The report of ``store`` in ``md``, ``csv`` or ``json``; a markdown report written to a file draws its
    report-time pictures (the transfer matrix) into ``picture_dir`` and links them relative to ``relative_to``."""
    rows, meta = report_rows(store)
    if fmt == "csv":
        return reporting.to_csv(rows)
    if fmt == "json":
        return reporting.to_json(rows, meta)
    def shown(drawn: list[Path]) -> list[str]:
        return [os.path.relpath(p.resolve(), relative_to) if relative_to is not None else str(p) for p in drawn]

    transfer = shown(draw_transfer(rows, picture_dir)) if picture_dir is not None else []
    der = shown(draw_der(rows, picture_dir)) if picture_dir is not None else []
    plots = {k: shown(v) for k, v in draw_plots(rows, picture_dir, store).items()} if picture_dir is not None else {}
    return reporting.to_markdown(rows, meta, pictures=_relative_pictures(store, relative_to),
                                 routing_pictures=_relative_pictures(store, relative_to, "analysis_pictures"),
                                 transfer_pictures=transfer, der_pictures=der, plots=plots)


def _relative_pictures(store: Store, relative_to: Path | None, key: str = "pictures") -> list[str]:
    """The pictures a store lists under ``key`` that still exist, relative to the report's folder."""
    out = []
    for picture in store.get_meta(key, []):
        path = Path(picture)
        if path.exists():
            out.append(os.path.relpath(path, relative_to) if relative_to is not None else str(path))
    return out


def write_report(store: Store, out: Path, fmt: str = "md") -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    text = render(store, fmt, relative_to=out.parent.resolve(), picture_dir=out.parent / out.stem)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")  # whole or not at all: cooperating runs write it too
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    return out


def run_folder(path: str | Path, runs_dir: str | Path = "runs") -> Path:
    """The store of ``path``: ``path`` itself, or for a scenario file (``.yaml`` / ``.yml``) the store its
    ``bench run`` writes, ``<runs_dir>/<name>``."""
    path = Path(path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        name = scenarios.read_yaml(path).get("name")
        if not isinstance(name, str) or not name:
            raise ScenarioError(f"{path}: name: the scenario has no name, so it has no run folder")
        return store_dir(runs_dir, name)
    return path


def open_run(path: str | Path, runs_dir: str | Path = "runs") -> Store:
    """Open a finished or partial run for reporting: its folder (``runs/<name>``) or its scenario file."""
    return open_existing(run_folder(path, runs_dir))

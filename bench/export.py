"""``bench export``: a run's jobs in the experiment trackers people already use, MLflow and TensorBoard.

One tracked run per stored job (every row of ``results.db``): the job's fully resolved spec as parameters
(flattened to dotted keys, ``model.experts``), its numeric metrics (nested ones dotted too: a defense's
``finetuned.final_loss``), the per-epoch training losses as steps (``loss`` at steps 1..epochs), the code
commit, package version, device and job id as tags, and ``<kind> <label>`` as the run's name. Text metrics
(a failed job's reason, a defense's ``sees``) become tags ``pmoe.metric.<key>``; a failed job's run ends
FAILED.

- **MLflow**: one experiment per scenario (its name). Default tracking URI: the SQLite store
  ``sqlite:///<run>/mlflow.db`` (artifact root ``<run>/mlflow-artifacts``); ``--uri`` takes any tracking
  URI (a server, another database). Re-exporting is idempotent: each run carries the tag ``pmoe.job_id``
  and a fingerprint of the row it came from (``pmoe.export``), so an unchanged job is skipped and a job
  recorded again since (``--retry-failed``, a regenerated model) has its old run deleted and a new one
  logged: never two live runs for one job.
- **TensorBoard**: one log dir per job, ``<out>/<label>__<job id>`` (default ``<out>`` = ``<run>/tensorboard``),
  with the metrics as scalars (step 0), the losses at their epochs, the spec and tags as text, and the spec
  as hparams (the HParams tab). Re-exporting rewrites a job's event files only when its row changed
  (``pmoe-export.json`` in the folder holds the fingerprint).

Both trackers are optional (``pip install -e ".[track]"``); the rest of pmoe-bench never imports them.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.errors import BenchError
from bench.store import JobRecord, Store

INSTALL_HINT = 'pip install -e ".[track]" (from a checkout) or pip install "pmoe-bench[track]"'
#: Each target and the packages it imports.
TARGETS: dict[str, tuple[str, ...]] = {"mlflow": ("mlflow",), "tensorboard": ("tensorboard",)}
#: Changes when what an export writes for a job changes, so a newer pmoe-bench rewrites older exports.
EXPORT_FORMAT = 1
#: Job kinds in the order their runs are written (inputs before the jobs that read them).
KIND_ORDER = {"train": 0, "defend": 1, "evaluate": 2}
#: MLflow's limits: characters of a parameter value, parameters and metrics per ``log_batch`` call.
MAX_PARAM_VALUE = 6000
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
TB_MARKER = "pmoe-export.json"


class ExportError(BenchError):
    """A tracker that is not installed, an unknown target, a tracking URI that cannot be used."""


def require(target: str) -> None:
    """Refuse an unknown target, or one whose packages are not installed (with the command to install)."""
    if target not in TARGETS:
        raise ExportError(f"--to: must be one of {', '.join(TARGETS)}, got {target!r}")
    for package in TARGETS[target]:
        try:
            importlib.import_module(package)
        except ImportError:
            raise ExportError(f"--to {target}: the package {package!r} is not installed; {INSTALL_HINT}") from None


# -- what a job becomes, whatever the tracker ---------------------------------------------------------------
#: Metrics logged at several steps: name -> [(step, value), ...].
Series = dict[str, list[tuple[int, float]]]


@dataclass
class TrackedJob:
    """One stored job, as every tracker gets it."""

    record: JobRecord
    name: str
    params: dict[str, str]
    metrics: dict[str, float]
    series: Series
    tags: dict[str, str]
    status: str  # ok, failed or n/a
    fingerprint: str = field(default="")


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one mapping of dotted keys (``{"model": {"experts": 4}}`` -> ``model.experts``);
    an empty mapping stays a leaf."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(flatten(inner, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def param_text(value: Any) -> str:
    """A spec value as an MLflow parameter: strings as they are, anything else as JSON (``null``, ``0.1``,
    ``true``, ``[2, 4]``); cut to MLflow's limit."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= MAX_PARAM_VALUE else text[: MAX_PARAM_VALUE - 3] + "..."


def spec_params(spec: dict[str, Any]) -> dict[str, str]:
    """The job's resolved spec as flat parameters."""
    return {key: param_text(value) for key, value in flatten(spec).items()}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def split_metrics(metrics: dict[str, Any]) -> tuple[dict[str, float], Series, dict[str, str]]:
    """A stored job's metrics as scalars, step series and text.

    ``epoch_losses`` (at any depth) becomes the series ``loss`` (``finetuned.loss``) at steps 1..epochs;
    another list of numbers a series at steps 0..n-1; booleans count as 0/1; ``None`` is left out; text and
    anything else is kept as text (JSON)."""
    scalars: dict[str, float] = {}
    series: Series = {}
    text: dict[str, str] = {}
    for key, value in flatten(metrics).items():
        if value is None:
            continue
        if isinstance(value, bool) or _is_number(value):
            scalars[key] = float(value)
        elif isinstance(value, list) and value and all(_is_number(v) for v in value):
            leaf = key.rsplit(".", 1)[-1]
            if leaf == "epoch_losses":
                series[key[: -len(leaf)] + "loss"] = [(i + 1, float(v)) for i, v in enumerate(value)]
            else:
                series[key] = [(i, float(v)) for i, v in enumerate(value)]
        else:
            text[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return scalars, series, text


def _training(record: JobRecord, records: dict[str, JobRecord]) -> JobRecord:
    """The training a job descends from (following its first input), or the job itself."""
    seen = {record.id}
    while record.kind != "train" and record.deps and record.deps[0] in records and record.deps[0] not in seen:
        record = records[record.deps[0]]
        seen.add(record.id)
    return record


def job_label(record: JobRecord, records: dict[str, JobRecord]) -> str:
    """``<kind> <model>/<dataset> <attack>@<rate>|clean seed <s>`` plus what sets the job apart: the defense
    (of a defend job, or of the model an evaluation reads, with its stage) and the quantization config;
    the rate and seed of an evaluation are its training's."""
    spec = record.spec
    trained = _training(record, records).spec
    model = spec.get("model", {}).get("name", "?")
    dataset = spec.get("dataset", {}).get("name", "?")
    attack = spec.get("attack")
    rate = trained.get("poison_rate") or 0
    parts = [record.kind, f"{model}/{dataset}", "clean" if attack is None else f"{attack.get('name', '?')}@{rate:g}"]
    if trained.get("seed") is not None:
        parts.append(f"seed {trained['seed']}")
    defense = spec.get("defense")
    if defense is None and "stage" in spec and record.deps and record.deps[0] in records:
        defense = records[record.deps[0]].spec.get("defense")
    if defense is not None:
        parts.append(str(defense.get("name", "?")) + (f"/{spec['stage']}" if "stage" in spec else ""))
    elif "stage" in spec:
        parts.append(f"stage {spec['stage']}")
    quant = spec.get("quant")
    if quant:
        parts.append(str(quant.get("label") or f"int{quant.get('bits', '?')}"))
    return " ".join(parts)


def fingerprint(record: JobRecord) -> str:
    """What an export of ``record`` is checked against: the row's write time and :data:`EXPORT_FORMAT`."""
    return f"{record.finished_at!r}/v{EXPORT_FORMAT}"


def _status(metrics: dict[str, Any]) -> str:
    from bench.jobs import job_status

    return job_status(metrics)


def tracked_jobs(store: Store) -> list[TrackedJob]:
    """Every stored job of ``store`` as a :class:`TrackedJob`, trainings first, then defenses, evaluations."""
    records = store.records()
    out = []
    for record in sorted(records.values(), key=lambda r: (KIND_ORDER.get(r.kind, 9), r.finished_at, r.id)):
        scalars, series, text = split_metrics(record.metrics)
        commit = record.git_commit
        tags = {
            "pmoe.job_id": record.id,
            "pmoe.kind": record.kind,
            "pmoe.status": _status(record.metrics),
            "pmoe.deps": json.dumps(record.deps),
            "pmoe.git_commit": commit,
            "pmoe.version": record.version,
            "pmoe.device": record.device,
            "pmoe.seconds": f"{record.seconds:.3f}",
            "pmoe.finished_at": repr(record.finished_at),
            **{f"pmoe.metric.{key}": value[:MAX_PARAM_VALUE] for key, value in text.items()},
        }
        if commit and commit != "unknown":
            tags["mlflow.source.git.commit"] = commit.removesuffix("+dirty")
        out.append(
            TrackedJob(
                record,
                job_label(record, records),
                spec_params(record.spec),
                scalars,
                series,
                tags,
                tags["pmoe.status"],
                fingerprint(record),
            )
        )
    return out


def experiment_name(store: Store) -> str:
    """The scenario's name (``<name>-smoke`` for a smoke run), else the run folder's name."""
    scenario = store.get_meta("scenario") or {}
    name = scenario.get("name") if isinstance(scenario, dict) else None
    return str(name) if name else store.root.resolve().name


@dataclass
class ExportSummary:
    """What an export did: where to, and how many runs it created, replaced and left as they were."""

    target: str
    where: str
    created: int = 0
    replaced: int = 0
    unchanged: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        return (
            f"{self.target}: {self.created} run(s) created, {self.replaced} replaced, {self.unchanged} "
            f"unchanged in {self.seconds:.1f} s -> {self.where}"
        )


def export(store: Store, target: str, uri: str | None = None) -> ExportSummary:
    """Export every job of ``store`` to ``target`` (``mlflow`` or ``tensorboard``); ``uri``: the MLflow
    tracking URI, or the TensorBoard output folder (defaults: see the module's doc)."""
    require(target)
    start = time.perf_counter()
    summary = to_mlflow(store, uri) if target == "mlflow" else to_tensorboard(store, uri)
    summary.seconds = time.perf_counter() - start
    return summary


# -- MLflow -------------------------------------------------------------------------------------------------
def default_mlflow_uri(root: Path) -> str:
    """The SQLite tracking store inside the run folder (MLflow's file store is deprecated in MLflow 3)."""
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


@contextlib.contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """MLflow and alembic announce every table they create on stderr: keep them to warnings."""
    loggers = [logging.getLogger(name) for name in ("mlflow", "alembic")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _ms(seconds: float) -> int:
    return int(round(seconds * 1000))


def _existing_runs(client: Any, experiment_id: str) -> dict[str, list[Any]]:
    """The experiment's live runs that carry ``pmoe.job_id``, by job id."""
    found: dict[str, list[Any]] = {}
    token = None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        for run in page:
            job = run.data.tags.get("pmoe.job_id")
            if job:
                found.setdefault(job, []).append(run)
        token = page.token
        if not token:
            return found


def to_mlflow(store: Store, uri: str | None = None) -> ExportSummary:
    """One MLflow run per job in the scenario's experiment (module doc)."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    tracking_uri = uri or default_mlflow_uri(store.root)
    summary = ExportSummary("mlflow", tracking_uri)
    name = experiment_name(store)
    try:
        with _quiet_mlflow():
            client = MlflowClient(tracking_uri=tracking_uri)
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                location = (store.root / "mlflow-artifacts").resolve().as_uri() if uri is None else None
                experiment_id = client.create_experiment(
                    name, artifact_location=location, tags={"pmoe.store": str(store.root.resolve())}
                )
            else:
                experiment_id = experiment.experiment_id
                if experiment.lifecycle_stage == "deleted":
                    client.restore_experiment(experiment_id)
            existing = _existing_runs(client, experiment_id)
            for job in tracked_jobs(store):
                old = existing.get(job.record.id, [])
                keep = [
                    r
                    for r in old
                    if r.data.tags.get("pmoe.export") == job.fingerprint and r.info.status in ("FINISHED", "FAILED")
                ]
                for run in old:
                    if not keep or run is not keep[0]:
                        client.delete_run(run.info.run_id)  # stale, half-written or a duplicate
                if keep:
                    summary.unchanged += 1
                    continue
                summary.replaced += bool(old)
                summary.created += not old
                record = job.record
                stamp = _ms(record.finished_at)
                run = client.create_run(
                    experiment_id, start_time=_ms(record.finished_at - record.seconds), tags=job.tags, run_name=job.name
                )
                run_id = run.info.run_id
                params = [Param(k, v) for k, v in job.params.items()]
                metrics = [Metric(k, v, stamp, 0) for k, v in job.metrics.items()]
                metrics += [Metric(k, v, stamp, step) for k, points in job.series.items() for step, v in points]
                for i in range(0, len(params), PARAMS_PER_BATCH):
                    client.log_batch(run_id, params=params[i : i + PARAMS_PER_BATCH])
                for i in range(0, len(metrics), METRICS_PER_BATCH):
                    client.log_batch(run_id, metrics=metrics[i : i + METRICS_PER_BATCH])
                client.log_batch(run_id, tags=[RunTag("pmoe.export", job.fingerprint)])  # last: the run is whole
                client.set_terminated(run_id, status="FAILED" if job.status == "failed" else "FINISHED", end_time=stamp)
    except MlflowException as exc:
        raise ExportError(f"--uri {tracking_uri}: MLflow refused the export: {exc}") from None
    return summary


# -- TensorBoard --------------------------------------------------------------------------------------------
def log_dir_name(job: TrackedJob) -> str:
    """``<label>__<job id>``, the label reduced to characters safe in a folder name."""
    slug = re.sub(r"[^A-Za-z0-9@.+-]+", "_", job.name).strip("_")
    return f"{slug}__{job.record.id}"


def _spec_markdown(params: dict[str, str]) -> str:
    rows = "\n".join("| {} | {} |".format(k, v.replace("|", "\\|")) for k, v in sorted(params.items()))
    return f"| parameter | value |\n| --- | --- |\n{rows}"


def _hparam_value(text: str) -> float | str | bool:
    """A parameter back as a number, a boolean or text, for the HParams tab."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if isinstance(value, bool) or (_is_number(value) and math.isfinite(value)):
        return value
    return text


def to_tensorboard(store: Store, out_dir: str | None = None) -> ExportSummary:
    """One TensorBoard log dir per job under ``out_dir`` (module doc)."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    out = Path(out_dir) if out_dir is not None else store.root / "tensorboard"
    summary = ExportSummary("tensorboard", str(out))
    try:
        out.mkdir(parents=True, exist_ok=True)
        exported = {p.parent.name.rpartition("__")[2]: p.parent for p in out.glob(f"*__*/{TB_MARKER}")}
        for job in tracked_jobs(store):
            folder = out / log_dir_name(job)
            earlier = exported.get(job.record.id)
            if earlier is not None and earlier != folder and not folder.exists():
                earlier.rename(folder)  # the same job under a label an older export wrote
            marker = folder / TB_MARKER
            if marker.is_file():
                try:
                    if json.loads(marker.read_text(encoding="utf-8")).get("fingerprint") == job.fingerprint:
                        summary.unchanged += 1
                        continue
                except ValueError:
                    pass
            if folder.exists():
                summary.replaced += 1
                for old in folder.glob("events.out.tfevents.*"):
                    old.unlink()  # only what an export wrote: the user's files in the folder stay
                marker.unlink(missing_ok=True)
            else:
                summary.created += 1
            wall = job.record.finished_at
            writer = SummaryWriter(log_dir=str(folder))
            try:
                for key, value in job.metrics.items():
                    writer.add_scalar(key, value, global_step=0, walltime=wall)
                for key, points in job.series.items():
                    for step, value in points:
                        writer.add_scalar(key, value, global_step=step, walltime=wall)
                writer.add_text("spec", _spec_markdown(job.params), global_step=0, walltime=wall)
                writer.add_text("tags", _spec_markdown(job.tags), global_step=0, walltime=wall)
                finite = {k: v for k, v in job.metrics.items() if math.isfinite(v)}
                for piece in hparams({k: _hparam_value(v) for k, v in job.params.items()}, finite):
                    writer.file_writer.add_summary(piece, walltime=wall)
            finally:
                writer.close()
            marker.write_text(
                json.dumps({"job_id": job.record.id, "name": job.name, "fingerprint": job.fingerprint}) + "\n",
                encoding="utf-8",
            )
    except OSError as exc:
        raise ExportError(f"{out}: cannot write the TensorBoard logs: {exc}") from None
    return summary

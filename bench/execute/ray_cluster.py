"""Cluster executor on Ray: ``bench run --executor ray [--address ADDR]``.

Every job is a Ray task asking for its share of a node (``cpus_per_job``, ``gpus_per_job``: 1 GPU per job
when the scenario's device is CUDA). Tasks read their inputs' model weights from, and write their own to,
the run directory's ``artifacts/``, so ``--runs-dir`` must be on storage every node can reach (a shared
file system or a mounted bucket). Only this process, the driver, writes the SQLite results store: a task
returns its metrics and the driver records the row as soon as it finishes, so resume works exactly as for
local runs (a job is done when its row exists; interrupting loses only the tasks in flight). The driver
keeps at most twice the cluster's slots submitted (:func:`in_flight_limit`), so neither Ray's scheduler
nor the driver's ``ray.wait`` ever holds the whole plan.

Without ``address`` a local Ray cluster is started for the run (and stopped after); ``address="auto"``
joins the cluster this machine belongs to; ``ray://host:10001`` connects through Ray Client. Every node
needs pmoe-bench installed (and the plugins' files at the same paths).
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import Any

import torch

from bench.errors import BenchError
from bench.execute.local import ExecutionSummary, Reporter, SilentReporter
from bench.execute.schedule import DependencyTracker
from bench.jobs import JobContext, JobOutput, run_job
from bench.plan import Job, Plan
from bench.store import JobRecord, Store

#: Per worker process: one job context (loaded data sets) per run directory and device, reused by the CPU
#: tasks a worker runs (Ray gives each GPU task a fresh worker process, so those load their data anew).
_CONTEXTS: dict[tuple[str, str], JobContext] = {}


class ArtifactDir:
    """The part of a :class:`Store` a job uses, without the database: the records of the job's inputs
    (given by the driver) and the model files under ``<root>/artifacts``."""

    def __init__(self, root: str | Path, records: dict[str, JobRecord]) -> None:
        self.root = Path(root)
        self.artifacts = self.root / "artifacts"
        self.records = records

    def get(self, job_id: str) -> JobRecord | None:
        return self.records.get(job_id)

    artifact_path = Store.artifact_path
    save_state = Store.save_state
    load_state = Store.load_state


def _run_task(root: str, job: Job, inputs: dict[str, JobRecord], plugin_files: list[str]) -> dict[str, Any]:
    """The body of a Ray task: run ``job`` on this node's assigned device, save its artifacts, return what
    the driver records."""
    from bench.plugins import load_plugin_file

    for path in plugin_files:
        load_plugin_file(Path(path))
    device = torch.device("cuda" if torch.cuda.is_available() and _assigned_gpus() else "cpu")
    key = (root, str(device))
    ctx = _CONTEXTS.get(key)
    if ctx is None:
        ctx = _CONTEXTS[key] = JobContext(ArtifactDir(root, {}), device)  # type: ignore[arg-type]
    ctx.store = ArtifactDir(root, inputs)  # type: ignore[assignment]
    t0 = time.perf_counter()
    out: JobOutput = run_job(job, ctx)
    artifact = ctx.store.save_state(job.id, out.state) if out.state is not None else None
    for stage, state in out.stages.items():
        ctx.store.save_state(f"{job.id}.{stage}", state)
    return {"metrics": out.metrics, "artifact": artifact, "seconds": time.perf_counter() - t0,
            "device": str(device)}


def _assigned_gpus() -> list[Any]:
    import ray

    return list(ray.get_gpu_ids())


def execute_ray(plan: Plan, store: Store, device: torch.device, reporter: Reporter | None = None,
                address: str | None = None, cpus_per_job: float = 1.0, gpus_per_job: float | None = None,
                plugin_files: list[str] | None = None) -> ExecutionSummary:
    """Run every job of ``plan`` not yet in ``store`` as Ray tasks, in dependency order."""
    try:
        import ray
    except ImportError:
        raise BenchError("--executor ray needs Ray: pip install 'pmoe-bench[ray]'") from None
    reporter = reporter or SilentReporter()
    pending = plan.pending(store.done_ids())
    summary = ExecutionSummary(skipped=len(plan.jobs) - len(pending))
    reporter.start(len(pending), summary.skipped)
    start = time.perf_counter()
    if not pending:
        return summary
    gpus = gpus_per_job if gpus_per_job is not None else (1.0 if device.type == "cuda" else 0.0)
    files = list(plugin_files or [])
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise BenchError(f"--address {address}: cannot reach a Ray cluster: {exc}") from None
    task = ray.remote(num_cpus=cpus_per_job, num_gpus=gpus, max_retries=0)(_run_task)
    root = str(store.root.resolve())
    try:
        window = in_flight_limit(ray.cluster_resources(), cpus_per_job, gpus)
        _drive(ray, task, root, pending, store, reporter, summary, files, window)
    finally:
        if started_here:
            ray.shutdown()
    summary.seconds = time.perf_counter() - start
    return summary


def in_flight_limit(resources: dict[str, float], cpus_per_job: float, gpus_per_job: float) -> int:
    """How many tasks the driver keeps submitted at once: twice as many as the cluster can run together
    (so a node that finishes finds its next task already queued), never the whole plan (a 100k-job plan
    would otherwise sit in Ray's scheduler and object store at once)."""
    slots = resources.get("CPU", 0.0) / cpus_per_job if cpus_per_job > 0 else float("inf")
    if gpus_per_job > 0:
        gpu_total = resources.get("GPU", 0.0)
        if gpu_total <= 0:
            raise BenchError("the Ray cluster has no GPU, but the jobs ask for one (device cuda); "
                             "run with --device cpu or on a cluster with GPU nodes")
        slots = min(slots, gpu_total / gpus_per_job)
    if slots == float("inf"):
        slots = 1.0
    return max(1, int(2 * slots))


def _drive(ray: Any, task: Any, root: str, pending: list[Job], store: Store, reporter: Reporter,
           summary: ExecutionSummary, files: list[str], window: int) -> None:
    """Submit jobs whose inputs are recorded, at most ``window`` at a time; record each as it finishes."""
    tracker = DependencyTracker(pending)
    running: dict[Any, Job] = {}
    ready: deque[Job] = deque(tracker.initial)

    def submit_ready() -> None:
        while ready and len(running) < window:
            job = ready.popleft()
            inputs = store.records(list(job.deps))
            reporter.job_started(job)
            running[task.remote(root, job, inputs, files)] = job

    submit_ready()
    try:
        while running:
            (ref,), _ = ray.wait(list(running), num_returns=1)
            job = running.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as exc:  # the job raised, or its worker or node died
                cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else exc
                raise BenchError(f"job {job.id} ({job.kind}) failed on the cluster: {cause!r}") from None
            store.record(job.id, job.kind, job.spec, list(job.deps), result["metrics"], result["seconds"],
                         result["device"], result["artifact"])
            summary.ran.append(job.id)
            reporter.job_finished(job, result["seconds"])
            ready.extend(tracker.finished(job.id))
            submit_ready()
    except BaseException:
        for ref in running:
            ray.cancel(ref, force=True)
        raise

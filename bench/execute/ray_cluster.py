"""Cluster executor on Ray: ``bench run --executor ray [--address ADDR]``.

The driver (this process) connects to the cluster (:class:`RayCluster`), resolves the run's device against
the cluster's resources (``auto``: CUDA when the cluster has GPUs; ``cuda`` on a cluster without GPUs is a
:class:`BenchError`), and starts one long-lived job worker (:mod:`bench.execute.ray_worker`) per slot: a
slot is ``cpus_per_job`` CPUs and ``gpus_per_job`` GPUs (a fraction such as 0.25 puts four workers on
one GPU). Each worker loads its data sets once and runs the jobs the driver sends it, at most
:data:`DEPTH` queued at a time, so the driver never holds more than twice the cluster's slots in flight.

Workers write model files to the artifacts folder, which must be on storage every node reaches (a shared
file system, a mounted bucket); data roots must be shared as well (the driver resolves a relative root
against its own working folder and downloads there once, before any job). Only the driver writes the
SQLite results database (on its local disk): a job is done when its row exists, so an interrupted run
resumes like a local one.

Several drivers may share a store: the driver claims each job before sending it to a worker
(:mod:`bench.execute.claims`), leaves jobs other ``bench run`` processes hold to them and waits for their rows.

Failures: a job that raises stops the run with a message naming it (diverged training and out-of-memory
are not errors: ``run_job`` records them as failed jobs). A worker that dies (a preempted node, a process
killed for memory) is replaced and its jobs are sent again, each at most ``max_retries`` times: jobs are
idempotent, they write only their own files.

Without ``address`` a local Ray cluster is started for the run (and stopped after); ``address="auto"``
joins the cluster this machine belongs to; ``ray://host:10001`` connects through Ray Client. Every node
needs pmoe-bench installed (and the plugins' files at the same paths).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from bench.errors import BenchError
from bench.execute.claims import Cooperation
from bench.execute.local import ExecutionSummary, Reporter, SilentReporter, cooperation_summary
from bench.execute.pool import out_of_memory_message
from bench.execute.ray_worker import JobWorker
from bench.plan import Job, Plan
from bench.store import BrokenArtifact, Store

#: Jobs the driver keeps queued on each worker: one running, one waiting, so no worker idles between jobs.
DEPTH = 2
#: How often a job is sent again after its worker died under it (preemption, OOM kill) before the run stops.
MAX_RETRIES = 3
#: How long the driver waits for a first worker to be placed on the cluster before it gives up.
START_TIMEOUT_S = 600.0


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise BenchError("--executor ray needs Ray: pip install 'pmoe-bench[ray]'") from None
    return ray


class RayCluster:
    """This run's connection to a Ray cluster: joins ``address`` (or starts a local cluster without one,
    or reuses the connection this process already has) and closes only what it opened."""

    def __init__(self, address: str | None = None) -> None:
        self.ray = _ray()
        self.started_here = not self.ray.is_initialized()
        if self.started_here:
            try:
                self.ray.init(address=address, include_dashboard=False, log_to_driver=False,
                              configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise BenchError(f"--address {address}: cannot reach a Ray cluster: {exc}") from None

    def resources(self) -> dict[str, float]:
        return dict(self.ray.cluster_resources())

    def device(self, requested: str) -> torch.device:
        """The run's device, resolved against the cluster's resources (see :func:`cluster_device`)."""
        return cluster_device(requested, self.resources())

    def close(self) -> None:
        if self.started_here:
            self.ray.shutdown()

    def __enter__(self) -> RayCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def cluster_device(requested: str, resources: dict[str, float]) -> torch.device:
    """``auto`` -> CUDA when the cluster has GPUs, else CPU; ``cuda`` needs GPUs on the cluster; a GPU
    index cannot be chosen (Ray assigns each worker its GPU)."""
    gpus = resources.get("GPU", 0.0)
    if requested == "auto":
        return torch.device("cuda" if gpus > 0 else "cpu")
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda":
        if gpus <= 0:
            raise BenchError(f"--device cuda: the Ray cluster has no GPU ({resources.get('CPU', 0):g} CPUs); "
                             "run with --device cpu or auto, or add GPU nodes to the cluster")
        return torch.device("cuda")
    if requested.startswith("cuda:"):
        raise BenchError(f"--device {requested}: with --executor ray each job runs on the GPU Ray assigns it; "
                         "use --device cuda")
    raise BenchError(f"--device {requested}: with --executor ray the device must be auto, cpu or cuda")


def check_shares(cpus_per_job: float, gpus_per_job: float | None, device: torch.device | None = None) -> None:
    """A job's share of a node, as Ray accepts it: CPUs > 0; GPUs >= 0, whole when above 1, not 0 for CUDA
    jobs. (CPU jobs may reserve GPU shares: that only limits how many run at once.)"""
    if device is not None and device.type == "cuda" and gpus_per_job == 0:
        raise BenchError("--gpus-per-job: CUDA jobs need a share of a GPU, got 0; give one (e.g. 0.25) or use "
                         "--device cpu")
    if not cpus_per_job > 0:
        raise BenchError(f"--cpus-per-job: must be more than 0, got {cpus_per_job:g}")
    if gpus_per_job is not None and (gpus_per_job < 0 or (gpus_per_job > 1 and gpus_per_job != int(gpus_per_job))):
        raise BenchError(f"--gpus-per-job: must be 0, a fraction up to 1 or a whole number of GPUs, "
                         f"got {gpus_per_job:g}")


def in_flight_limit(resources: dict[str, float], cpus_per_job: float, gpus_per_job: float) -> int:
    """How many jobs the driver keeps submitted at once: twice as many as the cluster can run together
    (so a worker that finishes finds its next job already queued), never the whole plan (a 100k-job plan
    would otherwise sit in Ray's scheduler and object store at once)."""
    return max(1, int(DEPTH * _slots(resources, cpus_per_job, gpus_per_job)))


def worker_count(resources: dict[str, float], cpus_per_job: float, gpus_per_job: float) -> int:
    """How many job workers fit the cluster at once (at least one)."""
    return max(1, math.floor(_slots(resources, cpus_per_job, gpus_per_job) + 1e-9))


def _slots(resources: dict[str, float], cpus_per_job: float, gpus_per_job: float) -> float:
    slots = resources.get("CPU", 0.0) / cpus_per_job if cpus_per_job > 0 else float("inf")
    if gpus_per_job > 0:
        gpu_total = resources.get("GPU", 0.0)
        if gpu_total <= 0:
            raise BenchError("--gpus-per-job: the Ray cluster has no GPU, but the jobs ask for one; "
                             "run with --device cpu or on a cluster with GPU nodes")
        slots = min(slots, gpu_total / gpus_per_job)
    return 1.0 if slots == float("inf") else slots


def execute_ray(plan: Plan, store: Store, device: torch.device, reporter: Reporter | None = None,
                address: str | None = None, cpus_per_job: float = 1.0, gpus_per_job: float | None = None,
                plugin_files: list[str] | None = None, data_base: str | None = None,
                max_retries: int = MAX_RETRIES) -> ExecutionSummary:
    """Run every job of ``plan`` not yet in ``store`` on Ray job workers, in dependency order.

    ``device``: ``cpu`` or ``cuda`` as resolved for the cluster (:func:`cluster_device`); ``gpus_per_job``:
    default 1 for CUDA, 0 for CPU; ``data_base``: the folder relative data roots are read from (default:
    this process's working folder)."""
    check_shares(cpus_per_job, gpus_per_job, device)
    reporter = reporter or SilentReporter()
    pending = plan.pending(store.done_ids())
    summary = ExecutionSummary(skipped=len(plan.jobs) - len(pending))
    reporter.start(len(pending), summary.skipped)
    start = time.perf_counter()
    if not pending:
        return summary
    gpus = gpus_per_job if gpus_per_job is not None else (1.0 if device.type == "cuda" else 0.0)
    with RayCluster(address) as cluster:
        resources = cluster.resources()
        n_workers = min(len(pending), worker_count(resources, cpus_per_job, gpus))
        actor = cluster.ray.remote(JobWorker).options(num_cpus=cpus_per_job, num_gpus=gpus, max_restarts=0)
        args = (str(store.root.resolve()), str(store.artifacts.resolve()), list(plugin_files or []),
                device.type, max(1, int(cpus_per_job)), data_base or os.getcwd())
        with Cooperation(plan, store) as coop:
            driver = _Driver(cluster.ray, lambda: actor.remote(*args), store, reporter, summary, max_retries, coop)
            try:
                driver.run(n_workers)
            finally:
                driver.stop()
        cooperation_summary(summary, coop)
    summary.seconds = time.perf_counter() - start
    return summary


@dataclass
class _Worker:
    handle: Any
    ready: bool = False
    in_flight: list[Any] = field(default_factory=list)


class _Driver:
    """Feeds ready jobs to job workers, records results, replaces dead workers and resends their jobs."""

    def __init__(self, ray: Any, new_worker: Any, store: Store, reporter: Reporter, summary: ExecutionSummary,
                 max_retries: int, coop: Cooperation) -> None:
        self.ray, self.new_worker, self.store, self.coop = ray, new_worker, store, coop
        self.reporter, self.summary, self.max_retries = reporter, summary, max_retries
        self.workers: list[_Worker] = []
        self.starting: dict[Any, _Worker] = {}
        self.running: dict[Any, tuple[Job, _Worker]] = {}
        self.attempts: dict[str, int] = {}
        self.replaced = 0
        self.budget = 0
        self.ready_jobs: deque[Job] = deque()

    def run(self, n_workers: int) -> None:
        self.budget = self.max_retries * n_workers  # worker replacements allowed in this run
        for _ in range(n_workers):
            self._start_worker()
        while True:
            self._submit()
            if not self.ready_jobs and not self.running and not self.coop.left:
                return  # every job is recorded, by this driver or another process
            refs = list(self.running) + list(self.starting)
            if not refs:
                if self.workers:  # idle workers, every ready job held by another process: wait for it
                    self.coop.wait()
                    continue
                raise BenchError("no Ray job worker is left to run the remaining jobs")
            placed = any(w.ready for w in self.workers)
            free = placed and any(w.ready and len(w.in_flight) < DEPTH for w in self.workers)
            timeout = START_TIMEOUT_S if not placed else (self.coop.poll_s if free else None)
            done, _ = self.ray.wait(refs, num_returns=1, timeout=timeout)
            if not done:
                if placed:
                    continue  # a free slot looks at the store again: other processes may record inputs
                raise BenchError(f"no Ray job worker could be placed on the cluster in {START_TIMEOUT_S:g} s; "
                                 "do its nodes have the CPUs and GPUs one job asks for (--cpus-per-job, "
                                 "--gpus-per-job)?")
            ref = done[0]
            if ref in self.starting:
                self._started(ref)
                continue
            self._finished(ref)

    def stop(self) -> None:
        """End every worker (and so the jobs still in flight: the next run redoes them)."""
        for worker in self.workers:
            self._kill(worker)

    # -- workers ----------------------------------------------------------------------------------
    def _start_worker(self) -> None:
        worker = _Worker(self.new_worker())
        self.workers.append(worker)
        self.starting[worker.handle.ready.remote()] = worker

    def _started(self, ref: Any) -> None:
        worker = self.starting.pop(ref)
        try:
            info = self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:
            self._replace(worker, exc)
            return
        if info["error"] is not None:
            raise BenchError(f"a Ray job worker could not start on node {info['node'][:12]}: {info['error']}")
        worker.ready = True

    def _replace(self, worker: _Worker, exc: BaseException) -> None:
        """A worker died (or never came up): start another in its place, within the retry budget."""
        if worker not in self.workers:
            return  # already replaced (several of its jobs report the same death)
        self.workers.remove(worker)
        self._kill(worker)
        self.replaced += 1
        if self.replaced > self.budget:
            raise BenchError(f"Ray job workers keep dying ({self.replaced} lost; last: {_first_line(exc)}); "
                             "finished jobs are stored, `bench run` resumes")
        self._start_worker()

    def _kill(self, worker: _Worker) -> None:
        with contextlib.suppress(Exception):  # already dead or unreachable: nothing left to end
            self.ray.kill(worker.handle, no_restart=True)

    # -- jobs -------------------------------------------------------------------------------------
    def _submit(self) -> None:
        while True:
            free = [w for w in self.workers if w.ready and len(w.in_flight) < DEPTH]
            if not free:
                return
            if not self.ready_jobs:  # claim as many ready jobs as there are free places, no more
                self.ready_jobs.extend(self.coop.next_ready(sum(DEPTH - len(w.in_flight) for w in free)))
                if not self.ready_jobs:
                    return
            worker = min(free, key=lambda w: len(w.in_flight))
            job = self.ready_jobs.popleft()
            inputs = self.store.records(list(job.deps))
            if job.id not in self.attempts:
                self.attempts[job.id] = 0
                self.reporter.job_started(job)
            ref = worker.handle.run.remote(job, inputs)
            worker.in_flight.append(ref)
            self.running[ref] = (job, worker)

    def _finished(self, ref: Any) -> Job | None:
        """Record a finished job (returned), or resend it after its worker died (None)."""
        ray = self.ray
        job, worker = self.running.pop(ref)
        worker.in_flight.remove(ref)
        try:
            result = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:  # the job (or saving its model) raised
            cause = exc.cause
            if isinstance(cause, BrokenArtifact):  # an input's model file: recompute the job that wrote it first
                self.coop.broken_input(job, cause)
                return None
            if isinstance(cause, torch.OutOfMemoryError):
                raise BenchError(out_of_memory_message(job, cause, "its Ray worker")) from None
            if isinstance(cause, BenchError):
                raise BenchError(f"job {job.id} ({job.kind}) failed on the cluster: {cause}") from None
            raise BenchError(f"job {job.id} ({job.kind}) failed on the cluster: {cause!r}") from None
        except ray.exceptions.RayError as exc:  # its worker or node died: a system failure, retried
            self.attempts[job.id] += 1
            if self.attempts[job.id] > self.max_retries:
                raise BenchError(f"job {job.id} ({job.kind}): its Ray worker died {self.attempts[job.id]} times "
                                 f"(last: {_first_line(exc)}); finished jobs are stored, `bench run` resumes") from None
            self.summary.retried.append(job.id)
            self.ready_jobs.appendleft(job)
            self._replace(worker, exc)
            return None
        self.store.record(job.id, job.kind, job.spec, list(job.deps), result["metrics"], result["seconds"],
                          result["device"], result["artifact"], result["environment"], result.get("checksums"),
                          self.coop.owner)
        self.coop.finished(job.id)
        self.summary.ran.append(job.id)
        self.summary.workers[job.id] = result["worker"]
        self.reporter.job_finished(job, result["seconds"])
        return job


def _first_line(exc: BaseException) -> str:
    return next(iter(str(exc).strip().splitlines()), type(exc).__name__)

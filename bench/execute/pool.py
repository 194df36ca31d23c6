"""Parallel local executor: ``bench run --workers N`` runs independent jobs of a plan at once.

Each worker is a separate process (spawned, so CUDA works in it) with its own data cache and its own
connection to the store; a job starts once every job it depends on is recorded, and a worker records its
job's row and artifacts itself the moment it finishes (the store is safe for several writers). The main
process only schedules and shows progress. On a machine with several GPUs and ``device: cuda`` each worker
gets its own GPU (worker i -> ``cuda:i mod n``) and makes it its current device; on a CPU the cores are split
between the workers. More workers than GPUs share them: each worker holds its own copy of the data sets
and its own CUDA context on its GPU, so count their memory when choosing ``--workers``. The main process
loads data (for its checks) on the CPU only, so it holds no CUDA context.

Interrupting loses at most the jobs in flight (one per worker); the next ``bench run`` resumes.

The main process claims each job before handing it to a worker (:mod:`bench.execute.claims`): the pool is one
``bench run`` process among those that may share the store, and its workers record rows in its name.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import torch

from bench.errors import BenchError
from bench.execute.claims import Cooperation
from bench.execute.local import ExecutionSummary, Reporter, SilentReporter, cooperation_summary, record_job
from bench.plan import Job, Plan
from bench.store import BrokenArtifact, Store

# one per worker process, set by _start_worker
_WORKER: dict[str, Any] = {}


def worker_devices(device: torch.device, workers: int) -> list[str]:
    """The device of each worker: every CUDA device in turn for ``cuda`` without an index (always with its
    index, so that the worker can make it its current device), else ``device``."""
    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 0:
        count = torch.cuda.device_count()
        return [f"cuda:{i % count}" for i in range(workers)]
    return [str(device)] * workers


def _start_worker(root: str, devices: Any, threads: int, plugin_files: list[str]) -> None:
    """Worker initialiser: its device, its share of the CPU threads, the run's plugins, a store handle."""
    from bench.jobs import JobContext
    from bench.plugins import load_plugin_file

    torch.set_num_threads(threads)
    for path in plugin_files:
        load_plugin_file(Path(path))
    device = torch.device(devices.get())
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # libraries that allocate on "the current device" use this GPU too
    store = Store(root)
    _WORKER.update(store=store, device=device, ctx=JobContext(store, device))


def _run_in_worker(job: Job, computed_by: str = "") -> float:
    """Run one job in this worker and record it (in the name of ``computed_by``, the main process's claim
    owner); its wall time in seconds."""
    from bench.jobs import run_job

    t0 = time.perf_counter()
    out = run_job(job, _WORKER["ctx"])
    seconds = time.perf_counter() - t0
    record_job(_WORKER["store"], job, out, seconds, _WORKER["device"], computed_by)
    return seconds


def out_of_memory_message(job: Job, exc: BaseException, where: str) -> str:
    """One line for an out-of-memory error raised around a job (starting a worker, loading data, saving
    the model) rather than inside it: what ran out and what to change."""
    first = next(iter(str(exc).strip().splitlines()), "") or "out of memory"
    return (f"job {job.id} ({job.kind}): {where} ran out of memory outside the job itself ({first}); run fewer "
            "jobs per GPU (--workers, --gpus-per-job) or smaller batches; finished jobs are stored, `bench run` "
            "resumes")


def execute_parallel(plan: Plan, store: Store, device: torch.device, workers: int,
                     reporter: Reporter | None = None, plugin_files: list[str] | None = None) -> ExecutionSummary:
    """Run every job of ``plan`` not yet in ``store`` on ``workers`` processes, in dependency order."""
    reporter = reporter or SilentReporter()
    pending = plan.pending(store.done_ids())
    summary = ExecutionSummary(skipped=len(plan.jobs) - len(pending))
    reporter.start(len(pending), summary.skipped)
    start = time.perf_counter()
    if not pending:
        return summary
    with Cooperation(plan, store) as coop:
        _run_pool(coop, store, device, workers, reporter, summary, plugin_files)
    cooperation_summary(summary, coop)
    summary.seconds = time.perf_counter() - start
    return summary


def _run_pool(coop: Cooperation, store: Store, device: torch.device, workers: int, reporter: Reporter,
              summary: ExecutionSummary, plugin_files: list[str] | None) -> None:
    """Claim ready jobs (:class:`Cooperation`) and run them on ``workers`` processes until every job of the
    plan is recorded, by this process or another."""
    spawn = multiprocessing.get_context("spawn")
    devices = spawn.Queue()  # each worker takes one device name as it starts
    for name in worker_devices(device, workers):
        devices.put(name)
    threads = max(1, len(os.sched_getaffinity(0)) // workers) if device.type == "cpu" else 1
    files = list(plugin_files or [])
    running: dict[Future[float], Job] = {}
    with ProcessPoolExecutor(workers, mp_context=spawn, initializer=_start_worker,
                             initargs=(str(store.root), devices, threads, files)) as pool:
        try:
            while True:
                if len(running) < workers:
                    for job in coop.next_ready(workers - len(running)):
                        reporter.job_started(job)
                        running[pool.submit(_run_in_worker, job, coop.owner)] = job
                if not running:
                    if not coop.left:
                        break
                    coop.wait()  # every ready job is another process's: wait for it to record them
                    continue
                # a free worker looks at the store again after a while: other processes may record inputs
                timeout = coop.poll_s if len(running) < workers else None
                finished, _ = wait(running, timeout=timeout, return_when=FIRST_COMPLETED)
                for future in finished:
                    job = running.pop(future)
                    try:
                        seconds = future.result()  # a failed job stops the run; what finished stays stored
                    except BrokenArtifact as exc:  # an input's model file: recompute the job that wrote it first
                        coop.broken_input(job, exc)
                        continue
                    except BrokenProcessPool:
                        raise BenchError(
                            f"job {job.id} ({job.kind}): its worker process died (out of memory, killed, or "
                            "failed to start); finished jobs are stored, `bench run` resumes"
                        ) from None
                    except torch.OutOfMemoryError as exc:  # outside the job (run_job records its own OOM)
                        raise BenchError(out_of_memory_message(job, exc, "its worker")) from None
                    coop.finished(job.id)
                    summary.ran.append(job.id)
                    reporter.job_finished(job, seconds)
        except BaseException:
            # stop now: jobs in flight are lost (the next run redoes them), not waited for
            for process in list(getattr(pool, "_processes", {}).values()):
                process.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
            raise

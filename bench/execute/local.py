"""Local executor: runs a plan's pending jobs in this process, in dependency order, one row each.

The store is the only state: a job is done when its row exists. Interrupt at any point and the next run
skips every recorded job, so at most the job in flight is lost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from bench.jobs import JobContext, JobOutput, run_job
from bench.plan import Job, Plan
from bench.provenance import environment
from bench.store import Store


class Reporter(Protocol):
    """Progress hooks (the CLI renders them with rich; tests can collect them)."""

    def start(self, total: int, skipped: int) -> None: ...
    def job_started(self, job: Job) -> None: ...
    def epoch(self, epoch: int, epochs: int, loss: float) -> None: ...
    def job_finished(self, job: Job, seconds: float) -> None: ...


class SilentReporter:
    """A reporter that shows nothing."""

    def start(self, total: int, skipped: int) -> None: ...
    def job_started(self, job: Job) -> None: ...
    def epoch(self, epoch: int, epochs: int, loss: float) -> None: ...
    def job_finished(self, job: Job, seconds: float) -> None: ...


@dataclass
class ExecutionSummary:
    """How a run went: jobs run now, jobs found already done, wall time."""

    ran: list[str] = field(default_factory=list)
    skipped: int = 0
    seconds: float = 0.0
    retried: list[str] = field(default_factory=list)  # jobs sent again after their worker died (Ray)
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)  # job id -> the Ray worker that ran it


def record_job(store: Store, job: Job, out: JobOutput, seconds: float, device: torch.device) -> None:
    """Write a finished job's artifacts (the model, each stage's model), then its row: the row is what
    marks the job done, so a crash between the two only costs the job."""
    artifact = store.save_state(job.id, out.state) if out.state is not None else None
    for stage, state in out.stages.items():
        store.save_state(f"{job.id}.{stage}", state)
    store.record(job.id, job.kind, job.spec, list(job.deps), out.metrics, seconds, str(device), artifact,
                 environment(device))


def execute(plan: Plan, store: Store, device: torch.device, reporter: Reporter | None = None,
            ctx: JobContext | None = None) -> ExecutionSummary:
    """Run every job of ``plan`` not yet in ``store``; record each as soon as it finishes."""
    reporter = reporter or SilentReporter()
    done = store.done_ids()
    pending = plan.pending(done)
    summary = ExecutionSummary(skipped=len(plan.jobs) - len(pending))
    reporter.start(len(pending), summary.skipped)
    ctx = ctx or JobContext(store, device)
    ctx.on_epoch = reporter.epoch
    start = time.perf_counter()
    for job in pending:
        reporter.job_started(job)
        t0 = time.perf_counter()
        out = run_job(job, ctx)
        seconds = time.perf_counter() - t0
        record_job(store, job, out, seconds, device)
        summary.ran.append(job.id)
        reporter.job_finished(job, seconds)
    summary.seconds = time.perf_counter() - start
    return summary

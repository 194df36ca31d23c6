"""Local executor: runs a plan's pending jobs in this process, in dependency order, one row each.

The store is the only state: a job is done when its row exists. Interrupt at any point and the next run
skips every recorded job, so at most the job in flight is lost. Each job is claimed in the store before it
runs, so several ``bench run`` processes on one store split the jobs (:mod:`bench.execute.claims`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from bench.execute.claims import Cooperation, say
from bench.jobs import JobContext, JobOutput, run_job
from bench.plan import Job, Plan
from bench.provenance import environment
from bench.store import BrokenArtifact, Store


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
    by_others: list[str] = field(default_factory=list)  # jobs other bench run processes recorded meanwhile
    taken_over: list[str] = field(default_factory=list)  # jobs whose stale claim this process took over


def cooperation_summary(summary: ExecutionSummary, coop: Cooperation) -> None:
    """Copy what the cooperation saw into ``summary`` and say it (once, at the end)."""
    summary.by_others, summary.taken_over = list(coop.by_others), list(coop.taken_over)
    if coop.by_others:
        say(f"{len(coop.by_others)} job(s) were computed by other processes sharing this store; this process "
            f"({coop.owner}) computed {len(summary.ran)}")


def record_job(store: Store, job: Job, out: JobOutput, seconds: float, device: torch.device,
               computed_by: str = "") -> None:
    """Write a finished job's artifacts (the model, each stage's model), then its row with their checksums:
    the row is what marks the job done, so a crash between the two only costs the job."""
    artifact, checksums = store.save_outputs(job.id, out.state, out.stages)
    store.record(job.id, job.kind, job.spec, list(job.deps), out.metrics, seconds, str(device), artifact,
                 environment(device, job.settings), checksums, computed_by)


def execute(plan: Plan, store: Store, device: torch.device, reporter: Reporter | None = None,
            ctx: JobContext | None = None) -> ExecutionSummary:
    """Run every job of ``plan`` not yet in ``store``; record each as soon as it finishes. Jobs are claimed
    first: those another process is computing are left to it (and waited for), so the call returns once
    every job is recorded by some process."""
    reporter = reporter or SilentReporter()
    done = store.done_ids()
    pending = plan.pending(done)
    summary = ExecutionSummary(skipped=len(plan.jobs) - len(pending))
    reporter.start(len(pending), summary.skipped)
    ctx = ctx or JobContext(store, device)
    ctx.on_epoch = reporter.epoch
    start = time.perf_counter()
    if pending:
        with Cooperation(plan, store) as coop:
            while True:
                jobs = coop.next_ready(1)
                if not jobs:
                    if not coop.left:
                        break
                    coop.wait()
                    continue
                job = jobs[0]
                reporter.job_started(job)
                t0 = time.perf_counter()
                try:
                    out = run_job(job, ctx)
                except BrokenArtifact as exc:  # an input's model file: recompute the job that wrote it first
                    coop.broken_input(job, exc)
                    continue
                seconds = time.perf_counter() - t0
                record_job(store, job, out, seconds, device, coop.owner)
                coop.finished(job.id)
                summary.ran.append(job.id)
                reporter.job_finished(job, seconds)
        cooperation_summary(summary, coop)
    summary.seconds = time.perf_counter() - start
    return summary

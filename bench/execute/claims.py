"""Cooperating runs: several ``bench run`` processes on one store split its jobs instead of each computing all.

Before a process runs a job it claims it in the store's ``claims`` table (one ``BEGIN IMMEDIATE``
transaction, :meth:`bench.store.Store.claim`): the claim names its owner (host, pid and a random token)
and holds for a lease (:data:`LEASE_S`) that a heartbeat thread renews (every :data:`HEARTBEAT_S`) while the
job runs. Other processes skip a job under a live claim and run what else is ready; a job whose inputs
another process is computing waits for them (the store is polled every :data:`POLL_S`). Recording a job
drops its claim; a process releases the claims it holds when it stops (an error, Ctrl-C). A claim whose
lease expired (its process crashed, its machine is gone) or whose process on this machine no longer
exists (killed: no need to wait out its lease) is taken over, with a message naming the old owner. A
process exits when every job of its plan is recorded, by whichever process.

One ``bench run`` process is one owner: the workers of ``--workers`` and the Ray workers run jobs their
driver claimed. A lone process claims each job before running it and otherwise runs as before (same order,
same resume).

Lease and heartbeat: a lease of 120 s renewed every 30 s lets a renewal miss three beats in a row (a store
busy for up to SQLite's 60-s lock wait, a heartbeat thread starved by a busy process) before another
process may take the job; and a crashed process on another machine costs at most 120 s before its job is
taken over (on this machine its dead pid frees it at once). The environment variables
``PMOE_BENCH_LEASE_S``, ``PMOE_BENCH_HEARTBEAT_S`` (default: a quarter of the lease) and
``PMOE_BENCH_POLL_S`` change them (tests use seconds). Leases compare wall clocks: machines sharing a
store need synchronised clocks (NTP), well within the lease.

A model file that a job cannot read (missing, partial, corrupt: :class:`bench.store.BrokenArtifact`) is
reported naming the job that wrote it and the file; that job's row and the recorded rows computed from it
are forgotten, so they are computed again (claimed like any job) before the job that needed them.
"""

from __future__ import annotations

import os
import secrets
import sys
import threading
import time
from typing import Any

from bench.errors import BenchError, StoreError
from bench.plan import Job, Plan
from bench.store import HOST, BrokenArtifact, ClaimRow, Store

#: A claim holds this long (seconds) unless renewed.
LEASE_S = 120.0
#: A running job's claim is renewed this often (seconds).
HEARTBEAT_S = 30.0
#: How often a process with nothing to run looks at the store for jobs others finished (seconds).
POLL_S = 2.0
#: How often one run recomputes the same job for a broken model file before it gives up.
MAX_REBUILDS = 2

ENV_LEASE = "PMOE_BENCH_LEASE_S"
ENV_HEARTBEAT = "PMOE_BENCH_HEARTBEAT_S"
ENV_POLL = "PMOE_BENCH_POLL_S"


def say(text: str) -> None:
    """A message for the user (stderr; the CLI's progress display prints it above its bars)."""
    print(text, file=sys.stderr, flush=True)


def _seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BenchError(f"{name}: must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise BenchError(f"{name}: must be more than 0 seconds, got {raw!r}")
    return value


def settings() -> tuple[float, float, float]:
    """Lease, heartbeat and poll interval in seconds (constants, or the environment variables)."""
    lease = _seconds(ENV_LEASE, LEASE_S)
    heartbeat = _seconds(ENV_HEARTBEAT, min(HEARTBEAT_S, lease / 4))
    if heartbeat >= lease:
        raise BenchError(f"{ENV_HEARTBEAT}: the heartbeat ({heartbeat:g} s) must be shorter than the lease "
                         f"({lease:g} s), else a running job's claim lapses between renewals")
    return lease, heartbeat, _seconds(ENV_POLL, POLL_S)


class Lease:
    """This process's claims on jobs of one store, renewed by a heartbeat thread while it holds any."""

    def __init__(self, store: Store, lease_s: float, heartbeat_s: float) -> None:
        self.store, self.lease_s, self.heartbeat_s = store, lease_s, heartbeat_s
        self.token = secrets.token_hex(4)
        self.owner = f"{HOST}:{os.getpid()}:{self.token}"
        self.held: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: set[str] = set()

    def claim(self, job_id: str) -> Any:
        result = self.store.claim(job_id, self.owner, self.token, self.lease_s)
        if result.state == "claimed":
            with self._lock:
                self.held.add(job_id)
            if self._thread is None:
                self._thread = threading.Thread(target=self._beat, name="bench-claims-heartbeat", daemon=True)
                self._thread.start()
        return result

    def drop(self, job_id: str, release: bool = True) -> None:
        """Stop holding ``job_id`` (``release``: delete its claim; recording a job already did)."""
        with self._lock:
            self.held.discard(job_id)
        if release:
            self.store.release(self.owner, [job_id])

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with self._lock:
                ids = sorted(self.held)
            try:
                lost = self.store.renew(self.owner, ids, self.lease_s)
            except StoreError as exc:
                say(f"warning: cannot renew this process's claims ({exc}); retrying in {self.heartbeat_s:g} s")
                continue
            with self._lock:
                lost = [j for j in lost if j in self.held and j not in self._lost]
                self._lost.update(lost)
            for job_id in lost:
                say(f"warning: job {job_id}: this process's claim lapsed and another process took it over; "
                    "both may compute it (the row recorded last stays)")

    def close(self) -> None:
        """Stop the heartbeat and release every claim still held (a job not finished: others may take it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            held, self.held = sorted(self.held), set()
        if held:
            try:
                self.store.release(self.owner, held)
            except StoreError as exc:
                say(f"warning: cannot release this process's claims ({exc}); they lapse after {self.lease_s:g} s")


class Cooperation:
    """Hands out the jobs of a plan that this process may run now: not recorded, every input recorded (by
    any process), not claimed by another live process; each one claimed first. A context manager: leaving
    it releases the claims still held."""

    def __init__(self, plan: Plan, store: Store) -> None:
        self.plan, self.store = plan, store
        lease_s, heartbeat_s, self.poll_s = settings()
        self.lease = Lease(store, lease_s, heartbeat_s)
        self.owner = self.lease.owner
        self.mine: set[str] = set()  # claimed and handed out, not yet recorded
        self.by_others: list[str] = []  # jobs of the plan that other processes recorded during this run
        self.taken_over: list[str] = []
        self.left = len(plan.jobs)
        self._start_done = store.done_ids()
        self._ours: set[str] = set()
        self._waiting_note = ""
        self._rebuilds: dict[str, int] = {}

    def __enter__(self) -> Cooperation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.lease.close()

    def next_ready(self, limit: int = 1) -> list[Job]:
        """Up to ``limit`` jobs claimed for this process, in plan order (empty: none can start now;
        :attr:`left` says whether any job is still unrecorded)."""
        done = self.store.done_ids()
        self._count_others(done)
        self.left = sum(job.id not in done for job in self.plan.jobs)
        out: list[Job] = []
        held: list[ClaimRow] = []
        claims = self.store.claims() if self.left else {}
        now = time.time()
        for job in self.plan.jobs:
            if len(out) >= limit:
                break
            if job.id in done or job.id in self.mine or any(d not in done for d in job.deps):
                continue
            row = claims.get(job.id)
            if row is not None and row.owner != self.owner and row.stale_reason(now) is None:
                held.append(row)
                continue
            result = self.lease.claim(job.id)
            if result.state == "held":
                held.append(result.previous)
                continue
            if result.state == "done":
                continue
            if result.previous is not None:
                self.taken_over.append(job.id)
                say(f"taking over job {job.id} ({job.kind}) from {result.previous.describe()}: {result.reason}")
            self.mine.add(job.id)
            out.append(job)
        if out or self.mine:
            self._waiting_note = ""
        elif self.left:
            self._note_waiting(held)
        return out

    def finished(self, job_id: str) -> None:
        """``job_id`` is recorded by this process (its claim went with the row)."""
        self.mine.discard(job_id)
        self._ours.add(job_id)
        self.lease.drop(job_id, release=False)

    def give_up(self, job_id: str) -> None:
        """``job_id`` will not be run by this process now: release its claim."""
        self.mine.discard(job_id)
        self.lease.drop(job_id)

    def wait(self) -> None:
        """Nothing can start: wait for other processes to record jobs."""
        time.sleep(self.poll_s)

    def broken_input(self, job: Job, exc: BrokenArtifact) -> None:
        """``job`` could not read a model file: report it, forget the job that wrote it and what was computed
        from it, and release ``job`` (it runs again once its input is recomputed)."""
        self.give_up(job.id)
        count = self._rebuilds[exc.job_id] = self._rebuilds.get(exc.job_id, 0) + 1
        if count > MAX_REBUILDS:
            raise StoreError(f"job {job.id} ({job.kind}): its input {exc}; recomputed {MAX_REBUILDS} times in "
                             "this run and still not whole: check the artifacts folder's storage") from None
        dependents = forget_broken(self.plan, self.store, exc.job_id)
        say(f"job {job.id} ({job.kind}) cannot read the model file of job {exc.job_id}: {exc.path}: {exc.problem}; "
            f"recomputing job {exc.job_id}" + (f" and {len(dependents)} job(s) computed from it" if dependents else ""))

    def _count_others(self, done: set[str]) -> None:
        seen = set(self.by_others)
        for job in self.plan.jobs:
            if job.id in done and job.id not in self._start_done and job.id not in self._ours and job.id not in seen:
                self.by_others.append(job.id)

    def _note_waiting(self, held: list[ClaimRow]) -> None:
        owners = sorted({row.describe() for row in held})
        note = (f"waiting for {len(held)} job(s) that other processes are computing (held by "
                f"{', '.join(owners)}); {self.left} job(s) left") if held else \
            f"waiting: {self.left} job(s) left, none can start yet"
        if note != self._waiting_note:
            self._waiting_note = note
            say(note)


def forget_broken(plan: Plan, store: Store, job_id: str) -> list[str]:
    """Forget the row of ``job_id`` (whose model file is broken) and the recorded rows of the plan's jobs
    computed from it (transitively), so that they run again; the dependents forgotten."""
    record = store.get(job_id)
    if record is not None:
        store.forget(job_id, record.finished_at)  # not a row another process has just recorded again
    children: dict[str, list[str]] = {}
    for job in plan.jobs:
        for dep in job.deps:
            children.setdefault(dep, []).append(job.id)
    seen: set[str] = set()
    todo = list(children.get(job_id, []))
    while todo:
        child = todo.pop()
        if child not in seen:
            seen.add(child)
            todo.extend(children.get(child, []))
    dependents = sorted(seen & store.done_ids())
    if dependents:
        store.delete(dependents)
    return dependents

"""Which pending jobs may start: those whose inputs are all recorded (shared by the parallel executors)."""

from __future__ import annotations

from bench.plan import Job


class DependencyTracker:
    """Tracks the pending jobs of a plan; a job becomes ready once every pending job it depends on is done
    (dependencies recorded before the run are already satisfied)."""

    def __init__(self, pending: list[Job]) -> None:
        ids = {job.id for job in pending}
        self._waiting = {job.id: {d for d in job.deps if d in ids} for job in pending}
        self._dependents: dict[str, list[Job]] = {}
        for job in pending:
            for dep in self._waiting[job.id]:
                self._dependents.setdefault(dep, []).append(job)
        self.initial = [job for job in pending if not self._waiting[job.id]]

    def finished(self, job_id: str) -> list[Job]:
        """Mark ``job_id`` done; the jobs that this makes ready, in plan order."""
        ready = []
        for child in self._dependents.get(job_id, []):
            self._waiting[child.id].discard(job_id)
            if not self._waiting[child.id]:
                ready.append(child)
        return ready

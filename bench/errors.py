"""One exception tree for pmoe-bench.

Every error a user can cause derives from :class:`BenchError`; the CLI turns those into a one-line message
and exit code 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class BenchError(Exception):
    """Root of every user-facing error (bad scenario, unknown component, unreadable store...)."""


class ScenarioError(BenchError):
    """A scenario file that cannot be read or does not validate; the message names file and field."""


class UnknownComponentError(BenchError):
    """A component name that is not registered; the message suggests the closest names."""


class ComponentParamsError(BenchError):
    """Parameters that do not match a component's declared schema."""


class PluginError(BenchError):
    """A plugin file or package that cannot be loaded or registers something invalid."""


class StoreError(BenchError):
    """A results store that cannot be opened or read."""


class DataError(BenchError):
    """A data set that cannot be found or loaded (missing files, download disabled)."""


class JobFailed(Exception):
    """A job that ran and produced no usable result (a diverged training, a run out of memory).

    Not a :class:`BenchError`: the scenario is fine, this one job is not. The executor records the job as
    failed (``metrics["failed"]`` = the reason), skips the jobs that need its output and runs the rest of
    the matrix; the run then ends with exit code 1 naming the failed jobs.
    """

    def __init__(self, reason: str, **details: object) -> None:
        super().__init__(reason)
        self.reason = reason
        self.details = details


class TrainingDiverged(JobFailed):
    """A training (or fine-tuning) whose loss became NaN or infinite: its model is not a result."""

    def __init__(self, epoch: int, loss: float, what: str | None = None) -> None:
        super().__init__(f"training diverged: {what or f'mean loss {loss}'} in epoch {epoch}", failed_epoch=epoch)
        self.epoch = epoch
        self.loss = loss

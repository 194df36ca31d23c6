"""What runs on a Ray node: a long-lived job worker (a Ray actor) that keeps its data sets loaded.

One worker per slot of the cluster (a CPU share and, for CUDA, a GPU or a fraction of one): it imports
torch, initialises its device and loads each data set once, then runs job after job that the driver
sends it. A GPU task per job would instead start a fresh process every time (Ray's default for GPU
tasks) and pay all of that per job. The worker writes model files to the artifacts folder (shared
storage) and returns metrics to the driver, which alone writes the results database.

Nothing here raises out of ``__init__``: a worker that cannot start (no CUDA where Ray gave it a GPU, a
broken plugin) reports why from :meth:`JobWorker.ready`, so the driver can stop with that one line
instead of treating it as a crashed node to be retried.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.errors import BenchError
from bench.jobs import JobContext, run_job
from bench.plan import Job
from bench.store import ArtifactFiles, JobRecord, Store


class ArtifactDir:
    """The part of a :class:`Store` a job uses on a worker, without the database: the records of the
    job's inputs (sent by the driver with the job) and the model files."""

    def __init__(self, root: str | Path, artifacts: str | Path, records: dict[str, JobRecord]) -> None:
        self.root = Path(root)
        self.artifacts = Path(artifacts)
        self.files = ArtifactFiles(self.artifacts)
        self.records = records

    def get(self, job_id: str) -> JobRecord | None:
        return self.records.get(job_id)

    save_state = Store.save_state
    save_outputs = Store.save_outputs
    load_state = Store.load_state
    _expected = Store._expected


def worker_dataset_spec(spec: dict[str, Any], data_base: str) -> dict[str, Any]:
    """``spec`` as a worker loads it: a relative ``root`` resolved against the driver's working folder
    ``data_base`` (a worker's own working folder is Ray's, and differs per node), and ``download`` off
    (the driver downloaded every data set before the run; a node that does not see them must fail, not
    fetch its own copy). The job's spec, and so its id, keeps the value the scenario wrote."""
    out = dict(spec)
    root = out.get("root")
    if isinstance(root, str) and "://" not in root and not os.path.isabs(os.path.expanduser(root)):
        out["root"] = os.path.join(data_base, root)
    if out.get("download") is True:
        out["download"] = False
    return out


@dataclass
class WorkerContext(JobContext):
    """A :class:`JobContext` whose data sets are read from the driver's data roots; counts the data sets
    it loaded (each once per worker)."""

    data_base: str = ""
    loads: int = 0
    _seen: set[str] = field(default_factory=set, init=False, repr=False)

    def dataset(self, spec: dict[str, Any]):  # type: ignore[no-untyped-def]
        local = worker_dataset_spec(spec, self.data_base)
        key = json.dumps(local, sort_keys=True)
        if key not in self._seen:
            self._seen.add(key)
            self.loads += 1
        return super().dataset(local)


def worker_device(requested: str) -> torch.device:
    """This worker's device for the run's ``requested`` one (``cpu`` or ``cuda``): for CUDA the GPU Ray
    assigned it (Ray narrows ``CUDA_VISIBLE_DEVICES`` to it, so it is ``cuda:0`` here)."""
    if requested == "cpu":
        return torch.device("cpu")
    import ray

    gpus = list(ray.get_gpu_ids())
    if not gpus:
        raise BenchError("a CUDA worker was given no GPU by Ray; ask for one with --gpus-per-job")
    if not torch.cuda.is_available():
        raise BenchError(
            f"Ray gave this worker GPU {gpus[0]} but PyTorch sees no CUDA device here (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda}); install a CUDA build of torch on every GPU node, or run "
            "with --device cpu"
        )
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    return device


class JobWorker:
    """The body of a Ray actor (wrapped with ``ray.remote`` by the driver): runs jobs one after another."""

    def __init__(self, root: str, artifacts: str, plugin_files: list[str], device: str, threads: int,
                 data_base: str) -> None:
        self.error: str | None = None
        self.jobs = 0
        self.root, self.artifacts = root, artifacts
        try:
            from bench.plugins import load_plugin_file

            torch.set_num_threads(max(1, threads))
            for path in plugin_files:
                load_plugin_file(Path(path))
            self.device = worker_device(device)
            self.ctx = WorkerContext(ArtifactDir(root, artifacts, {}), self.device,  # type: ignore[arg-type]
                                     data_base=data_base)
        except Exception as exc:  # reported by ready(): a start-up error is not a node failure
            self.error = str(exc) if isinstance(exc, BenchError) else f"{type(exc).__name__}: {exc}"

    def ready(self) -> dict[str, Any]:
        """Where this worker runs, or why it could not start (``error``)."""
        import ray

        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(), "error": self.error}

    def run(self, job: Job, inputs: dict[str, JobRecord]) -> dict[str, Any]:
        """Run ``job`` (its inputs' records sent along), save its model files, return what the driver records."""
        from bench.provenance import environment

        if self.error is not None:
            raise BenchError(self.error)
        self.ctx.store = ArtifactDir(self.root, self.artifacts, inputs)  # type: ignore[assignment]
        t0 = time.perf_counter()
        out = run_job(job, self.ctx)
        artifact, checksums = self.ctx.store.save_outputs(job.id, out.state, out.stages)
        self.jobs += 1
        return {"metrics": out.metrics, "artifact": artifact, "checksums": checksums,
                "seconds": time.perf_counter() - t0,
                "device": self.device.type, "environment": environment(self.device, job.settings),
                "worker": {"pid": os.getpid(), "jobs": self.jobs, "data_loads": self.ctx.loads}}

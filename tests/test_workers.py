"""``bench run --workers N``: worker processes run independent jobs at once, in dependency order, with
the scenario's plugins, and record exactly what a one-process run records."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench import runner
from bench.errors import BenchError
from bench.execute.local import SilentReporter
from bench.execute.pool import worker_devices
from bench.execute.ray_cluster import in_flight_limit
from bench.plan import Job
from bench.store import Store
from tests.conftest import tiny_scenario

SIG = Path(__file__).resolve().parents[1] / "plugins" / "sig.py"


def _scenario(name: str) -> dict:
    return tiny_scenario(
        name=name,
        plugins=[str(SIG)],
        attacks=[{"name": "sig", "delta": 0.2, "target": 1}],
        defenses=[{"name": "fine-pruning", "rate": 0.2, "epochs": 1}],
    )


def _records(root: Path) -> dict[str, tuple[str, dict]]:
    return {i: (r.kind, r.metrics) for i, r in Store(root).records().items()}


@pytest.mark.slow
def test_two_workers_record_what_one_process_records(write_scenario, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two workers on 2 cores: the same float sums, the same models
    try:
        one = runner.run(write_scenario(_scenario("one"), "one.yaml"), tmp_path / "runs", tmp_path / "reports")
    finally:
        torch.set_num_threads(threads)
    two = runner.run(write_scenario(_scenario("two"), "two.yaml"), tmp_path / "runs", tmp_path / "reports",
                     workers=2)
    assert not two.summary.skipped and sorted(two.summary.ran) == sorted(one.summary.ran)
    # kinds: 2 trainings (clean, sig), 1 defense, evaluations of every model and every defended stage
    kinds = [r[0] for r in _records(tmp_path / "runs" / "two").values()]
    assert kinds.count("train") == 2 and kinds.count("defend") == 1 and kinds.count("evaluate") == 4
    # every job ran after its inputs: its dependencies were recorded first
    order = {job_id: i for i, job_id in enumerate(two.summary.ran)}
    plan = runner.prepare(tmp_path / "two.yaml").plan
    for job in plan.jobs:
        assert all(order[d] < order[job.id] for d in job.deps), job.kind
    # the same seeded work gives the same metrics (one CPU thread each; allow float noise)
    first, second = _records(tmp_path / "runs" / "one"), _records(tmp_path / "runs" / "two")
    assert first.keys() == second.keys()
    for job_id, (kind, metrics) in first.items():
        for name in ("ba", "asr"):
            if name in metrics:
                assert second[job_id][1][name] == pytest.approx(metrics[name], abs=0.02), (kind, name)
    assert "sig" in (tmp_path / "reports" / "two.md").read_text()
    again = runner.run(tmp_path / "two.yaml", tmp_path / "runs", tmp_path / "reports", workers=2)
    assert again.summary.ran == [] and again.summary.skipped == len(plan.jobs)


def test_each_worker_gets_a_device():
    assert worker_devices(torch.device("cpu"), 3) == ["cpu", "cpu", "cpu"]
    assert worker_devices(torch.device("cuda:1"), 2) == ["cuda:1", "cuda:1"]


class InFlight(SilentReporter):
    """Counts the jobs submitted and not yet finished: the most there ever were."""

    def __init__(self) -> None:
        self.now = self.most = 0

    def job_started(self, job: Job) -> None:
        self.now += 1
        self.most = max(self.most, self.now)

    def job_finished(self, job: Job, seconds: float) -> None:
        self.now -= 1


def test_ray_keeps_twice_the_clusters_slots_in_flight():
    assert in_flight_limit({"CPU": 8.0}, cpus_per_job=1.0, gpus_per_job=0.0) == 16
    assert in_flight_limit({"CPU": 8.0, "GPU": 2.0}, cpus_per_job=1.0, gpus_per_job=1.0) == 4
    assert in_flight_limit({"CPU": 8.0, "GPU": 2.0}, cpus_per_job=1.0, gpus_per_job=0.5) == 8
    assert in_flight_limit({"CPU": 0.5}, cpus_per_job=1.0, gpus_per_job=0.0) == 1
    with pytest.raises(BenchError, match="the Ray cluster has no GPU"):
        in_flight_limit({"CPU": 8.0}, cpus_per_job=1.0, gpus_per_job=1.0)


@pytest.mark.slow
def test_a_local_ray_cluster_runs_and_resumes_the_plan(write_scenario, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")  # no network calls from the test cluster
    one = runner.run(write_scenario(_scenario("one"), "one.yaml"), tmp_path / "runs", tmp_path / "reports")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # a real local cluster
    in_flight = InFlight()
    try:  # one slot of 2 CPUs: the worker computes with as many threads as the one-process run
        on_ray = runner.run(write_scenario(_scenario("ray"), "ray.yaml"), tmp_path / "runs",
                            tmp_path / "reports", executor="ray", reporter=in_flight, cpus_per_job=2.0)
        assert sorted(on_ray.summary.ran) == sorted(one.summary.ran)
        assert in_flight.most == 2  # twice the cluster's one slot, never every ready job at once
        records = Store(tmp_path / "runs" / "ray").records()
        assert all(r.device == "cpu" for r in records.values())
        assert all((tmp_path / "runs" / "ray" / r.artifact).is_file() for r in records.values() if r.artifact)
        first = _records(tmp_path / "runs" / "one")
        for job_id, (kind, metrics) in first.items():
            if "ba" in metrics:
                assert records[job_id].metrics["ba"] == pytest.approx(metrics["ba"], abs=0.02), kind
        again = runner.run(tmp_path / "ray.yaml", tmp_path / "runs", tmp_path / "reports", executor="ray")
        assert again.summary.ran == [] and again.summary.skipped == len(records)
    finally:
        ray.shutdown()
    assert "sig" in (tmp_path / "reports" / "ray.md").read_text()


def test_unknown_executor_and_stray_address_exit_2(write_scenario, tmp_path):
    from typer.testing import CliRunner

    from bench.cli import app

    path = write_scenario(_scenario("bad"))
    for extra, message in ((["--executor", "slurm"], "--executor: must be local or ray"),
                           (["--address", "auto"], "--address: only --executor ray"),
                           (["--executor", "ray", "--workers", "2"], "--workers: the Ray executor")):
        result = CliRunner().invoke(app, ["run", str(path), "--runs-dir", str(tmp_path / "runs"), *extra])
        assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "runs" / "bad").exists()


def test_out_of_memory_outside_a_job_is_one_line_naming_it():
    from bench.execute.pool import out_of_memory_message

    job = Job("tr-1", "train", {}, ())
    exc = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
    message = out_of_memory_message(job, exc, "its worker")
    assert message.startswith("job tr-1 (train): its worker ran out of memory outside the job itself "
                              "(CUDA out of memory. Tried to allocate 2.00 GiB)")
    assert "--workers" in message and "\n" not in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_machine_without_it_is_a_clear_error(write_scenario, tmp_path):
    from typer.testing import CliRunner

    from bench.cli import app

    path = write_scenario(_scenario("nocuda"))
    for device in ("cuda", "cuda:1"):
        result = CliRunner().invoke(app, ["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--device", device,
                                          "--workers", "2"])
        assert result.exit_code == 2 and f"--device {device}: PyTorch sees no CUDA device" in result.output
    assert not (tmp_path / "runs" / "nocuda").exists()

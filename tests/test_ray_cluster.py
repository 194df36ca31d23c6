"""``bench run --executor ray`` on a real local Ray cluster that declares two GPUs it does not have: the
device is resolved against the cluster, jobs run on long-lived workers that load their data once,
fractional GPU shares put several workers on one GPU, relative data roots are the driver's, and a
worker killed mid-run costs a retry, not the run."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from bench import runner
from bench.errors import BenchError
from bench.execute.local import SilentReporter
from bench.execute.ray_cluster import check_shares, cluster_device, worker_count
from bench.execute.ray_worker import worker_dataset_spec
from bench.plan import Job
from bench.store import Store
from tests.conftest import tiny_scenario
from tests.ondisk import write_mnist

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")


def test_auto_and_cuda_resolve_against_the_cluster_not_the_driver():
    assert cluster_device("auto", {"CPU": 8.0, "GPU": 2.0}) == torch.device("cuda")
    assert cluster_device("auto", {"CPU": 8.0}) == torch.device("cpu")
    assert cluster_device("cuda", {"CPU": 8.0, "GPU": 1.0}) == torch.device("cuda")
    with pytest.raises(BenchError, match=r"--device cuda: the Ray cluster has no GPU \(8 CPUs\)"):
        cluster_device("cuda", {"CPU": 8.0})
    with pytest.raises(BenchError, match="use --device cuda"):
        cluster_device("cuda:1", {"GPU": 2.0})
    with pytest.raises(BenchError, match="must be auto, cpu or cuda"):
        cluster_device("mps", {"GPU": 2.0})


def test_shares_and_worker_count():
    assert worker_count({"CPU": 2.0, "GPU": 2.0}, 0.5, 0.5) == 4  # four workers, two per GPU
    assert worker_count({"CPU": 2.0, "GPU": 2.0}, 2.0, 0.25) == 1  # CPUs bound it
    assert worker_count({"CPU": 16.0, "GPU": 1.0}, 1.0, 0.25) == 4
    check_shares(1.0, 0.25)
    check_shares(1.0, 2.0)
    with pytest.raises(BenchError, match="--gpus-per-job: must be 0, a fraction up to 1 or a whole number"):
        check_shares(1.0, 1.5)
    with pytest.raises(BenchError, match="--cpus-per-job: must be more than 0"):
        check_shares(0.0, None)
    with pytest.raises(BenchError, match="--gpus-per-job: CUDA jobs need a share of a GPU, got 0"):
        check_shares(1.0, 0.0, torch.device("cuda"))
    check_shares(1.0, 0.5, torch.device("cpu"))  # reserving GPU shares for CPU jobs limits how many run


def test_a_relative_data_root_is_the_drivers_and_never_downloads_on_a_worker():
    spec = {"name": "mnist", "root": "data", "download": True, "image_size": 16}
    assert worker_dataset_spec(spec, "/shared/study") == {**spec, "root": "/shared/study/data", "download": False}
    assert worker_dataset_spec({"name": "x", "root": "/abs"}, "/b") == {"name": "x", "root": "/abs"}
    assert worker_dataset_spec({"name": "digits", "image_size": 16}, "/b") == {"name": "digits", "image_size": 16}


def test_share_options_need_the_ray_executor(write_scenario, tmp_path):
    from typer.testing import CliRunner

    from bench.cli import app

    path = write_scenario(tiny_scenario(name="shares"))
    for extra, message in ((["--gpus-per-job", "0.5"], "--gpus-per-job: only --executor ray"),
                           (["--cpus-per-job", "2"], "--cpus-per-job: only --executor ray"),
                           (["--executor", "ray", "--gpus-per-job", "1.5"], "--gpus-per-job: must be 0")):
        result = CliRunner().invoke(app, ["run", str(path), "--runs-dir", str(tmp_path / "runs"), *extra])
        assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "runs" / "shares").exists()


# -- on a local cluster ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    """One real local Ray cluster for this module: 2 CPUs and 2 declared (absent) GPUs."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network calls from the test cluster
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _mnist_scenario(name: str) -> dict:
    """Tiny pMoE on MNIST files under the relative root ``data`` (of the test's working folder)."""
    return tiny_scenario(name=name, poison_rates=[0.1, 0.2],
                         datasets=[{"name": "mnist", "root": "data", "download": True, "image_size": 16}])


def _clean_only(name: str, **overrides: object) -> dict:
    """Two jobs: one clean training and its evaluation."""
    return tiny_scenario(name=name, attacks=[], **overrides)


class GpuWatch(SilentReporter):
    """Reads the cluster's unreserved GPUs whenever a job finishes: the least it saw."""

    def __init__(self) -> None:
        self.least_free = float("inf")

    def job_finished(self, job: Job, seconds: float) -> None:
        self.least_free = min(self.least_free, ray.available_resources().get("GPU", 0.0))


def test_fractional_gpu_workers_reuse_their_process_and_data(cluster, write_scenario, tmp_path, monkeypatch):
    write_mnist(tmp_path / "data")
    monkeypatch.chdir(tmp_path)  # the cluster's workers started elsewhere: `data` must be the driver's
    watch = GpuWatch()
    path = write_scenario(_mnist_scenario("frac"), "frac.yaml")
    out = runner.run(path, "runs", "reports", device="cpu", executor="ray", reporter=watch, cpus_per_job=0.5,
                     gpus_per_job=0.5, artifacts_dir=tmp_path / "shared")
    jobs = len(out.summary.ran)
    assert jobs == len(runner.prepare(path).plan.jobs) > 4 and not out.failed
    assert watch.least_free == 0.0  # four workers of half a GPU each held both declared GPUs at once
    workers = out.summary.workers
    pids = {w["pid"] for w in workers.values()}
    assert len(pids) < jobs  # some worker ran several jobs in one process
    by_pid = {pid: max(w["jobs"] for w in workers.values() if w["pid"] == pid) for pid in pids}
    loads = {pid: max(w["data_loads"] for w in workers.values() if w["pid"] == pid) for pid in pids}
    assert sum(by_pid.values()) == jobs and set(loads.values()) == {1}  # data loaded once per worker
    store = Store(tmp_path / "runs" / "frac")
    records = store.records()
    assert all(r.environment["device_type"] == "cpu" and r.environment["torch"] == torch.__version__
               for r in records.values())
    # model files went to the shared folder with their checksums; the database stayed in runs/
    assert store.artifacts == (tmp_path / "shared" / "frac").resolve()
    assert sorted(p.name for p in store.artifacts.glob("*.pt")) == sorted(
        f"{i}.pt" for i, r in records.items() if r.artifact)
    assert len(list(store.artifacts.glob("*.pt.sha256"))) == sum(1 for r in records.values() if r.artifact)
    assert not (tmp_path / "runs" / "frac" / "artifacts").exists()


def _kill_first_busy_worker(killed: list[int], stop: threading.Event) -> None:
    """Kill (SIGKILL) the first Ray job worker seen running a job: a preempted node, an OOM kill."""
    while not stop.is_set() and not killed:
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if "JobWorker.run" in cmd:
                os.kill(proc.info["pid"], signal.SIGKILL)
                killed.append(proc.info["pid"])
                return
        time.sleep(0.02)


def test_a_worker_killed_mid_run_is_replaced_and_its_job_sent_again(cluster, write_scenario, tmp_path):
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_first_busy_worker, args=(killed, stop), daemon=True)
    killer.start()
    try:
        write_mnist(tmp_path / "data")
        scenario = _clean_only("kill", datasets=[{"name": "mnist", "root": str(tmp_path / "data"), "image_size": 16}])
        out = runner.run(write_scenario(scenario, "kill.yaml"), tmp_path / "runs", tmp_path / "reports",
                         executor="ray", cpus_per_job=2.0)
    finally:
        stop.set()
        killer.join(5)
    assert killed and len(out.summary.retried) >= 1
    jobs = len(runner.prepare(tmp_path / "kill.yaml").plan.jobs)
    assert len(out.summary.ran) == jobs and not out.failed
    assert killed[0] not in {w["pid"] for w in out.summary.workers.values()}
    assert len(Store(tmp_path / "runs" / "kill").records()) == jobs


def test_auto_on_a_cluster_with_gpus_means_cuda_jobs(cluster, write_scenario, tmp_path):
    """The declared GPUs make ``auto`` CUDA; this machine's torch has no CUDA, so the workers say so."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the workers would run")
    with pytest.raises(BenchError, match="PyTorch sees no CUDA device here"):
        runner.run(write_scenario(_clean_only("auto", device="auto"), "auto.yaml"), tmp_path / "runs",
                   tmp_path / "reports", executor="ray", cpus_per_job=2.0)
    assert Store(tmp_path / "runs" / "auto").get_meta("device") == "cuda"


CRASHING_MODEL = '''
import torch
from torch import nn

from bench.models.base import BenchModel
from bench.registry import register_model


class Crashing(BenchModel):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Linear(1, 1)

    def forward_routing(self, x):
        raise ValueError("a bug in this model")


@register_model("crashing")
def crashing(*, input_shape, num_classes, mean, std) -> Crashing:
    """A model whose forward pass raises."""
    return Crashing()
'''


def test_a_job_that_raises_stops_the_run_naming_it_and_is_not_retried(cluster, write_scenario, tmp_path):
    plugin = tmp_path / "crashing.py"
    plugin.write_text(CRASHING_MODEL)
    scenario = _clean_only("crash", plugins=[str(plugin)], models=[{"name": "crashing"}])
    path = write_scenario(scenario, "crash.yaml")
    train = next(job for job in runner.prepare(path).plan.jobs if job.kind == "train")
    with pytest.raises(BenchError, match=rf"job {train.id} \(train\) failed on the cluster: "
                                         r"ValueError\('a bug in this model'\)"):
        runner.run(path, tmp_path / "runs", tmp_path / "reports", executor="ray", cpus_per_job=2.0)
    assert Store(tmp_path / "runs" / "crash").done_ids() == set()

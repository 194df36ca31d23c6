"""The results store: rows, artifacts, safe loading, several writers, unreadable stores."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from bench import __version__
from bench.errors import StoreError
from bench.provenance import environment, mixed_hardware_warning
from bench.store import ArtifactFiles, JobRecord, Store, open_existing


def test_record_roundtrip_with_provenance(tmp_path):
    store = Store(tmp_path / "run")
    store.record("tr-1", "train", {"seed": 0}, [], {"ba": 0.9}, 1.5, "cpu")
    rec = store.get("tr-1")
    assert rec is not None and rec.metrics == {"ba": 0.9} and rec.spec == {"seed": 0}
    assert rec.version == __version__ and rec.git_commit and rec.device == "cpu"
    assert store.done_ids() == {"tr-1"}
    assert Store(tmp_path / "run").done_ids() == {"tr-1"}  # persisted


def test_artifacts_are_atomic_and_loaded_safely(tmp_path):
    store = Store(tmp_path / "run")
    state = {"w": torch.arange(6.0).view(2, 3)}
    name = store.save_state("tr-1", state)
    store.record("tr-1", "train", {}, [], {}, 0.1, "cpu", name)
    assert not list(store.artifacts.glob("*.tmp*"))
    loaded = store.load_state("tr-1")
    assert torch.equal(loaded["w"], state["w"])
    with pytest.raises(StoreError, match="no stored artifact"):
        store.load_state("missing")


def test_unreadable_store_is_a_clear_error(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    (root / "results.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="results.db"):
        Store(root)
    with pytest.raises(StoreError, match="no results store here"):
        open_existing(tmp_path / "elsewhere")


def _writer(root: str, start: int) -> None:
    store = Store(root)
    for i in range(start, start + 25):
        store.record(f"ev-{i}", "evaluate", {"i": i}, [], {"ba": i / 100}, 0.0, "cpu")


def test_several_writer_processes_keep_every_row(tmp_path):
    root = str(tmp_path / "run")
    Store(root)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(root, k * 25)) for k in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert Store(root).done_ids() == {f"ev-{i}" for i in range(75)}


# -- environment column, old stores ---------------------------------------------------------------------

OLD_SCHEMA = """
CREATE TABLE jobs (id TEXT PRIMARY KEY, kind TEXT NOT NULL, spec TEXT NOT NULL, deps TEXT NOT NULL,
    metrics TEXT NOT NULL, artifact TEXT, seconds REAL NOT NULL, device TEXT NOT NULL, version TEXT NOT NULL,
    git_commit TEXT NOT NULL, finished_at REAL NOT NULL);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO jobs VALUES ('tr-old', 'train', '{}', '[]', '{"final_loss": 0.5}', NULL, 1.0, 'cuda', '0.1', 'abc', 0.0);
"""


def test_a_store_from_before_the_environment_column_stays_readable(tmp_path):
    import sqlite3

    root = tmp_path / "old"
    root.mkdir()
    conn = sqlite3.connect(root / "results.db")
    conn.executescript(OLD_SCHEMA)
    conn.close()
    store = Store(root)  # migrates: adds the column, keeps the row
    assert store.get("tr-old").environment == {} and store.get("tr-old").device == "cuda"
    env = environment(torch.device("cpu"))
    store.record("tr-new", "train", {}, [], {}, 0.1, "cpu", environment=env)
    again = Store(root).records()
    assert again["tr-new"].environment == env and again["tr-old"].metrics == {"final_loss": 0.5}


def test_environment_names_the_cpu_and_torch():
    env = environment(torch.device("cpu"))
    assert env["device_type"] == "cpu" and env["torch"] == torch.__version__ and env["cpu"]
    assert env["deterministic"] is torch.are_deterministic_algorithms_enabled()


def _row(job_id: str, device: str, env: dict) -> JobRecord:
    return JobRecord(job_id, "evaluate", {}, [], {"ba": 0.9}, None, 0.1, device, "0", "c", 0.0, env)


def test_rows_of_cpus_and_gpus_mixed_in_one_store_give_a_warning():
    cpu = _row("a", "cpu", {"device_type": "cpu", "cpu": "Xeon"})
    h100 = _row("b", "cuda:0", {"device_type": "cuda", "gpu": "NVIDIA H100"})
    a100 = _row("c", "cuda:0", {"device_type": "cuda", "gpu": "NVIDIA A100"})
    old_gpu = _row("d", "cuda", {})  # stored before the environment column: its device string decides
    assert mixed_hardware_warning([cpu, cpu]) is None and mixed_hardware_warning([h100, h100]) is None
    warning = mixed_hardware_warning([cpu, cpu, h100])
    assert warning is not None and "ran on CPUs and GPUs: 2 on cpu (Xeon), 1 on gpu (NVIDIA H100)" in warning
    assert "several GPU models" in mixed_hardware_warning([h100, a100])
    assert "CPUs and GPUs" in mixed_hardware_warning([cpu, old_gpu])


# -- artifacts that are whole, on storage that may show partial files ------------------------------------

@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setattr(ArtifactFiles, "FIRST_WAIT_S", 0.01)


def test_a_partial_artifact_is_detected_not_loaded(tmp_path, quick_retries):
    store = Store(tmp_path / "run", artifacts_dir=tmp_path / "shared" / "run")
    name = store.save_state("tr-1", {"w": torch.ones(100)})
    store.record("tr-1", "train", {}, [], {}, 0.1, "cpu", name)
    path = store.files.path("tr-1")
    assert path.parent == (tmp_path / "shared" / "run").resolve() and store.check_input("tr-1") is None
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])  # what a reader sees of a file still being copied
    with pytest.raises(StoreError, match=r"artifact of job tr-1 is not whole \(\d+ bytes, its checksum file says"):
        store.load_state("tr-1")
    assert "bytes, its checksum file says" in store.check_input("tr-1")
    path.write_bytes(whole[:-1] + bytes([whole[-1] ^ 1]))  # same size, other bytes
    assert "SHA-256 differs" in store.check_input("tr-1")
    # the store remembers where its artifacts are: a later open without the option finds them
    assert Store(tmp_path / "run").artifacts == path.parent


def test_a_reader_waits_for_a_file_that_is_still_arriving(tmp_path, quick_retries):
    import threading

    store = Store(tmp_path / "run")
    state = {"w": torch.arange(1000.0)}
    store.record("tr-1", "train", {}, [], {}, 0.1, "cpu", store.save_state("tr-1", state))
    path = store.files.path("tr-1")
    whole = path.read_bytes()
    path.write_bytes(whole[:100])
    finish = threading.Timer(0.05, path.write_bytes, args=(whole,))  # the rest lands a moment later
    finish.start()
    try:
        assert torch.equal(store.load_state("tr-1")["w"], state["w"])
    finally:
        finish.join()


def test_an_artifact_without_a_checksum_file_still_loads(tmp_path):
    store = Store(tmp_path / "run")
    store.record("tr-1", "train", {}, [], {}, 0.1, "cpu", store.save_state("tr-1", {"w": torch.ones(3)}))
    store.files.path("tr-1").with_name("tr-1.pt.sha256").unlink()  # a store written before checksums
    assert torch.equal(store.load_state("tr-1")["w"], torch.ones(3)) and store.check_input("tr-1") is None
    assert not list(store.artifacts.glob(".*tmp*"))


def test_a_broken_input_is_forgotten_so_its_job_runs_again(write_scenario, tmp_path):
    from bench import runner
    from tests.conftest import tiny_scenario

    plan = runner.prepare(write_scenario(tiny_scenario(name="broken", attacks=[]))).plan
    train = next(job for job in plan.jobs if job.kind == "train")
    store = Store(tmp_path / "runs" / "broken")
    store.record(train.id, "train", train.spec, [], {}, 0.1, "cpu", store.save_state(train.id, {"w": torch.ones(9)}))
    assert runner.regenerate_broken_inputs(plan, store) == []
    store.files.path(train.id).write_bytes(b"half")
    assert runner.regenerate_broken_inputs(plan, store) == [train.id] and store.done_ids() == set()


def test_fresh_removes_artifacts_kept_outside_the_store(tmp_path):
    from bench.store import remove_store

    shared = tmp_path / "shared" / "run"
    store = Store(tmp_path / "run", artifacts_dir=shared)
    name = store.save_state("tr-1", {"w": torch.ones(2)})
    store.record("tr-1", "train", {}, [], {"ba": 0.5}, 1.0, "cpu", name)
    (shared / "notes.txt").write_text("the user's")
    torch.save({"w": torch.zeros(1)}, shared / "my_resnet.pt")  # a model file the store did not write
    torch.save({"w": torch.zeros(1)}, shared / "tr-2.pt")  # another store's job in the same folder
    remove_store(tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert sorted(p.name for p in shared.iterdir()) == [".pmoe-bench-store", "my_resnet.pt", "notes.txt", "tr-2.pt"]
    for extra in ("notes.txt", "my_resnet.pt", "tr-2.pt"):
        (shared / extra).unlink()
    other = Store(tmp_path / "run", artifacts_dir=shared)
    other.record("tr-3", "train", {}, [], {"ba": 0.5}, 1.0, "cpu", other.save_state("tr-3", {"w": torch.ones(1)}))
    remove_store(tmp_path / "run")
    assert not shared.exists()  # only its own files and the marker were left: the folder goes too

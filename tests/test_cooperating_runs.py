"""Cooperating runs: several ``bench run`` processes on one store compute each job once (claims with leases
in the store), take over the jobs of a dead claimant, respect a live claim; a broken model file is found
against the checksum its row keeps, named, and recomputed with what was computed from it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import runner
from bench.execute.claims import forget_broken
from bench.execute.local import execute
from bench.store import HOST, ArtifactFiles, BrokenArtifact, Store
from tests.conftest import tiny_scenario

#: Seconds: short, so the tests exercise the renewal (a job outlives its lease unless the heartbeat works).
LEASE = {"PMOE_BENCH_LEASE_S": "3", "PMOE_BENCH_HEARTBEAT_S": "0.5", "PMOE_BENCH_POLL_S": "0.3"}


def _bench_run(scenario: Path, tmp_path: Path, tag: str, **env: str) -> tuple[subprocess.Popen, Path]:
    """Start ``python -m bench.cli run`` (one thread: two cores are shared); its stderr goes to a file."""
    err = tmp_path / f"{tag}.err"
    full = {**os.environ, "OMP_NUM_THREADS": "1", **LEASE, **env}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.cli", "run", str(scenario), "--runs-dir", str(tmp_path / "runs"),
         "--reports-dir", str(tmp_path / "reports")],
        stdout=subprocess.DEVNULL, stderr=err.open("w"), env=full, cwd=tmp_path,
    )
    return proc, err


def _ran(text: str) -> int:
    match = re.search(r"ran (\d+) jobs in", text)
    assert match, text
    return int(match.group(1))


def _owner_pid(computed_by: str) -> int:
    host, pid, _token = computed_by.split(":")
    assert host == HOST
    return int(pid)


@pytest.mark.slow
def test_two_processes_on_one_store_compute_each_job_once(write_scenario, tmp_path):
    path = write_scenario(tiny_scenario(name="coop"), "coop.yaml")
    plan = runner.prepare(path).plan
    procs = [_bench_run(path, tmp_path, tag) for tag in ("a", "b")]
    for proc, err in procs:
        assert proc.wait(timeout=300) == 0, err.read_text()
    logs = [err.read_text() for _, err in procs]
    records = Store(tmp_path / "runs" / "coop").records()
    assert set(records) == {job.id for job in plan.jobs}
    # every job computed once: the processes' counts add up to the plan, each row names one of them
    assert sum(_ran(log) for log in logs) == len(plan.jobs), logs
    by_pid = {proc.pid: 0 for proc, _ in procs}
    for record in records.values():
        by_pid[_owner_pid(record.computed_by)] += 1
    assert [by_pid[proc.pid] for proc, _ in procs] == [_ran(log) for log in logs]
    # model files carry their checksum in their row; nothing is left claimed; the report is whole
    trains = [r for r in records.values() if r.kind == "train"]
    assert all(r.checksums == {f"{r.id}.pt": r.checksums[f"{r.id}.pt"]} for r in trains)
    assert Store(tmp_path / "runs" / "coop").claims() == {}
    report = (tmp_path / "reports" / "coop.md").read_text()
    again = runner.render(Store(tmp_path / "runs" / "coop"), "md", relative_to=(tmp_path / "reports").resolve(),
                          picture_dir=tmp_path / "reports" / "coop")

    def body(text: str) -> list[str]:
        return [line for line in text.splitlines() if not line.startswith("Generated ")]

    assert "badnets" in report and body(report) == body(again)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _claim_row(store: Store, job_id: str, host: str, pid: int, token: str, expires_in: float) -> None:
    import sqlite3

    now = time.time()
    conn = sqlite3.connect(store.db_path)
    with conn:
        conn.execute("INSERT INTO claims VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     (job_id, f"{host}:{pid}:{token}", host, pid, token, now - 100, now - 100, now + expires_in))
    conn.close()


@pytest.mark.slow
def test_stale_claims_are_taken_over_naming_their_owner(write_scenario, tmp_path):
    path = write_scenario(tiny_scenario(name="stale"), "stale.yaml")
    plan = runner.prepare(path).plan
    clean, attacked = [job for job in plan.jobs if job.kind == "train"]
    store = Store(tmp_path / "runs" / "stale")
    dead = _dead_pid()
    _claim_row(store, clean.id, "other-node", 4242, "gone", expires_in=-30)  # a crashed machine's, lease over
    _claim_row(store, attacked.id, HOST, dead, "killed", expires_in=600)  # a killed process here: lease still on
    proc, err = _bench_run(path, tmp_path, "one")
    assert proc.wait(timeout=300) == 0
    log = err.read_text()
    assert f"taking over job {clean.id} (train) from other-node pid 4242 (token gone): its lease expired" in log
    assert f"taking over job {attacked.id} (train) from {HOST} pid {dead} (token killed): its process is gone" in log
    records = store.records()
    assert set(records) == {job.id for job in plan.jobs} and store.claims() == {}
    assert {_owner_pid(r.computed_by) for r in records.values()} == {proc.pid}


@pytest.mark.slow
def test_a_live_claim_is_left_to_its_owner_until_released(write_scenario, tmp_path):
    path = write_scenario(tiny_scenario(name="live", attacks=[]), "live.yaml")
    plan = runner.prepare(path).plan
    train = next(job for job in plan.jobs if job.kind == "train")
    store = Store(tmp_path / "runs" / "live")
    owner = f"{HOST}:{os.getpid()}:test"
    assert store.claim(train.id, owner, "test", 3.0).state == "claimed"  # held by this (live) test process
    proc, err = _bench_run(path, tmp_path, "waiter")
    deadline = time.time() + 120
    while "waiting for 1 job(s)" not in err.read_text():
        assert proc.poll() is None and time.time() < deadline, err.read_text()
        assert store.renew(owner, [train.id], 3.0) == []  # our heartbeat: the lease is short, kept alive
        time.sleep(0.3)
    for _ in range(8):  # it waits, well past its own lease length, and computes nothing of ours
        time.sleep(0.5)
        assert store.renew(owner, [train.id], 3.0) == []
    assert proc.poll() is None and store.done_ids() == set()
    released = time.time()
    store.release(owner, [train.id])
    assert proc.wait(timeout=300) == 0
    records = store.records()
    assert set(records) == {job.id for job in plan.jobs} and records[train.id].finished_at > released
    assert _owner_pid(records[train.id].computed_by) == proc.pid and _ran(err.read_text()) == len(plan.jobs)


# -- model files checked against the checksum their row keeps --------------------------------------------

@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setattr(ArtifactFiles, "FIRST_WAIT_S", 0.01)


def test_the_row_is_the_source_of_truth_for_a_files_checksum(tmp_path, quick_retries):
    store = Store(tmp_path / "run")
    artifact, checksums = store.save_outputs("tr-1", {"w": torch.ones(50)}, {"pruned": {"w": torch.zeros(5)}})
    store.record("tr-1", "train", {}, [], {}, 0.1, "cpu", artifact, checksums=checksums)
    assert set(store.get("tr-1").checksums) == {"tr-1.pt", "tr-1.pruned.pt"}
    assert store.check_input("tr-1") is None and store.check_input("tr-1", "pruned") is None
    path = store.files.path("tr-1")
    (tmp_path / "elsewhere").mkdir()
    other = ArtifactFiles(tmp_path / "elsewhere")
    forged = other.save("tr-1", {"w": torch.full((50,), 2.0)})  # a whole file with its own checksum file
    path.write_bytes(forged.read_bytes())
    path.with_name("tr-1.pt.sha256").write_bytes(forged.with_name("tr-1.pt.sha256").read_bytes())
    assert "differs from the one stored with its row" in store.check_input("tr-1")
    with pytest.raises(BrokenArtifact) as caught:
        store.load_state("tr-1")
    assert caught.value.job_id == "tr-1" and caught.value.path == str(path)
    store.files.path("tr-1.pruned").unlink()
    assert "missing" in store.check_input("tr-1", "pruned")


def test_claims_are_atomic_renewed_released_and_taken_over(tmp_path):
    store = Store(tmp_path / "run")
    a, b = f"{HOST}:{os.getpid()}:a", f"{HOST}:{os.getpid()}:b"
    assert store.claim("tr-1", a, "a", 60).state == "claimed"
    held = store.claim("tr-1", b, "b", 60)
    assert held.state == "held" and held.previous.owner == a
    assert store.claim("tr-1", a, "a", 60).state == "claimed"  # its own claim: renewed
    assert store.renew(a, ["tr-1"], 0.05) == []
    time.sleep(0.1)
    taken = store.claim("tr-1", b, "b", 60)
    assert taken.state == "claimed" and taken.previous.owner == a and "lease expired" in taken.reason
    assert store.renew(a, ["tr-1"], 60) == ["tr-1"]  # a lost it
    store.record("tr-1", "train", {}, [], {}, 0.1, "cpu", computed_by=b)
    assert store.claims() == {} and store.claim("tr-1", a, "a", 60).state == "done"
    store.claim("tr-2", a, "a", 60)
    store.claim("tr-3", a, "a", 60)
    assert store.claim("tr-4", b, "b", 60).state == "claimed"
    # a renewal extends the owner's own claims only
    before = store.claims()["tr-4"].expires_at
    assert store.renew(a, ["tr-2", "tr-3"], 600) == []
    assert store.claims()["tr-4"].expires_at == before and store.claims()["tr-2"].expires_at > before
    # a release drops the owner's claims only: the named ones, then all the rest; never another owner's
    store.release(a, ["tr-2", "tr-4"])
    assert set(store.claims()) == {"tr-3", "tr-4"} and store.claims()["tr-4"].owner == b
    store.release(a)
    assert set(store.claims()) == {"tr-4"}
    store.release(b)
    assert store.claims() == {}


def test_a_file_broken_under_a_running_job_is_recomputed_with_what_was_computed_from_it(
        write_scenario, tmp_path, quick_retries, capfd, one_thread):
    path = write_scenario(tiny_scenario(name="broken", attacks=[]), "broken.yaml")
    first = runner.run(path, tmp_path / "runs", tmp_path / "reports")
    store, plan = first.store, runner.prepare(path).plan
    train, evaluation = plan.jobs
    assert train.kind == "train" and sorted(first.summary.ran) == sorted(j.id for j in plan.jobs)
    before = store.get(train.id).checksums
    # broken after the run's own check (regenerate_broken_inputs): the evaluation finds it when it loads
    file = store.files.path(train.id)
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))
    store.delete([evaluation.id])
    capfd.readouterr()
    summary = execute(plan, store, torch.device("cpu"))
    message = capfd.readouterr().err
    assert (f"job {evaluation.id} (evaluate) cannot read the model file of job {train.id}: {file}: its SHA-256 "
            f"differs from the one stored with its row; recomputing job {train.id}") in message
    assert summary.ran == [train.id, evaluation.id] and store.get(train.id).checksums == before  # seeded: same
    assert store.check_input(train.id) is None


@pytest.mark.slow
def test_flipped_and_deleted_model_files_are_recomputed_and_the_run_succeeds(write_scenario, tmp_path, one_thread):
    path = write_scenario(tiny_scenario(name="damaged"), "damaged.yaml")
    runner.run(path, tmp_path / "runs", tmp_path / "reports")
    plan = runner.prepare(path).plan
    store = Store(tmp_path / "runs" / "damaged")
    clean, attacked = [job for job in plan.jobs if job.kind == "train"]
    flipped = store.files.path(clean.id)
    data = bytearray(flipped.read_bytes())
    data[-10] ^= 0x01
    flipped.write_bytes(bytes(data))
    store.files.path(attacked.id).unlink()
    # the report needs every evaluation: forgetting one of each model's makes the models needed again
    needed = [next(job.id for job in plan.jobs if train.id in job.deps) for train in (clean, attacked)]
    store.delete(needed)
    proc, err = _bench_run(path, tmp_path, "repair")
    assert proc.wait(timeout=300) == 0
    log = err.read_text()
    assert f"the model file of job {clean.id} (train) is broken: {flipped}: its SHA-256 differs" in log
    assert f"the model file of job {attacked.id} (train) is broken: {store.files.path(attacked.id)}: missing" in log
    assert "recomputed 2 stored job(s)" in log
    dependents = [job.id for job in plan.jobs if job.deps]
    assert _ran(log) == 2 + len(dependents)  # both models and every job computed from them
    assert all(store.check_input(t.id) is None for t in (clean, attacked))
    assert set(store.done_ids()) == {job.id for job in plan.jobs}
    assert forget_broken(plan, store, "tr-unknown") == []


def test_cooperation_settings_come_from_the_environment(monkeypatch):
    from bench.errors import BenchError
    from bench.execute.claims import settings

    monkeypatch.delenv("PMOE_BENCH_LEASE_S", raising=False)
    monkeypatch.delenv("PMOE_BENCH_HEARTBEAT_S", raising=False)
    monkeypatch.delenv("PMOE_BENCH_POLL_S", raising=False)
    assert settings() == (120.0, 30.0, 2.0)
    monkeypatch.setenv("PMOE_BENCH_LEASE_S", "8")
    assert settings()[:2] == (8.0, 2.0)
    monkeypatch.setenv("PMOE_BENCH_HEARTBEAT_S", "9")
    with pytest.raises(BenchError, match="must be shorter than the lease"):
        settings()
    monkeypatch.setenv("PMOE_BENCH_HEARTBEAT_S", "x")
    with pytest.raises(BenchError, match="PMOE_BENCH_HEARTBEAT_S: must be a number"):
        settings()

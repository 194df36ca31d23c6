"""The results store: rows, artifacts, safe loading, several writers, unreadable stores."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from bench import __version__
from bench.errors import StoreError
from bench.store import Store, open_existing


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

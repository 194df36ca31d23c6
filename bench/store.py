"""The results store: ``runs/<name>/results.db`` (SQLite, WAL) plus ``runs/<name>/artifacts/``.

One row per finished job, written in one transaction after its artifact is in place, so a crash or
Ctrl-C loses at most the job in flight and the next run resumes from the rows present. Artifacts are
written to a temporary file and renamed (atomic on POSIX), and loaded with ``weights_only=True``.
Each row carries the fully resolved spec, the metrics, timings, device, package version and git commit,
so every number can be traced and reproduced.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench import __version__
from bench.errors import StoreError

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    spec        TEXT NOT NULL,
    deps        TEXT NOT NULL,
    metrics     TEXT NOT NULL,
    artifact    TEXT,
    seconds     REAL NOT NULL,
    device      TEXT NOT NULL,
    version     TEXT NOT NULL,
    git_commit  TEXT NOT NULL,
    finished_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class JobRecord:
    """One finished job as stored."""

    id: str
    kind: str
    spec: dict[str, Any]
    deps: list[str]
    metrics: dict[str, Any]
    artifact: str | None
    seconds: float
    device: str
    version: str
    git_commit: str
    finished_at: float


def git_commit() -> str:
    """The commit of the pmoe-bench checkout in use (``unknown`` for an installed wheel)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here, capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{out}+dirty" if dirty else out


#: The file every store writes into its folder: what ``bench run --fresh`` checks before deleting anything.
MARKER = ".pmoe-bench-store"
#: What a store writes into its folder (and ``bench analyze`` beside it): all that ``--fresh`` removes.
STORE_FILES = ("results.db", "results.db-wal", "results.db-shm", "artifacts", "analysis", MARKER)


class Store:
    """A run directory. Safe for several writer processes (SQLite WAL, short transactions)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.db_path = self.root / "results.db"
        self.artifacts = self.root / "artifacts"
        try:
            self.artifacts.mkdir(parents=True, exist_ok=True)
            with self._connect() as conn:
                conn.executescript(SCHEMA)
            marker = self.root / MARKER
            if not marker.exists():
                marker.write_text(json.dumps({"written_by": "pmoe-bench", "version": __version__}) + "\n",
                                  encoding="utf-8")
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"{self.db_path}: cannot open the results store: {exc}") from None
        self._commit = git_commit()

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.db_path, timeout=60, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            yield conn
        finally:
            conn.close()

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            with self._connect() as conn:
                return conn.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.db_path}: unreadable results store: {exc}") from None

    # -- jobs ---------------------------------------------------------------------------------------
    def done_ids(self) -> set[str]:
        """Ids of every finished job."""
        return {row[0] for row in self._read("SELECT id FROM jobs")}

    def record(
        self,
        job_id: str,
        kind: str,
        spec: dict[str, Any],
        deps: list[str],
        metrics: dict[str, Any],
        seconds: float,
        device: str,
        artifact: str | None = None,
    ) -> None:
        """Write one finished job in a single transaction (replacing an older row with the same id)."""
        row = (
            job_id, kind, json.dumps(spec, sort_keys=True), json.dumps(deps), json.dumps(metrics),
            artifact, seconds, device, __version__, self._commit, time.time(),
        )
        try:
            with self._connect() as conn:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("INSERT OR REPLACE INTO jobs VALUES (?,?,?,?,?,?,?,?,?,?,?)", row)
                conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.db_path}: cannot write job {job_id}: {exc}") from None

    def delete(self, ids: list[str]) -> None:
        """Forget the rows of ``ids`` (their jobs run again on the next ``bench run``)."""
        try:
            with self._connect() as conn:
                conn.execute("BEGIN IMMEDIATE")
                for start in range(0, len(ids), 500):
                    chunk = ids[start : start + 500]
                    conn.execute(f"DELETE FROM jobs WHERE id IN ({','.join('?' * len(chunk))})", tuple(chunk))
                conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.db_path}: cannot delete rows: {exc}") from None

    def get(self, job_id: str) -> JobRecord | None:
        rows = self._read("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _to_record(rows[0]) if rows else None

    def records(self, ids: list[str] | None = None) -> dict[str, JobRecord]:
        """Finished jobs by id (all of them, or those in ``ids``)."""
        if ids is None:
            rows = self._read("SELECT * FROM jobs")
        else:
            rows = []
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                rows += self._read(f"SELECT * FROM jobs WHERE id IN ({marks})", tuple(chunk))
        return {row[0]: _to_record(row) for row in rows}

    # -- meta ---------------------------------------------------------------------------------------
    def set_meta(self, key: str, value: Any) -> None:
        try:
            with self._connect() as conn:
                conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.db_path}: cannot write: {exc}") from None

    def get_meta(self, key: str, default: Any = None) -> Any:
        rows = self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return json.loads(rows[0][0]) if rows else default

    # -- artifacts ----------------------------------------------------------------------------------
    def artifact_path(self, job_id: str, suffix: str = ".pt") -> Path:
        return self.artifacts / f"{job_id}{suffix}"

    def save_state(self, job_id: str, state: dict[str, torch.Tensor]) -> str:
        """Save a state dict atomically; returns the artifact's file name (relative to the store)."""
        path = self.artifact_path(job_id)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({k: v.detach().cpu() for k, v in state.items()}, tmp)
        os.replace(tmp, path)
        return str(path.relative_to(self.root))

    def load_state(self, job_id: str, stage: str | None = None) -> dict[str, torch.Tensor]:
        """Load a stored state dict safely (``weights_only=True``): a job's model, or one stage of a
        defense job (``stage``)."""
        record = self.get(job_id)
        if record is None or (stage is None and record.artifact is None):
            raise StoreError(f"{self.root}: job {job_id} has no stored artifact; rerun `bench run` to rebuild it")
        path = self.artifact_path(f"{job_id}.{stage}") if stage is not None else self.root / str(record.artifact)
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError) as exc:
            raise StoreError(f"{path}: cannot load artifact of job {job_id}: {exc}") from None


def _to_record(row: tuple[Any, ...]) -> JobRecord:
    return JobRecord(
        id=row[0], kind=row[1], spec=json.loads(row[2]), deps=json.loads(row[3]), metrics=json.loads(row[4]),
        artifact=row[5], seconds=row[6], device=row[7], version=row[8], git_commit=row[9], finished_at=row[10],
    )


def is_store(root: Path) -> bool:
    """Whether ``root`` holds a store pmoe-bench wrote: its marker, or (stores older than the marker) a
    ``results.db`` with exactly the store's tables."""
    if (root / MARKER).is_file():
        return True
    db = root / "results.db"
    if not db.is_file():
        return False
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        return False
    return tables == {"jobs", "meta"}


def remove_store(root: Path) -> None:
    """Delete what a store wrote into ``root`` (:data:`STORE_FILES`), nothing else; ``root`` itself only
    when that leaves it empty. Refuses a folder that is not a store, whatever it holds."""
    if not root.exists():
        return
    if not root.is_dir() or root.is_symlink() or not is_store(root):
        raise StoreError(
            f"{root}: not a pmoe-bench results store (no {MARKER} file, no results.db of ours); --fresh deletes "
            "only stores pmoe-bench created, so nothing was deleted. Choose another scenario name or --runs-dir, "
            "or remove the folder yourself"
        )
    for name in STORE_FILES:
        path = root / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
    with contextlib.suppress(OSError):
        root.rmdir()  # only if empty: whatever else the user keeps there stays


def open_existing(root: str | Path) -> Store:
    """Open a store that must already exist (for ``bench report``)."""
    db = Path(root) / "results.db"
    if not db.is_file():
        raise StoreError(f"{root}: no results store here (expected {db}); run `bench run SCENARIO` first")
    store = Store(root)
    store.done_ids()  # fails clearly on a corrupt database
    return store

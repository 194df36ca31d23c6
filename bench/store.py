"""The results store: ``runs/<name>/results.db`` (SQLite, WAL) plus the model files (``artifacts``).

One row per finished job, written in one transaction after its artifact is in place, so a crash or
Ctrl-C loses at most the job in flight and the next run resumes from the rows present. Each row carries
the fully resolved spec, the metrics, timings, device and its environment (:mod:`bench.provenance`),
package version and git commit, so every number can be traced and reproduced.

The database must sit on a local disk of the machine running ``bench run`` (SQLite's WAL needs shared
memory and working file locks, which NFS and mounted buckets do not give). Artifacts live in
``runs/<name>/artifacts/`` or, for a cluster, in a folder on shared storage (``--artifacts-dir``,
remembered in the store's meta): see :class:`ArtifactFiles` for how they stay whole there.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
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
    finished_at REAL NOT NULL,
    environment TEXT NOT NULL DEFAULT '{}'
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
    environment: dict[str, Any] = field(default_factory=dict)  # {} for rows stored before it existed


#: The jobs table's columns in :class:`JobRecord` order (named: stores migrated by ALTER TABLE keep it).
COLUMNS = "id, kind, spec, deps, metrics, artifact, seconds, device, version, git_commit, finished_at, environment"


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
    """A run directory. Safe for several writer processes on one machine (SQLite WAL, short transactions).

    ``artifacts_dir``: where the model files go (default ``<root>/artifacts``, or the folder an earlier run
    of this store chose); it is remembered, so ``bench report`` and ``bench analyze`` find it again."""

    def __init__(self, root: str | Path, artifacts_dir: str | Path | None = None) -> None:
        self.root = Path(root)
        self.db_path = self.root / "results.db"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with self._connect() as conn:
                conn.executescript(SCHEMA)
                _migrate(conn)
            _write_marker(self.root)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"{self.db_path}: cannot open the results store: {exc}") from None
        self.artifacts = self._artifacts_folder(artifacts_dir)
        self.files = ArtifactFiles(self.artifacts)
        self._commit = git_commit()

    def _artifacts_folder(self, chosen: str | Path | None) -> Path:
        """``chosen`` (remembered in the meta table), else the remembered folder, else ``<root>/artifacts``."""
        remembered = self.get_meta("artifacts_dir")
        if chosen is None and remembered is not None:
            return Path(remembered)  # not created here: `bench report` on a machine without the mount works
        folder = Path(chosen).resolve() if chosen is not None else self.root / "artifacts"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if chosen is not None:
                _write_marker(folder)  # so that --fresh may delete it
        except OSError as exc:
            raise StoreError(f"{folder}: cannot create the artifacts folder (--artifacts-dir): {exc}") from None
        if chosen is not None and str(folder) != remembered:
            self.set_meta("artifacts_dir", str(folder))
        return folder

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
        environment: dict[str, Any] | None = None,
    ) -> None:
        """Write one finished job in a single transaction (replacing an older row with the same id);
        ``environment``: what it ran on (:func:`bench.provenance.environment`)."""
        row = (
            job_id, kind, json.dumps(spec, sort_keys=True), json.dumps(deps), json.dumps(metrics),
            artifact, seconds, device, __version__, self._commit, time.time(), json.dumps(environment or {}),
        )
        try:
            with self._connect() as conn:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(f"INSERT OR REPLACE INTO jobs ({COLUMNS}) VALUES ({','.join('?' * len(row))})", row)
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
        rows = self._read(f"SELECT {COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        return _to_record(rows[0]) if rows else None

    def records(self, ids: list[str] | None = None) -> dict[str, JobRecord]:
        """Finished jobs by id (all of them, or those in ``ids``)."""
        if ids is None:
            rows = self._read(f"SELECT {COLUMNS} FROM jobs")
        else:
            rows = []
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                rows += self._read(f"SELECT {COLUMNS} FROM jobs WHERE id IN ({marks})", tuple(chunk))
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
        """Save a state dict whole (:meth:`ArtifactFiles.save`); returns the artifact's file name as the row
        keeps it (relative to the store when inside it)."""
        path = self.files.save(job_id, state)
        return str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)

    def load_state(self, job_id: str, stage: str | None = None) -> dict[str, torch.Tensor]:
        """Load a stored state dict safely (``weights_only=True``, checked against its checksum): a job's
        model, or one stage of a defense job (``stage``)."""
        record = self.get(job_id)
        if record is None or (stage is None and record.artifact is None):
            raise StoreError(f"{self.root}: job {job_id} has no stored artifact; rerun `bench run` to rebuild it")
        return self.files.load(job_id if stage is None else f"{job_id}.{stage}", job_id)

    def check_input(self, job_id: str, stage: str | None = None) -> str | None:
        """Why the stored artifact that a job reads from ``job_id`` (``stage``) is unusable, or None."""
        record = self.get(job_id)
        if record is None or "failed" in record.metrics or "not_applicable" in record.metrics:
            return None  # nothing to read: the job inherits the outcome
        if stage is None and record.artifact is None:
            return None
        return self.files.check(job_id if stage is None else f"{job_id}.{stage}")


class ArtifactFiles:
    """Model files in one folder, written so that no reader ever takes a partial file for a whole one.

    ``save``: the file is written under a temporary name in the same folder, flushed to disk (fsync) and
    renamed; then a sidecar ``<name>.pt.sha256`` (size and SHA-256, written the same way) vouches for it.
    ``load`` reads the bytes once and checks them against the sidecar; on shared storage without atomic
    rename (some buckets) a reader may see a file still being written, so a mismatch is retried a few times
    before it is reported. Files without a sidecar (written before it existed) load unchecked."""

    SUFFIX = ".pt"
    SIDECAR = ".sha256"
    #: Attempts at reading a file that does not match its sidecar, and the first wait between them (doubling).
    LOAD_ATTEMPTS = 5
    FIRST_WAIT_S = 0.2

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, name: str) -> Path:
        return self.folder / f"{name}{self.SUFFIX}"

    def save(self, name: str, state: dict[str, torch.Tensor]) -> Path:
        """Write ``state`` (on the CPU) as ``<name>.pt`` and its sidecar; returns the file's path."""
        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in state.items()}, buffer)
        data = buffer.getvalue()
        path = self.path(name)
        _write_whole(path, data)
        check = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        _write_whole(path.with_name(path.name + self.SIDECAR), (json.dumps(check) + "\n").encode())
        return path

    def _problem(self, path: Path, data: bytes | None) -> str | None:
        """Why ``data`` (the bytes of ``path``; None: unreadable) is not the whole file, or None."""
        if data is None:
            return "missing or unreadable"
        sidecar = path.with_name(path.name + self.SIDECAR)
        try:
            check = json.loads(sidecar.read_text(encoding="utf-8"))
            size, digest = int(check["size"]), str(check["sha256"])
        except FileNotFoundError:
            return None  # written before sidecars existed
        except (OSError, ValueError, KeyError, TypeError):
            return f"its checksum file {sidecar.name} is unreadable"
        if len(data) != size:
            return f"{len(data)} bytes, its checksum file says {size}"
        if hashlib.sha256(data).hexdigest() != digest:
            return "its SHA-256 differs from its checksum file"
        return None

    def check(self, name: str) -> str | None:
        """Why ``<name>.pt`` is not a whole artifact (missing, partial, corrupt), or None."""
        path = self.path(name)
        problem = self._problem(path, _read(path))
        return None if problem is None else f"{path}: {problem}"

    def load(self, name: str, job_id: str) -> dict[str, torch.Tensor]:
        """The state dict in ``<name>.pt``, checked against its sidecar (retried while it does not match)."""
        path = self.path(name)
        wait = self.FIRST_WAIT_S
        for attempt in range(self.LOAD_ATTEMPTS):
            data = _read(path)
            problem = self._problem(path, data)
            if problem is None and data is not None:
                break
            if attempt + 1 < self.LOAD_ATTEMPTS:
                time.sleep(wait)
                wait *= 2
        else:
            raise StoreError(f"{path}: artifact of job {job_id} is not whole ({problem}); run `bench run` again: "
                             "it recomputes the job that wrote it")
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError) as exc:
            raise StoreError(f"{path}: cannot load artifact of job {job_id}: {exc}") from None


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _write_whole(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder, fsync'd, then renamed."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where the folder can be opened
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring an older store's tables up to :data:`SCHEMA` (adds ``jobs.environment``); old rows stay."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
    if "environment" not in columns:
        try:
            conn.execute("ALTER TABLE jobs ADD COLUMN environment TEXT NOT NULL DEFAULT '{}'")
        except sqlite3.OperationalError as exc:
            if "duplicate column" not in str(exc):  # another process migrated it just now
                raise


def _write_marker(folder: Path) -> None:
    marker = folder / MARKER
    if not marker.exists():
        marker.write_text(json.dumps({"written_by": "pmoe-bench", "version": __version__}) + "\n",
                          encoding="utf-8")


def _to_record(row: tuple[Any, ...]) -> JobRecord:
    return JobRecord(
        id=row[0], kind=row[1], spec=json.loads(row[2]), deps=json.loads(row[3]), metrics=json.loads(row[4]),
        artifact=row[5], seconds=row[6], device=row[7], version=row[8], git_commit=row[9], finished_at=row[10],
        environment=json.loads(row[11] or "{}"),
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
    elsewhere = _artifacts_elsewhere(root)
    ids = _job_ids(root) if elsewhere is not None else set()
    for name in STORE_FILES:
        path = root / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
    with contextlib.suppress(OSError):
        root.rmdir()  # only if empty: whatever else the user keeps there stays
    if elsewhere is not None:
        _remove_artifacts(elsewhere, ids)


def _job_ids(root: Path) -> set[str]:
    """Ids of the jobs a store recorded (read before it is deleted: they name its artifact files)."""
    try:
        conn = sqlite3.connect(f"file:{root / 'results.db'}?mode=ro", uri=True)
        try:
            return {row[0] for row in conn.execute("SELECT id FROM jobs")}
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        return set()


def _artifacts_elsewhere(root: Path) -> Path | None:
    """The artifacts folder a store chose outside itself (``--artifacts-dir``), if any."""
    try:
        conn = sqlite3.connect(f"file:{root / 'results.db'}?mode=ro", uri=True)
        try:
            rows = conn.execute("SELECT value FROM meta WHERE key = 'artifacts_dir'").fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        return None
    return Path(json.loads(rows[0][0])) if rows else None


def _remove_artifacts(folder: Path, ids: set[str]) -> None:
    """Delete the model files, checksums and temporary files of the jobs ``ids`` from a marked ``folder``
    (``<job id>[.<stage>].pt`` and their sidecars: a job id holds no dot), nothing else; the marker and the
    folder only when nothing else is left in it (another store's or the user's files stay)."""
    if not (folder / MARKER).is_file() or folder.is_symlink():
        return
    for path in folder.iterdir():
        if path.is_file() and path.name.split(".", 1)[0] in ids:
            path.unlink()
    if [p.name for p in folder.iterdir()] == [MARKER]:
        (folder / MARKER).unlink()
        with contextlib.suppress(OSError):
            folder.rmdir()


def open_existing(root: str | Path) -> Store:
    """Open a store that must already exist (for ``bench report``)."""
    db = Path(root) / "results.db"
    if not db.is_file():
        raise StoreError(f"{root}: no results store here (expected {db}); run `bench run SCENARIO` first")
    store = Store(root)
    store.done_ids()  # fails clearly on a corrupt database
    return store

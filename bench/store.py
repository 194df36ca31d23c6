"""The results store: ``runs/<name>/results.db`` (SQLite, WAL) plus the model files (``artifacts``).

One row per finished job, written in one transaction after its artifact is in place, so a crash or
Ctrl-C loses at most the job in flight and the next run resumes from the rows present. Each row carries
the fully resolved spec, the metrics, timings, device and its environment (:mod:`bench.provenance`),
package version and git commit, so every number can be traced and reproduced.

The database must sit on a local disk of the machine running ``bench run`` (SQLite's WAL needs shared
memory and working file locks, which NFS and mounted buckets do not give). Artifacts live in
``runs/<name>/artifacts/`` or, for a cluster, in a folder on shared storage (``--artifacts-dir``,
remembered in the store's meta): see :class:`ArtifactFiles` for how they stay whole there. A row keeps the
size and SHA-256 of every model file its job wrote (``checksums``): that, not the file beside the model, is
what a load checks against.

Several ``bench run`` processes may share a store: the ``claims`` table holds which process computes which
job, under a lease it renews (:meth:`Store.claim`, :mod:`bench.execute.claims`), and each row names the
process that computed it (``computed_by``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import shutil
import socket
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
    environment TEXT NOT NULL DEFAULT '{}',
    checksums   TEXT NOT NULL DEFAULT '{}',
    computed_by TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS claims (
    job_id     TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    host       TEXT NOT NULL,
    pid        INTEGER NOT NULL,
    token      TEXT NOT NULL,
    claimed_at REAL NOT NULL,
    heartbeat  REAL NOT NULL,
    expires_at REAL NOT NULL
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
    #: model file name -> {"size", "sha256"} of every file the job wrote ({} for rows stored before it existed)
    checksums: dict[str, dict[str, Any]] = field(default_factory=dict)
    computed_by: str = ""  # the claim owner (host:pid:token) of the process that computed it


#: The jobs table's columns in :class:`JobRecord` order (named: stores migrated by ALTER TABLE keep it).
COLUMNS = ("id, kind, spec, deps, metrics, artifact, seconds, device, version, git_commit, finished_at, environment, "
           "checksums, computed_by")


@dataclass(frozen=True)
class ClaimRow:
    """Who computes a job right now: a ``bench run`` process (``owner`` = host:pid:token) and its lease."""

    job_id: str
    owner: str
    host: str
    pid: int
    token: str
    claimed_at: float
    heartbeat: float
    expires_at: float

    def describe(self) -> str:
        return f"{self.host} pid {self.pid} (token {self.token})"

    def stale_reason(self, now: float) -> str | None:
        """Why this claim no longer holds (its lease expired; its process on this machine is gone), or None."""
        if self.expires_at <= now:
            return (f"its lease expired {now - self.expires_at:.0f} s ago, last heartbeat "
                    f"{now - self.heartbeat:.0f} s ago")
        if self.host == HOST and not pid_alive(self.pid):
            return "its process is gone"
        return None


@dataclass(frozen=True)
class ClaimResult:
    """What :meth:`Store.claim` found: ``claimed`` (now ours; ``previous``: a stale claim taken over),
    ``held`` (by ``previous``, a live claim of another process) or ``done`` (its row exists)."""

    state: str
    previous: ClaimRow | None = None
    reason: str | None = None  # why ``previous`` was taken over


#: This machine's name as claims record it.
HOST = socket.gethostname()


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (a process of another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


_CLAIM_COLUMNS = "job_id, owner, host, pid, token, claimed_at, heartbeat, expires_at"


def _claim_in(conn: sqlite3.Connection, job_id: str, owner: str, token: str, lease_s: float,
              now: float) -> ClaimResult:
    """The body of :meth:`Store.claim`, inside its transaction."""
    if conn.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone():
        return ClaimResult("done")
    row = conn.execute(f"SELECT {_CLAIM_COLUMNS} FROM claims WHERE job_id = ?", (job_id,)).fetchone()
    previous = ClaimRow(*row) if row else None
    reason = None
    if previous is not None and previous.owner != owner:
        reason = previous.stale_reason(now)
        if reason is None:
            return ClaimResult("held", previous)
    else:
        previous = None
    conn.execute(f"INSERT OR REPLACE INTO claims ({_CLAIM_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 (job_id, owner, HOST, os.getpid(), token, now, now, now + lease_s))
    return ClaimResult("claimed", previous, reason)


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
        checksums: dict[str, dict[str, Any]] | None = None,
        computed_by: str = "",
    ) -> None:
        """Write one finished job in a single transaction (replacing an older row with the same id) and drop
        its claim; ``environment``: what it ran on (:func:`bench.provenance.environment`); ``checksums``: size
        and SHA-256 of each model file it wrote (:meth:`save_outputs`), what loads check them against;
        ``computed_by``: the claim owner of the process that computed it."""
        row = (
            job_id, kind, json.dumps(spec, sort_keys=True), json.dumps(deps), json.dumps(metrics),
            artifact, seconds, device, __version__, self._commit, time.time(), json.dumps(environment or {}),
            json.dumps(checksums or {}, sort_keys=True), computed_by,
        )
        try:
            with self._connect() as conn:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(f"INSERT OR REPLACE INTO jobs ({COLUMNS}) VALUES ({','.join('?' * len(row))})", row)
                conn.execute("DELETE FROM claims WHERE job_id = ?", (job_id,))
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

    def forget(self, job_id: str, finished_at: float) -> bool:
        """Forget the row of ``job_id`` if it is still the one that finished at ``finished_at`` (not one another
        process has recorded since); whether it was deleted."""
        try:
            with self._connect() as conn:
                conn.execute("BEGIN IMMEDIATE")
                cur = conn.execute("DELETE FROM jobs WHERE id = ? AND finished_at = ?", (job_id, finished_at))
                conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.db_path}: cannot delete the row of job {job_id}: {exc}") from None
        return cur.rowcount > 0

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

    # -- claims: which bench run process computes which job -----------------------------------------
    def claim(self, job_id: str, owner: str, token: str, lease_s: float) -> ClaimResult:
        """Claim ``job_id`` for ``owner`` (``host:pid:token``) for ``lease_s`` seconds, atomically (one
        ``BEGIN IMMEDIATE`` transaction): ``done`` when its row exists, ``held`` when another process holds a
        live claim on it, else ``claimed`` (a stale claim, :meth:`ClaimRow.stale_reason`, is taken over and
        returned as ``previous``; a claim of ``owner`` itself is renewed)."""
        now = time.time()
        try:
            with self._connect() as conn:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    result = _claim_in(conn, job_id, owner, token, lease_s, now)
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
                return result
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.db_path}: cannot claim job {job_id}: {exc}") from None

    def renew(self, owner: str, job_ids: list[str], lease_s: float) -> list[str]:
        """Extend ``owner``'s claims on ``job_ids`` by ``lease_s`` from now (its heartbeat); the ids among them
        that it no longer holds (taken over by another process, or recorded)."""
        if not job_ids:
            return []
        now = time.time()
        try:
            with self._connect() as conn:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("UPDATE claims SET heartbeat = ?, expires_at = ? WHERE owner = ?",
                             (now, now + lease_s, owner))
                held = {r[0] for r in conn.execute("SELECT job_id FROM claims WHERE owner = ?", (owner,))}
                conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.db_path}: cannot renew the claims of {owner}: {exc}") from None
        return [j for j in job_ids if j not in held]

    def release(self, owner: str, job_ids: list[str] | None = None) -> None:
        """Drop ``owner``'s claims (on ``job_ids``, or all of them)."""
        try:
            with self._connect() as conn:
                conn.execute("BEGIN IMMEDIATE")
                if job_ids is None:
                    conn.execute("DELETE FROM claims WHERE owner = ?", (owner,))
                else:
                    for start in range(0, len(job_ids), 500):
                        chunk = job_ids[start : start + 500]
                        conn.execute(f"DELETE FROM claims WHERE owner = ? AND job_id IN ({','.join('?' * len(chunk))})",
                                     (owner, *chunk))
                conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.db_path}: cannot release the claims of {owner}: {exc}") from None

    def claims(self) -> dict[str, ClaimRow]:
        """Every claim in the store, by job id (live or stale)."""
        return {row[0]: ClaimRow(*row) for row in self._read(f"SELECT {_CLAIM_COLUMNS} FROM claims")}

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

    def save_outputs(self, job_id: str, state: dict[str, torch.Tensor] | None,
                     stages: dict[str, dict[str, torch.Tensor]]) -> tuple[str | None, dict[str, dict[str, Any]]]:
        """Save a job's model (``state``, may be None) and each stage's model; the artifact name its row keeps
        and the checksums of every file written (file name -> size and SHA-256), for its row."""
        checksums: dict[str, dict[str, Any]] = {}
        artifact = None
        for name, tensors in ([(job_id, state)] if state is not None else []) + [
                (f"{job_id}.{stage}", s) for stage, s in stages.items()]:
            path, check = self.files.write(name, tensors)
            checksums[path.name] = check
            if name == job_id:
                artifact = str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)
        return artifact, checksums

    def _expected(self, job_id: str, name: str) -> Any:
        """A function giving the checksum the row of ``job_id`` keeps for file ``name`` (None: the row has
        none; the file's checksum file is used); read again at each attempt, as another process may have
        recorded the job again meanwhile."""
        file_name = self.files.path(name).name

        def expected() -> dict[str, Any] | None:
            record = self.get(job_id)
            return record.checksums.get(file_name) if record is not None else None

        return expected

    def load_state(self, job_id: str, stage: str | None = None) -> dict[str, torch.Tensor]:
        """Load a stored state dict safely (``weights_only=True``, checked against the checksum its row keeps):
        a job's model, or one stage of a defense job (``stage``). A missing, partial or corrupt file raises
        :class:`BrokenArtifact` naming the job and the file."""
        record = self.get(job_id)
        if record is None or (stage is None and record.artifact is None):
            raise StoreError(f"{self.root}: job {job_id} has no stored artifact; rerun `bench run` to rebuild it")
        name = job_id if stage is None else f"{job_id}.{stage}"
        return self.files.load(name, job_id, self._expected(job_id, name))

    def check_input(self, job_id: str, stage: str | None = None) -> str | None:
        """Why the stored artifact that a job reads from ``job_id`` (``stage``) is unusable, or None."""
        record = self.get(job_id)
        if record is None or "failed" in record.metrics or "not_applicable" in record.metrics:
            return None  # nothing to read: the job inherits the outcome
        if stage is None and record.artifact is None:
            return None
        name = job_id if stage is None else f"{job_id}.{stage}"
        return self.files.check(name, record.checksums.get(self.files.path(name).name))


class BrokenArtifact(StoreError):
    """A stored model file that is missing, partial or corrupt: which job wrote it, which file, what is wrong.
    Executors catch it around a job and recompute the job that wrote the file (:mod:`bench.execute.claims`)."""

    def __init__(self, job_id: str, path: str, problem: str) -> None:
        super().__init__(f"{path}: artifact of job {job_id} is not whole ({problem}); run `bench run` again: "
                         "it recomputes the job that wrote it")
        self.job_id, self.path, self.problem = job_id, path, problem

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (from pool workers, Ray actors)
        return (type(self), (self.job_id, self.path, self.problem))


class ArtifactFiles:
    """Model files in one folder, written so that no reader ever takes a partial file for a whole one.

    ``save``: the file is written under a temporary name in the same folder, flushed to disk (fsync) and
    renamed; then a sidecar ``<name>.pt.sha256`` (size and SHA-256, written the same way) vouches for it.
    The job's row keeps the same size and SHA-256 (:meth:`Store.save_outputs`) and is the source of truth:
    ``load`` reads the bytes once and checks them against the row's checksum when there is one, else the
    sidecar; on shared storage without atomic rename (some buckets) a reader may see a file still being
    written, so a mismatch is retried a few times before it is reported (:class:`BrokenArtifact`). Files with
    neither (written before checksums existed) load unchecked."""

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
        return self.write(name, state)[0]

    def write(self, name: str, state: dict[str, torch.Tensor]) -> tuple[Path, dict[str, Any]]:
        """:meth:`save`, also returning the file's size and SHA-256 (``{"size", "sha256"}``) for its row."""
        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in state.items()}, buffer)
        data = buffer.getvalue()
        path = self.path(name)
        _write_whole(path, data)
        check = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        _write_whole(path.with_name(path.name + self.SIDECAR), (json.dumps(check) + "\n").encode())
        return path, check

    def _problem(self, path: Path, data: bytes | None, expected: dict[str, Any] | None = None) -> str | None:
        """Why ``data`` (the bytes of ``path``; None: unreadable) is not the whole file, or None; checked
        against ``expected`` (the checksum its row keeps) when given, else against its sidecar."""
        if data is None:
            return "missing or unreadable"
        if expected is not None:
            if len(data) != int(expected["size"]):
                return f"{len(data)} bytes, the checksum stored with its row says {expected['size']}"
            if hashlib.sha256(data).hexdigest() != expected["sha256"]:
                return "its SHA-256 differs from the one stored with its row"
            return None
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

    def check(self, name: str, expected: dict[str, Any] | None = None) -> str | None:
        """Why ``<name>.pt`` is not a whole artifact (missing, partial, corrupt), or None; ``expected``: the
        checksum its row keeps (else its sidecar is used)."""
        path = self.path(name)
        problem = self._problem(path, _read(path), expected)
        return None if problem is None else f"{path}: {problem}"

    def load(self, name: str, job_id: str, expected: Any = None) -> dict[str, torch.Tensor]:
        """The state dict in ``<name>.pt``, checked (retried while it does not match) against ``expected()``
        (a function giving the checksum the job's row keeps, None for none) or else its sidecar."""
        path = self.path(name)
        wait = self.FIRST_WAIT_S
        for attempt in range(self.LOAD_ATTEMPTS):
            data = _read(path)
            problem = self._problem(path, data, expected() if expected is not None else None)
            if problem is None and data is not None:
                break
            if attempt + 1 < self.LOAD_ATTEMPTS:
                time.sleep(wait)
                wait *= 2
        else:
            raise BrokenArtifact(job_id, str(path), str(problem))
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
            raise BrokenArtifact(job_id, str(path), f"cannot be loaded: {exc}") from None


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


#: Columns added to ``jobs`` after the first release, in order, with their definitions.
_ADDED_COLUMNS = (("environment", "TEXT NOT NULL DEFAULT '{}'"), ("checksums", "TEXT NOT NULL DEFAULT '{}'"),
                  ("computed_by", "TEXT NOT NULL DEFAULT ''"))


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring an older store's tables up to :data:`SCHEMA` (adds the :data:`_ADDED_COLUMNS` to ``jobs``; the
    ``claims`` table is created by the schema itself); old rows stay."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
    for name, definition in _ADDED_COLUMNS:
        if name in columns:
            continue
        try:
            conn.execute(f"ALTER TABLE jobs ADD COLUMN {name} {definition}")
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
        environment=json.loads(row[11] or "{}"), checksums=json.loads(row[12] or "{}"), computed_by=row[13] or "",
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
    return {"jobs", "meta"} <= tables <= {"jobs", "meta", "claims"}


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

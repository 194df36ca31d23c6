"""A tensor cache for data sets that are slow to decode (GTSRB: ~50k PPM files), kept next to the data.

The cache is one ``.pt`` file holding a dict of tensors and the fingerprint of the source files it was
built from. The fingerprint hashes every source file's relative path, size and modification time, so
adding, removing, replacing or touching a file invalidates it. Loaded with ``weights_only=True``: the
file can only hold tensors and plain values, never code.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def fingerprint(paths: list[Path], base: Path, salt: str = "") -> str:
    """Hash of ``salt`` and each file's path (relative to ``base``), size and mtime; directories walked."""
    entries: list[str] = []
    for top in paths:
        files = [top] if top.is_file() else [Path(d) / f for d, _, names in os.walk(top) for f in names]
        for f in files:
            st = f.stat()
            entries.append(f"{f.relative_to(base).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}")
    digest = hashlib.sha256(salt.encode())
    for line in sorted(entries):
        digest.update(line.encode())
        digest.update(b"\n")
    return digest.hexdigest()


def load(path: Path, key: str) -> dict[str, torch.Tensor] | None:
    """The cached tensors if ``path`` exists, is readable and was built for ``key``; else None."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable cache is rebuilt, never fatal
        log.warning("ignoring unreadable cache %s: %s", path, exc)
        return None
    if not isinstance(blob, dict) or blob.get("key") != key:
        return None
    tensors = blob.get("tensors")
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        return None
    return tensors


def save(path: Path, key: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write the cache atomically (temp file + rename); a read-only root only costs the speed-up."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save({"key": key, "tensors": tensors}, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not write cache %s: %s", path, exc)
        tmp.unlink(missing_ok=True)

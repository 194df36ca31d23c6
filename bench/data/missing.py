"""Errors for data that is not on disk or cannot be fetched, worded the same way for every data set."""

from __future__ import annotations

import os
from pathlib import Path

from bench.errors import DataError


def _where(root: str | Path) -> str:
    return f"root '{root}' ({os.path.abspath(root)})"


def require_files(dataset: str, root: str | Path, paths: list[Path], fix: str) -> None:
    """Raise :class:`DataError` naming the data set, the root and ``fix`` if any of ``paths`` is absent."""
    absent = [p for p in paths if not p.exists()]
    if absent:
        more = f" and {len(absent) - 3} more" if len(absent) > 3 else ""
        shown = ", ".join(str(p) for p in absent[:3]) + more
        raise DataError(f"dataset '{dataset}' not found in {_where(root)}: missing {shown}. {fix}")


def download_failed(dataset: str, root: str | Path, exc: BaseException, fix: str) -> DataError:
    """The :class:`DataError` for a failed torchvision download into ``root``."""
    return DataError(f"dataset '{dataset}': download into {_where(root)} failed ({exc}). {fix}")


def unreadable(dataset: str, path: Path, exc: BaseException | str) -> DataError:
    """The :class:`DataError` for a file that exists but is not in the expected format."""
    return DataError(f"dataset '{dataset}': cannot read {path}: {exc}. Delete it and fetch the data again")

"""Plugins: new components from a file, a folder, or an installed package, through the one registry.

Two doors, one registry:

* a Python file or folder named in a scenario (``plugins: [plugins/my_attack.py]``) or on the command
  line (``--plugins DIR``): imported once; whatever it registers is attributed to that file;
* an installed package declaring an entry point in the group ``pmoe_bench.plugins`` (the entry point
  names a module, imported when the registry is first used).

A plugin registers with the same decorators the built-ins use (``bench.registry.register_trigger`` ...).
This module builds on :mod:`bench.registry` (which loads the entry points on first use, see
:func:`bench.registry.load_entry_points`); the registry never imports this module.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path

from bench.errors import BenchError, PluginError
from bench.registry import ENTRY_POINT_GROUP, load_entry_points, registering_from

__all__ = ["ENTRY_POINT_GROUP", "load_entry_points", "load_plugin_file", "load_plugins"]

_LOADED_FILES: set[Path] = set()


def load_plugins(paths: list[str], base_dir: Path | None = None, source: str = "") -> list[Path]:
    """Import every plugin file or folder in ``paths`` (relative paths resolve against ``base_dir``,
    then the working directory); the files, absolute (worker processes load the same ones)."""
    files: list[Path] = []
    for raw in paths:
        path = _resolve(raw, base_dir)
        if path is None:
            where = f"{source}: " if source else ""
            raise PluginError(f"{where}plugins: '{raw}' does not exist (a .py file or a folder of them)")
        for file in _plugin_files(path):
            load_plugin_file(file)
            files.append(file.resolve())
    return files


def _resolve(raw: str, base_dir: Path | None) -> Path | None:
    candidates = [Path(raw)] if Path(raw).is_absolute() else [Path.cwd() / raw]
    if base_dir is not None and not Path(raw).is_absolute():
        candidates.insert(0, base_dir / raw)
    for candidate in candidates:
        if candidate.exists():
            return candidate.resolve()
    return None


def _plugin_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if (path / "__init__.py").is_file():
        return [path / "__init__.py"]
    # a folder's private modules and its tests (test_*.py, conftest.py) are not plugins
    skip = ("_", "test_", "conftest.")
    return sorted(p for p in path.glob("*.py") if not p.name.startswith(skip))


def load_plugin_file(path: Path) -> None:
    """Import one plugin file; any failure becomes a :class:`PluginError` naming the file."""
    path = path.resolve()
    if path in _LOADED_FILES:
        return
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    module_name = f"pmoe_bench_plugin_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(
        module_name, path, submodule_search_locations=[str(path.parent)] if path.name == "__init__.py" else None
    )
    if spec is None or spec.loader is None:
        raise PluginError(f"plugin {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        with registering_from(f"file:{path}"):
            spec.loader.exec_module(module)
    except BenchError as exc:
        sys.modules.pop(module_name, None)
        raise PluginError(f"plugin {path}: {exc}") from None
    except Exception as exc:  # a plugin may fail in any way; the user needs the file and the reason
        sys.modules.pop(module_name, None)
        raise PluginError(f"plugin {path}: failed to import: {type(exc).__name__}: {exc}") from None
    _LOADED_FILES.add(path)

"""bench.registry and bench.plugins import in one direction only (plugins builds on the registry), and each
imports alone in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imported(module_file: Path, package: str = "bench") -> set[str]:
    """Every module ``module_file`` (a module of ``package``) imports anywhere (top level or inside
    functions), relative imports resolved (``from . import plugins`` is ``bench.plugins``), and every
    constant name handed to ``importlib.import_module`` / ``__import__``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(module_file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            if module:
                names.add(module)
                names.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names.add(node.args[0].value)
    return names


def test_the_import_reader_resolves_relative_and_dynamic_imports(tmp_path: Path) -> None:
    source = tmp_path / "mod.py"
    source.write_text("from . import plugins\nfrom .x import y\nimport importlib\n"
                      "def f():\n    importlib.import_module('bench.z')\n", encoding="utf-8")
    assert {"bench.plugins", "bench.x.y", "bench.z"} <= _imported(source)


def test_registry_never_imports_plugins_and_plugins_imports_registry() -> None:
    registry = _imported(ROOT / "bench" / "registry.py")
    assert not {n for n in registry if n == "bench.plugins" or n.startswith("bench.plugins.")}
    assert "bench.plugins" not in {n.rsplit(".", 1)[0] for n in registry if n.startswith("bench.")}
    assert "bench.registry" in _imported(ROOT / "bench" / "plugins.py")


@pytest.mark.parametrize("module", ["bench.registry", "bench.plugins"])
def test_imports_alone_in_a_fresh_interpreter(module: str) -> None:
    code = (f"import {module}; "
            "from bench.registry import REGISTRY; "
            "assert 'badnets' in REGISTRY.names('trigger')")  # first use loads built-ins and entry points
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr

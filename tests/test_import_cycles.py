"""bench.registry and bench.plugins import in one direction only (plugins builds on the registry), and each
imports alone in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imported(module_file: Path) -> set[str]:
    """Every module ``module_file`` imports anywhere (top level or inside functions)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(module_file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


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

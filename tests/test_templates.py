"""`bench new`'s templates (bench/templates/*.py.tmpl) checked as code: every one rendered, linted with the
project's ruff settings, compiled, the plugin imported; and shipped as package data."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path

import pytest

from bench import scaffold
from bench.plugins import load_plugin_file
from bench.registry import REGISTRY

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "bench" / "templates"
PLACEHOLDERS = {"name", "module", "cls", "path", "test_path"}
# one name per kind, with a "-" where allowed, so module and class spellings differ from the name
NAMES = {"attack": "tmpl-trig", "defense": "tmpl_def", "model": "tmpl-moe", "dataset": "tmpl_digits"}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, list[Path]]]:
    """Every kind's plugin and test file, written into one folder."""
    folder = tmp_path_factory.mktemp("templates")
    written = {kind: scaffold.new(kind, name, folder) for kind, name in NAMES.items()}
    yield written
    for kind, name in NAMES.items():
        REGISTRY.unregister(scaffold.KINDS[kind], name)


def test_every_template_file_is_used_and_uses_only_known_placeholders() -> None:
    kinds = set(scaffold.KINDS.values())
    expected = {f"{k}.py.tmpl" for k in kinds} | {f"test_{k}.py.tmpl" for k in kinds}
    assert {p.name for p in TEMPLATES.iterdir()} == expected
    for path in TEMPLATES.iterdir():
        used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", path.read_text(encoding="utf-8").replace("$$", "")))
        assert used <= PLACEHOLDERS, (path.name, used - PLACEHOLDERS)


def test_rendered_templates_pass_ruff_with_the_projects_settings(rendered: dict[str, list[Path]]) -> None:
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    files = [str(p) for paths in rendered.values() for p in paths]
    done = subprocess.run([ruff, "check", "--no-cache", "--config", str(ROOT / "pyproject.toml"), *files],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_rendered_templates_compile_and_the_plugins_import(rendered: dict[str, list[Path]]) -> None:
    for kind, (plugin, test_file) in rendered.items():
        for path in (plugin, test_file):
            compile(path.read_text(encoding="utf-8"), str(path), "exec")
        load_plugin_file(plugin)
        comp = REGISTRY.get(scaffold.KINDS[kind], NAMES[kind])
        assert comp.source == f"file:{plugin.resolve()}"
        assert plugin.read_text(encoding="utf-8").startswith(f'"""{NAMES[kind]}: ')


def test_templates_are_package_data() -> None:
    """`pip install .` (not editable) ships bench/templates: pyproject's package-data covers every file."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config["tool"]["setuptools"]["package-data"]["bench"]
    for path in TEMPLATES.iterdir():
        relative = path.relative_to(ROOT / "bench").as_posix()
        assert any(fnmatch(relative, pattern) for pattern in patterns), relative


def test_template_text_is_read_through_the_package() -> None:
    assert scaffold.template("trigger.py.tmpl") == (TEMPLATES / "trigger.py.tmpl").read_text(encoding="utf-8")

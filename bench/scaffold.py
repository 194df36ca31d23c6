"""``bench new attack|defense|model|dataset NAME``: write a working plugin and its tests from a template.

The templates are files shipped with the package, ``bench/templates/KIND.py.tmpl`` and
``bench/templates/test_KIND.py.tmpl`` (KIND the registry kind: trigger, defense, model, dataset), in
:class:`string.Template` syntax: ``$name`` (registered name), ``$module`` (file stem), ``$cls`` (class
name), ``$path`` and ``$test_path`` (the files written); a literal dollar sign is written ``$$``. The
tests render every template and check the result as code (ruff, import, its own tests).

Each template is a real component, not a placeholder: an additive checkerboard trigger, a fine-tuning
defense, a tiny patch-level MoE model that returns its routing, and a data set built from scikit-learn's
digits with a transform. Each comes with a test file that checks the component's contract and defining
properties, so a new user starts from something that passes ``bench plugins --plugins FILE``, runs in a
scenario, and has tests to keep green while they make it their own.
"""

from __future__ import annotations

import keyword
import re
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from string import Template

from bench.errors import PluginError

#: ``bench new`` kinds and the registry kind each writes ("attack" is a trigger).
KINDS: dict[str, str] = {"attack": "trigger", "trigger": "trigger", "defense": "defense", "model": "model",
                         "dataset": "dataset"}

#: Registered names: lower case, starting with a letter, then letters, digits, "_" or "-".
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")

#: Names the templates import; a generated class must not hide them.
RESERVED_CLASS_NAMES = frozenset({
    "BenchModel", "ClassVar", "ComponentParamsError", "Defense", "DefenseContext", "DefenseStage",
    "Normalize", "Routing", "TensorData", "Trigger",
})


@dataclass(frozen=True)
class Names:
    """Spellings of one new component: registry name, module (file) name, class name."""

    kind: str
    name: str
    module: str
    cls: str


def names_for(kind: str, name: str) -> Names:
    """Check ``kind`` and ``name`` and derive the module and class names; errors say what to do instead."""
    if kind not in KINDS:
        raise PluginError(f"bench new: KIND must be one of {', '.join(k for k in KINDS if k != 'trigger')}, "
                          f"got {kind!r}")
    if not NAME_PATTERN.match(name):
        raise PluginError(
            f"bench new: NAME must start with a lower-case letter and contain only a-z, 0-9, '_' and '-' "
            f"(at most 40 characters), got {name!r}; e.g. 'my_attack'"
        )
    module = name.replace("-", "_")
    if keyword.iskeyword(module) or module == "test" or module.startswith(("test_", "conftest")):
        raise PluginError(f"bench new: NAME {name!r} would be a Python keyword or a test file's name; "
                          "choose another")
    cls = "".join(part.capitalize() for part in re.split(r"[_-]+", name) if part)
    if cls in RESERVED_CLASS_NAMES:
        raise PluginError(f"bench new: NAME {name!r} would make a class {cls} that hides bench's own {cls}; "
                          "choose another")
    return Names(KINDS[kind], name, module, cls)


def _check_free(names: Names) -> None:
    from bench.registry import REGISTRY

    if names.name in REGISTRY.names(names.kind):
        source = REGISTRY.get(names.kind, names.name).source
        raise PluginError(f"bench new: {names.kind} {names.name!r} is already registered (by {source}); "
                          "choose another NAME")


def template(filename: str) -> str:
    """The text of one template file of ``bench/templates`` (package data, so installed copies have it)."""
    return (files("bench") / "templates" / filename).read_text(encoding="utf-8")


def render(names: Names, directory: Path) -> dict[Path, str]:
    """The files to write, ``{path: text}``: the plugin and its test file."""
    plugin = directory / f"{names.module}.py"
    test = directory / f"test_{names.module}.py"
    values = {"name": names.name, "module": names.module, "cls": names.cls, "path": plugin.as_posix(),
              "test_path": test.as_posix()}
    return {
        plugin: Template(template(f"{names.kind}.py.tmpl")).substitute(values),
        test: Template(template(f"test_{names.kind}.py.tmpl")).substitute(values),
    }


def new(kind: str, name: str, directory: Path = Path("plugins"), force: bool = False) -> list[Path]:
    """Write ``directory/NAME.py`` (a working component of ``kind``) and ``directory/test_NAME.py``.

    Refuses a bad or already registered NAME, and existing files unless ``force``; returns the paths
    written. Raises :class:`PluginError` (the CLI turns it into a message and exit code 2).
    """
    names = names_for(kind, name)
    _check_free(names)
    files = render(names, Path(directory))
    existing = [p for p in files if p.exists()]
    if existing and not force:
        shown = ", ".join(str(p) for p in existing)
        raise PluginError(f"bench new: {shown} already exists; pass --force to overwrite")
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        for path, text in files.items():
            path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise PluginError(f"bench new: cannot write into {directory}: {exc}") from None
    return list(files)

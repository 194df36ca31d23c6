"""``--set key=value`` overrides of a scenario file, as Hydra's ``key=value`` (dotted paths, YAML values).

``train.epochs=1`` sets a nested field; ``poison_rates=[0.01]`` replaces a list; ``models.0.topk=8`` (or
``models[0].topk=8``) reaches into a list entry; a new key is created where the path's parent is a mapping.
Values are parsed with ``yaml.safe_load``, so ``fp32``, ``null``, ``[8, 4]`` and ``{grid: [1, 2]}`` mean what
they mean in the file (and ``1e-3``, a string to YAML 1.1, is the number). Overrides apply to the file's
mapping before validation, so a bad value is refused exactly as it would be in the file, and the error
names the overrides it came from.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import yaml

from bench.errors import ScenarioError

_INDEX = re.compile(r"\[(\d+)\]")


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """``"a.b[0].c=value"`` as (``["a", "b", 0, "c"]``, parsed value); ScenarioError on a malformed one."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ScenarioError(f"--set {text!r}: expected KEY=VALUE with a dotted KEY, e.g. --set train.epochs=1")
    parts: list[str | int] = []
    for part in _INDEX.sub(r".\1", key).split("."):
        if not part:
            raise ScenarioError(f"--set {text!r}: empty part in the key {key!r}")
        parts.append(int(part) if part.isdigit() else part)
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        raise ScenarioError(f"--set {text!r}: the value is not valid YAML: {problem}") from None
    return parts, _number_like(parsed)


def _number_like(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; on the command line it means the number."""
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
        return float(value)
    return value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of the scenario mapping ``raw`` with every override applied in order."""
    out = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node: Any = out
        for depth, part in enumerate(path[:-1]):
            node = _step(node, part, path[: depth + 1], text)
        _assign(node, path[-1], value, path, text)
    return out


def _where(path: list[str | int]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def _step(node: Any, part: str | int, path: list[str | int], text: str) -> Any:
    if isinstance(part, int):
        if not isinstance(node, list) or part >= len(node):
            size = f"a list of {len(node)}" if isinstance(node, list) else type(node).__name__
            raise ScenarioError(f"--set {text!r}: {_where(path)} does not exist ({_where(path[:-1])} is {size})")
        return node[part]
    if not isinstance(node, dict):
        raise ScenarioError(f"--set {text!r}: {_where(path[:-1]) or 'the scenario'} is not a mapping, so it has "
                            f"no field {part!r}")
    return node.setdefault(part, {})


def _assign(node: Any, part: str | int, value: Any, path: list[str | int], text: str) -> None:
    if isinstance(part, int):
        if not isinstance(node, list) or part >= len(node):
            raise ScenarioError(f"--set {text!r}: {_where(path)} does not exist")
        node[part] = value
    elif isinstance(node, dict):
        node[part] = value
    else:
        raise ScenarioError(f"--set {text!r}: {_where(path[:-1])} is not a mapping, so it has no field {part!r}")


def describe(overrides: list[str]) -> str:
    """How a source names its overrides in messages: `` (with --set a=1 --set b=2)``, or nothing."""
    return f" (with {' '.join(f'--set {o}' for o in overrides)})" if overrides else ""

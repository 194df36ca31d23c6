"""Dotted paths into a raw scenario dict: parse, check against the scenario, read and set.

``attacks.0.objective.lambda_bd`` and ``attacks[0].objective.lambda_bd`` name the same place. The last
part may be a key the scenario does not write yet (a parameter left at its default); every part before it
must exist. Under an attack entry the leaf ``strength`` stands for the trigger's declared
``strength_param``, so one search block works for badnets (``intensity``), blend (``alpha``) or wanet
(``s``).
"""

from __future__ import annotations

import re
from typing import Any

from bench.errors import BenchError, ScenarioError
from bench.registry import REGISTRY

Key = str | int
STRENGTH = "strength"
#: Top-level fields a search may not change: the store and the search itself hang on them.
FIXED_ROOTS = frozenset({"name", "search", "plugins"})

_INDEX = re.compile(r"\[(\d+)\]")


def parse_path(text: str) -> tuple[Key, ...]:
    """``"attacks[0].size"`` -> ``("attacks", 0, "size")``; all-digit parts are list positions."""
    parts = _INDEX.sub(r".\1", text.strip()).split(".")
    if any(not p for p in parts):
        raise ValueError(f"'{text}' is not a dotted path (e.g. attacks.0.objective.lambda_bd)")
    return tuple(int(p) if p.isdigit() else p for p in parts)


def format_path(keys: tuple[Key, ...]) -> str:
    """``("attacks", 0, "size")`` -> ``"attacks.0.size"``."""
    return ".".join(str(k) for k in keys)


def resolve_path(raw: dict[str, Any], text: str, where: str) -> tuple[Key, ...]:
    """Check ``text`` against ``raw`` and return its keys, with ``strength`` replaced by the trigger's
    strength parameter. ``where`` names the field in errors (``search.params[0].path``)."""
    try:
        keys = parse_path(text)
    except ValueError as exc:
        raise ScenarioError(f"{where}: {exc}") from None
    if keys[0] in FIXED_ROOTS:
        raise ScenarioError(f"{where}: '{text}' cannot be searched ({keys[0]} is fixed for the whole study)")
    node: Any = raw
    for depth, key in enumerate(keys[:-1]):
        node = _child(node, key, keys[: depth + 1], text, where)
    leaf = keys[-1]
    if leaf == STRENGTH and len(keys) == 3 and keys[0] == "attacks":
        leaf = _strength_param(node, text, where)
        keys = (*keys[:-1], leaf)
    if isinstance(node, list):
        if not isinstance(leaf, int) or not 0 <= leaf < len(node):
            last = len(node) - 1
            raise ScenarioError(f"{where}: '{text}': {format_path(keys[:-1])} has positions 0..{last}")
    elif not isinstance(node, dict) or isinstance(leaf, int):
        raise ScenarioError(
            f"{where}: '{text}': {format_path(keys[:-1])} is {_kind(node)}, it has no field '{leaf}'"
        )
    return keys


def _child(node: Any, key: Key, so_far: tuple[Key, ...], text: str, where: str) -> Any:
    if isinstance(node, list):
        if isinstance(key, int) and 0 <= key < len(node):
            return node[key]
        raise ScenarioError(
            f"{where}: '{text}': {format_path(so_far[:-1])} is a list of {len(node)}, "
            f"use a position 0..{len(node) - 1} instead of '{key}'"
        )
    if isinstance(node, dict) and key in node:
        return node[key]
    if isinstance(node, dict):
        known = ", ".join(str(k) for k in node) or "(none)"
        raise ScenarioError(
            f"{where}: '{text}': the scenario has no '{format_path(so_far)}' (fields there: {known})"
        )
    parent = format_path(so_far[:-1])
    raise ScenarioError(f"{where}: '{text}': {parent} is {_kind(node)}, not a mapping or list")


def _strength_param(entry: Any, text: str, where: str) -> str:
    name = entry.get("name") if isinstance(entry, dict) else None
    if not isinstance(name, str):
        raise ScenarioError(f"{where}: '{text}': the attack entry has no trigger name")
    try:
        comp = REGISTRY.get("trigger", name)
    except BenchError as exc:
        raise ScenarioError(f"{where}: '{text}': {exc}") from None
    param = getattr(comp.factory, "strength_param", "")
    if not param:
        raise ScenarioError(
            f"{where}: '{text}': trigger '{name}' declares no strength_param; name its parameter instead "
            f"(one of: {', '.join(p.name for p in comp.params)})"
        )
    return param


def _kind(node: Any) -> str:
    return f"a value ({node!r})" if not isinstance(node, dict | list) else type(node).__name__


def get_path(raw: dict[str, Any], keys: tuple[Key, ...], default: Any = None) -> Any:
    """The value at ``keys`` (``default`` where the last key is absent)."""
    node: Any = raw
    for key in keys[:-1]:
        node = node[key]
    if isinstance(node, list):
        return node[keys[-1]]
    return node.get(keys[-1], default)


def set_path(raw: dict[str, Any], keys: tuple[Key, ...], value: Any) -> None:
    """Set the value at ``keys`` in place (the containers on the way must exist)."""
    node: Any = raw
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value

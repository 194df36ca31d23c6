"""``bench plugins`` and ``bench new``: the components bench knows, and a new one written from a template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from bench.cli.common import NEW_KINDS, PLUGIN_KINDS, PluginsOpt, choices, err, fail, out
from bench.errors import BenchError


def list_plugins(
    kind: Annotated[str | None, typer.Option(help="model, dataset, trigger (or attack) or defense.",
                                             **choices(PLUGIN_KINDS))] = None,
    pattern: Annotated[str, typer.Argument(help="Glob on the component name.")] = "*",
    plugins: PluginsOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the components as JSON instead of a table.")] = False,
) -> None:
    """List every known component with its source, parameters and one-line doc."""
    from bench.plugins import load_plugins
    from bench.registry import KINDS, REGISTRY

    try:
        kind = "trigger" if kind == "attack" else kind  # scenarios say attacks:, the registry trigger
        if kind is not None and kind not in KINDS:
            raise BenchError(f"--kind: must be one of {', '.join(KINDS)}, got {kind!r}")
        load_plugins(plugins or [])
        components = list(REGISTRY.list(kind, pattern))
    except BenchError as exc:
        raise fail(exc) from None
    if as_json:
        typer.echo(json.dumps([
            {"kind": c.kind, "name": c.name, "source": c.source, "doc": c.doc, **_threat_model(c),
             "parameters": [{"name": p.name, "type": str(p.annotation), "required": p.required,
                             **({} if p.required else {"default": p.default})} for p in c.params]}
            for c in components], indent=2, default=repr))
        return
    table = Table(show_lines=False)
    for col in ("kind", "name", "source", "parameters", "doc"):
        table.add_column(col, overflow="fold")
    for comp in components:
        params = ", ".join(
            f"{p.name}: {p.annotation}" + ("" if p.required else f" = {p.default!r}") for p in comp.params
        )
        sees = _threat_model(comp)
        doc = comp.doc + (f" [sees: {' + '.join(sees['sees'])}]" if sees else "")
        table.add_row(comp.kind, comp.name, comp.source, params, doc)
    out.print(table)


def _threat_model(component: object) -> dict[str, list[str]]:
    """``{"sees": [...]}`` for a defense (what its threat model hands it), else nothing."""
    if getattr(component, "kind", None) != "defense":
        return {}
    from bench.defenses.base import DEFAULT_SEES, THREAT_MODEL

    sees = getattr(getattr(component, "factory", None), "sees", DEFAULT_SEES)
    return {"sees": [k for k in THREAT_MODEL if k in sees]}


def new_command(
    kind: Annotated[str, typer.Argument(help="attack, defense, model or dataset.",
                                        **choices(NEW_KINDS, metavar=False))],
    name: Annotated[str, typer.Argument(help="Registered name, e.g. my_attack (a-z, 0-9, '_', '-').")],
    directory: Annotated[Path, typer.Option("--dir", help="Folder to write NAME.py and test_NAME.py into.")]
    = Path("plugins"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing files.")] = False,
) -> None:
    """Write a working plugin (attack, defense, model or dataset) and its tests, ready to edit."""
    from bench.scaffold import new

    try:
        written = new(kind, name, directory, force)
    except BenchError as exc:
        raise fail(exc) from None
    plugin, test = written
    for path in written:
        err.print(f"wrote {path}", highlight=False, soft_wrap=True)
    err.print(
        f"next: bench plugins --plugins {plugin}   |   python -m pytest {test}   |   then list the file "
        "under a scenario's plugins: (paths there are relative to the scenario file)",
        highlight=False, soft_wrap=True,
    )

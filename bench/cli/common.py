"""What every ``bench`` command shares: the two consoles, the user-mistake exit, options used by several
commands, and the choices some options take (shown in ``--help`` and offered by shell completion).

Messages and progress go to stderr (:data:`err`), data to stdout (:data:`out`, ``typer.echo``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from bench.errors import BenchError

err = Console(stderr=True)
out = Console()

#: Choices of options that take one of a few words; the commands check them themselves (exit 2 with a
#: one-line message), these only show them in ``--help`` and offer them to shell completion.
REPORT_FORMATS = ("md", "csv", "json", "html")
EXPORT_TARGETS = ("mlflow", "tensorboard")
EXECUTORS = ("local", "ray")
PLUGIN_KINDS = ("model", "dataset", "trigger", "attack", "defense")  # "attack" is the scenarios' word
NEW_KINDS = ("attack", "defense", "model", "dataset")


def choices(values: Sequence[str], metavar: bool = True) -> dict[str, object]:
    """``typer.Option`` / ``typer.Argument`` keywords that complete ``values`` in the shell and, for an
    option, show them as its metavar in ``--help`` (an argument's help text names them: a metavar would
    replace its name there); how the command checks the value does not change."""

    def complete(incomplete: str) -> list[str]:
        return [v for v in values if v.startswith(incomplete)]

    shown = {"metavar": "<" + "|".join(values) + ">"} if metavar else {}
    return {**shown, "autocompletion": complete}


def fail(exc: BenchError) -> typer.Exit:
    """Print a user mistake as one line on stderr; the exit (code 2) for the caller to raise."""
    err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, markup=True, soft_wrap=True)
    return typer.Exit(2)


ScenarioArg = Annotated[Path, typer.Argument(help="Scenario YAML file, e.g. scenarios/quickstart.yaml.")]
PluginsOpt = Annotated[
    list[str] | None, typer.Option("--plugins", help="Plugin file or folder to load (repeatable).")
]
RunsDirOpt = Annotated[Path, typer.Option("--runs-dir", help="Where result stores live (runs/<name>/).")]
ReportsDirOpt = Annotated[Path, typer.Option("--reports-dir", help="Where reports are written.")]
DeviceOpt = Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:1 ... (overrides the scenario).")]
SmokeOpt = Annotated[bool, typer.Option("--smoke", help="Every kind of cell at toy scale, as its own study "
                                        "<name>-smoke: first seed, highest rate, 1 epoch, 64/32 images.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a field of the scenario file: "
                                                 "--set train.epochs=1 --set poison_rates=[0.01] (dotted path, "
                                                 "YAML value; repeatable).")]
DataRootOpt = Annotated[Path | None, typer.Option("--data-root", help="Every data set with a root reads from "
                                                  "this folder (overrides the scenario's root).")]

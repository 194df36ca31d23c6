"""The ``bench`` command: a thin Typer skin over :mod:`bench.runner` and friends, one module per group.

* :mod:`bench.cli.run`: ``plan``, ``run``
* :mod:`bench.cli.report`: ``report``, ``export``
* :mod:`bench.cli.analysis`: ``show-triggers``, ``analyze``
* :mod:`bench.cli.plugins`: ``plugins``, ``new``
* :mod:`bench.cli.search`: ``search``
* :mod:`bench.cli.common`: the consoles, the user-mistake exit, shared options and choices

Messages and progress go to stderr, data (plans as JSON, reports) to stdout, so ``bench report ... |
jq`` works. User mistakes exit with code 2 and a one-line message; a failing run exits 1. Shell
completion: ``bench --install-completion`` (or ``--show-completion`` to see the script).
"""

from __future__ import annotations

from typing import Annotated

import typer

from bench.cli.analysis import analyze, show_triggers
from bench.cli.common import err, out
from bench.cli.plugins import list_plugins, new_command
from bench.cli.report import export, report
from bench.cli.run import plan, run
from bench.cli.search import search

__all__ = ["app", "err", "main", "out"]

app = typer.Typer(
    add_completion=True,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="pmoe-bench: backdoor attacks and defenses on patch-level Mixture-of-Experts classifiers.",
)


def _version(value: bool) -> None:
    if value:
        from bench import __version__
        from bench.store import git_commit

        typer.echo(f"pmoe-bench {__version__} (commit {git_commit()})")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and the code's git commit, then exit.")] = False,
) -> None:
    """pmoe-bench: backdoor attacks and defenses on patch-level Mixture-of-Experts classifiers."""


# in the order `bench --help` lists them
app.command("plan")(plan)
app.command("run")(run)
app.command("report")(report)
app.command("export")(export)
app.command("show-triggers")(show_triggers)
app.command("plugins")(list_plugins)
app.command("analyze")(analyze)
app.command("new")(new_command)
app.command("search")(search)


def main() -> None:
    """Console-script entry point."""
    app()

"""The ``bench`` command line as one package (bench/cli/): every command in its place, choices shown in
``--help`` and offered by shell completion, ``--json`` a flag, ``python -m bench.cli`` the same command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.cli import app, common

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]

COMMANDS = ["plan", "run", "report", "export", "show-triggers", "plugins", "analyze", "new", "search"]


def test_every_command_is_listed_in_order() -> None:
    assert [c.name for c in app.registered_commands] == COMMANDS
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    shown = [line.split()[1] for line in result.stdout.splitlines()
             if line.startswith("│ ") and len(line.split()) > 1 and line.split()[1] in COMMANDS]
    assert shown == COMMANDS
    assert "--install-completion" in result.stdout and "--show-completion" in result.stdout


def test_no_args_shows_help_and_python_dash_m_is_bench() -> None:
    done = subprocess.run([sys.executable, "-m", "bench.cli", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    assert all(name in done.stdout for name in COMMANDS)
    # no arguments at all: the same help (click exits 0 or 2 here depending on its version), no error
    bare = runner.invoke(app, [], env={"COLUMNS": "200"})
    assert bare.exit_code in (0, 2) and "Missing command" not in bare.output, bare.output
    assert "Usage:" in bare.output and "pmoe-bench: backdoor attacks" in bare.output
    listed = [line.split()[1] for line in bare.output.splitlines()
              if line.startswith("│ ") and len(line.split()) > 1 and line.split()[1] in COMMANDS]
    assert listed == COMMANDS
    # the console script `bench` is the same entry point as `python -m bench.cli`
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert scripts["bench"] == "bench.cli:main"
    assert "from bench.cli import main" in (ROOT / "bench" / "cli" / "__main__.py").read_text(encoding="utf-8")


@pytest.mark.parametrize(("command", "shown"), [
    (["report"], "<md|csv|json|html>"),
    (["export"], "<mlflow|tensorboard>"),
    (["plugins"], "<model|dataset|trigger|attack|defense>"),
    (["run"], "<local|ray>"),
    (["new"], "attack, defense, model or dataset"),
])
def test_choices_are_shown_in_help(command: list[str], shown: str) -> None:
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and shown in result.stdout


def test_choices_match_what_the_commands_accept() -> None:
    from bench import scaffold
    from bench.export import TARGETS
    from bench.registry import KINDS

    assert set(common.PLUGIN_KINDS) == {*KINDS, "attack"}
    assert set(common.NEW_KINDS) == {k for k in scaffold.KINDS if k != "trigger"}
    assert tuple(TARGETS) == common.EXPORT_TARGETS


def test_a_bad_choice_still_gets_the_commands_own_message() -> None:
    result = runner.invoke(app, ["report", "runs/x", "--format", "pdf"])
    assert result.exit_code == 2 and "--format: must be md, csv, json or html, got 'pdf'" in result.stderr
    result = runner.invoke(app, ["plugins", "--kind", "attacks"])
    assert result.exit_code == 2 and "--kind: must be one of" in result.stderr


def _complete(words: str) -> list[str]:
    cword = len(words.split()) - (0 if words.endswith(" ") else 1)
    env = {"_BENCH_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
    result = runner.invoke(app, [], env=env, prog_name="bench")
    return result.stdout.split()


def test_shell_completion_offers_commands_and_choices(monkeypatch) -> None:
    assert _complete("bench pl") == ["plan", "plugins"]
    assert _complete("bench report runs/x --format ") == ["md", "csv", "json", "html"]
    assert _complete("bench plugins --kind d") == ["dataset", "defense"]
    assert _complete("bench new ") == ["attack", "defense", "model", "dataset"]
    assert _complete("bench export runs/x --to t") == ["tensorboard"]
    # the script for a named shell: without this, Typer detects the shell from the process tree (shellingham),
    # which a test run started outside a shell does not have
    monkeypatch.setenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", "1")
    script = runner.invoke(app, ["--show-completion", "bash"], prog_name="bench")
    assert script.exit_code == 0 and "_BENCH_COMPLETE" in script.stdout, (script.exception, script.output)


def test_json_is_a_flag_that_takes_no_value() -> None:
    # `--json model` would swallow the pattern if --json took a value
    result = runner.invoke(app, ["plugins", "--json", "pmoe"])
    assert result.exit_code == 0, result.output
    assert '"name": "pmoe"' in result.stdout and '"kind": "dataset"' not in result.stdout
    assert runner.invoke(app, ["plugins", "--json=yes"]).exit_code == 2

"""The Python API: the docs' example runs as written, and the API and the CLI share one store."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import bench
from bench.cli import app
from bench.errors import ScenarioError
from tests.conftest import tiny_scenario

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_the_documented_example_runs(tmp_path, monkeypatch, capsys):
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(DOC), "exec"), {})
    out = capsys.readouterr().out
    assert re.search(r"BadNets: BA 0\.\d+, ASR [01]\.\d+ over 1 seed", out)
    assert (tmp_path / "reports" / "api_example.md").is_file()


def test_api_and_cli_share_the_store_and_numbers(write_scenario, tmp_path):
    path = write_scenario(tiny_scenario(attacks=[]))
    study = bench.Study.from_file(path, runs_dir=tmp_path / "runs", reports_dir=tmp_path / "reports")
    assert study.plan()["jobs"]["train"]["done"] == 0
    study.run()
    result = CliRunner().invoke(app, ["run", str(path), "--runs-dir", str(tmp_path / "runs"),
                                      "--reports-dir", str(tmp_path / "reports")])
    assert "ran 0 jobs" in result.output  # the CLI finds the API's jobs stored
    assert study.plan()["jobs"]["train"]["done"] == 1
    (row,) = study.results()
    assert row["attack"] == "clean" and 0.3 < row["ba_mean"] <= 1.0 and row["ba_n"] == 1


def test_api_mistakes_raise_the_clis_messages(tmp_path):
    with pytest.raises(ScenarioError, match=r"train\.epochs"):
        bench.Study.from_dict(tiny_scenario(), overrides=["train.epochs=0"], runs_dir=tmp_path)
    with pytest.raises(ScenarioError, match="a scenario is a mapping"):
        bench.Study.from_dict(["not", "a", "mapping"])  # type: ignore[arg-type]

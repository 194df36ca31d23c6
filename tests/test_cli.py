"""End-to-end: the `bench` command on tiny real data (digits), resume, reports, bad input."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench import __version__
from bench.cli import app
from bench.store import Store
from tests.conftest import tiny_scenario

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def _run(path: Path, tmp_path: Path, *extra: str):
    return invoke("run", str(path), "--runs-dir", str(tmp_path / "runs"), "--reports-dir",
                  str(tmp_path / "reports"), *extra)


def _rows(tmp_path: Path, name: str = "tiny") -> int:
    with sqlite3.connect(tmp_path / "runs" / name / "results.db") as conn:
        return conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]


def _rows_so_far(tmp_path: Path) -> int:
    """Rows of a store another process is creating: none while its file exists but its table does not yet."""
    try:
        return _rows(tmp_path)
    except sqlite3.OperationalError:  # "no such table" or "database is locked" during creation
        return 0


def test_run_writes_report_and_second_run_does_nothing(write_scenario, tmp_path):
    path = write_scenario(tiny_scenario())
    first = _run(path, tmp_path)
    assert first.exit_code == 0, first.output
    assert "ran 4 jobs" in first.output
    report = (tmp_path / "reports" / "tiny.md").read_text()
    assert "| attack" in report and "badnets" in report and "clean" in report
    assert "Leaderboard" in report and "Headline rule" in report
    second = _run(path, tmp_path)
    assert second.exit_code == 0
    assert "ran 0 jobs" in second.output and "4 already done" in second.output
    assert _rows(tmp_path) == 4


def test_changing_one_parameter_reruns_only_its_jobs(write_scenario, tmp_path):
    assert _run(write_scenario(tiny_scenario()), tmp_path).exit_code == 0
    changed = _run(write_scenario(tiny_scenario(poison_rates=[0.1, 0.2])), tmp_path)
    assert changed.exit_code == 0
    assert "ran 2 jobs" in changed.output  # one train + one evaluate for the new rate
    fresh = _run(write_scenario(tiny_scenario(poison_rates=[0.1, 0.2])), tmp_path, "--fresh")
    assert "ran 6 jobs" in fresh.output


def test_plan_and_dry_run(write_scenario, tmp_path):
    path = write_scenario(tiny_scenario(seeds=[0, 1], poison_rates=[0.05, 0.1]))
    result = invoke("plan", str(path), "--json", "--runs-dir", str(tmp_path / "runs"))
    assert result.exit_code == 0
    plan = json.loads(result.stdout)
    assert plan["cells"] == 6 and plan["jobs"]["train"]["total"] == 6 and plan["jobs"]["train"]["done"] == 0
    assert all(j["spec"] for j in plan["jobs_detail"])
    dry = invoke("run", str(path), "--dry-run", "--runs-dir", str(tmp_path / "runs"))
    assert dry.exit_code == 0 and "train jobs" in dry.output
    assert not (tmp_path / "runs" / "tiny" / "results.db").exists()  # a dry run computes nothing


def test_report_formats(write_scenario, tmp_path):
    assert _run(write_scenario(tiny_scenario()), tmp_path).exit_code == 0
    run_dir = str(tmp_path / "runs" / "tiny")
    as_json = invoke("report", run_dir, "--format", "json")
    data = json.loads(as_json.stdout)
    rows = {r["attack"]: r for r in data["rows"]}
    assert 0 <= rows["badnets"]["asr_mean"] <= 1 and rows["clean"]["ba_n"] == 1
    assert rows["badnets"]["cad_mean"] == pytest.approx(rows["clean"]["ba_mean"] - rows["badnets"]["ba_mean"])
    as_csv = invoke("report", run_dir, "--format", "csv")
    assert as_csv.stdout.splitlines()[0].startswith("dataset,model")
    out = tmp_path / "r.md"
    assert invoke("report", run_dir, "--out", str(out)).exit_code == 0 and out.read_text().startswith("# pmoe-bench")
    assert "](reports/tiny/triggers-digits-pmoe-0.png)" in out.read_text()  # linked relative to the file
    assert invoke("report", run_dir, "--format", "xml").exit_code == 2


def test_show_triggers_draws_every_attack_without_training(write_scenario, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = tiny_scenario(attacks=[{"name": "badnets", "target": 0}, {"name": "blend", "target": 0}])
    result = invoke("show-triggers", str(write_scenario(raw)), "--out", str(tmp_path / "pics"))
    assert result.exit_code == 0, result.output
    (png,) = [Path(line) for line in result.stdout.split()]
    assert png.parent == tmp_path / "pics" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "runs").exists()  # nothing trained, no store
    bad = tiny_scenario(attacks=[{"name": "badnets", "target": 10}])
    failed = invoke("show-triggers", str(write_scenario(bad, "bad.yaml")))
    assert failed.exit_code == 2 and "is not a class of dataset 'digits'" in failed.output


def test_report_names_the_code_behind_its_results(write_scenario, tmp_path):
    assert _run(write_scenario(tiny_scenario()), tmp_path).exit_code == 0
    run_dir = tmp_path / "runs" / "tiny"
    n_jobs = len(Store(run_dir).records())
    (one,) = json.loads(invoke("report", str(run_dir), "--format", "json").stdout)["meta"]["provenance"]
    assert one["jobs"] == n_jobs and one["version"] == __version__
    # a clean training reused from an older, uncommitted checkout: the report must say so
    clean_train = next(r.id for r in Store(run_dir).records().values() if r.kind == "train" and not r.spec["attack"])
    with sqlite3.connect(run_dir / "results.db") as conn:
        conn.execute("UPDATE jobs SET git_commit = 'a1b2c3d4e5f6a7b8+dirty' WHERE id = ?", (clean_train,))
    entries = json.loads(invoke("report", str(run_dir), "--format", "json").stdout)["meta"]["provenance"]
    assert sorted(e["jobs"] for e in entries) == [1, n_jobs - 1]
    text = " ".join(invoke("report", str(run_dir)).stdout.split())
    assert "ran on 2 code states" in text and "a1b2c3d4e5f6+dirty (pmoe-bench" in text and "--fresh" in text


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("name: x\nmodels: [ {name: pmoe\n", "YAML syntax error"),
        (tiny_scenario(poison_rates=[1.5]), "poison_rates"),
        (tiny_scenario(models=[{"name": "pmo"}]), "Did you mean 'pmoe'"),
        (tiny_scenario(attacks=[{"name": "badnets", "target": 10}]), "is not a class of dataset 'digits'"),
        (tiny_scenario(train={"epochs": "many"}), "train.epochs"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(write_scenario, tmp_path, content, expected):
    path = write_scenario(content)
    result = _run(path, tmp_path)
    assert result.exit_code == 2
    assert expected in result.output and str(path.name) in result.output
    assert "Traceback" not in result.output


def test_bad_store_and_missing_files_exit_2(tmp_path):
    assert invoke("run", str(tmp_path / "missing.yaml")).exit_code == 2
    assert invoke("report", str(tmp_path / "nowhere")).exit_code == 2
    broken = tmp_path / "runs" / "broken"
    broken.mkdir(parents=True)
    (broken / "results.db").write_bytes(b"garbage" * 500)
    result = invoke("report", str(broken))
    assert result.exit_code == 2 and "results.db" in result.output
    assert (broken / "results.db").read_bytes() == b"garbage" * 500  # nothing touched


def test_nothing_stored_is_lost_on_a_later_bad_input(write_scenario, tmp_path):
    assert _run(write_scenario(tiny_scenario()), tmp_path).exit_code == 0
    assert _run(write_scenario(tiny_scenario(poison_rates=[7])), tmp_path).exit_code == 2
    assert _rows(tmp_path) == 4


def test_killed_run_resumes_losing_at_most_the_job_in_flight(write_scenario, tmp_path):
    # long enough (about a second a training) that the poll below always sees a first row before the last one
    path = write_scenario(tiny_scenario(train={"epochs": 6, "lr": 0.05}, poison_rates=[0.05, 0.1, 0.2]))
    cmd = [sys.executable, "-m", "bench.cli", "run", str(path), "--runs-dir", str(tmp_path / "runs"),
           "--reports-dir", str(tmp_path / "reports")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    db = tmp_path / "runs" / "tiny" / "results.db"
    deadline = time.time() + 240
    while time.time() < deadline:
        if db.exists() and _rows_so_far(tmp_path) >= 1:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = _rows(tmp_path)
    assert 1 <= done_before < 8
    result = _run(path, tmp_path)
    assert result.exit_code == 0
    assert f"ran {8 - done_before} jobs" in result.output and f"{done_before} already done" in result.output
    assert _rows(tmp_path) == 8


def test_plugins_lists_builtins():
    result = invoke("plugins")
    assert result.exit_code == 0
    for name in ("pmoe", "dense", "digits", "badnets", "blend", "wanet"):
        assert name in result.output
    assert invoke("plugins", "--kind", "attacker").exit_code == 2  # unknown kind ("attack" is trigger)


def test_version_names_the_package_version_and_commit():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.startswith(f"pmoe-bench {__version__} (commit ")


def test_plugins_json_lists_components_with_their_parameters():
    result = CliRunner().invoke(app, ["plugins", "--json", "--kind", "trigger"])
    assert result.exit_code == 0, result.output
    components = json.loads(result.stdout)
    badnets = next(c for c in components if c["name"] == "badnets")
    assert badnets["kind"] == "trigger" and badnets["source"] == "built-in"
    size = next(p for p in badnets["parameters"] if p["name"] == "size")
    assert size["required"] is False and isinstance(size["default"], int)
    assert {c["kind"] for c in components} == {"trigger"} and "sees" not in badnets
    defenses = json.loads(CliRunner().invoke(app, ["plugins", "--json", "--kind", "defense"]).stdout)
    sees = {c["name"]: c["sees"] for c in defenses}
    assert sees["fine-pruning"] == ["model", "clean"] and sees["abl"] == ["poisoned"]


def test_report_and_plugins_accept_the_names_users_use(write_scenario, tmp_path):
    path = write_scenario(tiny_scenario(attacks=[]), "tiny.yaml")
    runner = CliRunner()
    runs = str(tmp_path / "runs")
    assert runner.invoke(app, ["run", str(path), "--runs-dir", runs, "--reports-dir", str(tmp_path)]).exit_code == 0
    by_folder = runner.invoke(app, ["report", str(tmp_path / "runs" / "tiny"), "--format", "json"])
    by_file = runner.invoke(app, ["report", str(path), "--runs-dir", runs, "--format", "json"])
    assert by_file.exit_code == 0, by_file.output
    assert json.loads(by_file.stdout)["rows"] == json.loads(by_folder.stdout)["rows"]
    attacks = runner.invoke(app, ["plugins", "--kind", "attack", "--json"])
    assert {c["kind"] for c in json.loads(attacks.stdout)} == {"trigger"}


def test_clean_label_rate_beyond_the_target_class_is_refused_before_training(write_scenario, tmp_path):
    attack = {"name": "badnets", "size": 2, "position": "top-left", "target": 0, "mode": "clean-label"}
    path = write_scenario(tiny_scenario(attacks=[attack], poison_rates=[0.5]))
    result = CliRunner().invoke(app, ["run", str(path), "--runs-dir", str(tmp_path / "runs"),
                                      "--reports-dir", str(tmp_path / "reports")])
    assert result.exit_code == 2, result.output
    assert "poison_rates: 0.5" in result.output and "attacks[0] (mode clean-label)" in result.output
    assert not list((tmp_path / "runs").rglob("*.pt"))  # nothing trained

"""`bench export`: a real tiny run exported to MLflow and TensorBoard, then read back with each tracker's own
reader (MlflowClient, TensorBoard's EventAccumulator) and compared with the store."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from bench import __version__
from bench.cli import app
from bench.store import JobRecord, Store
from tests.conftest import tiny_scenario

pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")

from mlflow.tracking import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData  # noqa: E402

cli = CliRunner()
EPOCHS = 2


def invoke(*args: str):
    return cli.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """A real run of the tiny scenario with a defense (nested and text metrics, evaluations of defended
    stages), two epochs (two loss steps): (its scenario file, its runs dir). Read-only for the tests."""
    import yaml

    base = tmp_path_factory.mktemp("export")
    scenario = tiny_scenario(
        train={"epochs": EPOCHS, "batch_size": 32, "lr": 0.05},
        defenses=[{"name": "fine-pruning", "epochs": 1, "budget": 0.05}],
    )
    path = base / "tiny.yaml"
    path.write_text(yaml.safe_dump(scenario, sort_keys=False))
    result = invoke("run", str(path), "--runs-dir", str(base / "runs"), "--reports-dir", str(base / "reports"))
    assert result.exit_code == 0, result.output
    return path, base / "runs"


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """A private copy of the tiny run's folder (tests that export into it or change its rows)."""
    shutil.copytree(tiny_run[1] / "tiny", tmp_path / "tiny")
    return tmp_path / "tiny"


@pytest.fixture(scope="module")
def blank_mlflow_db(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables and no experiment: creating one costs seconds of migrations,
    so the tests that do not check that path start from a copy of this one."""
    path = tmp_path_factory.mktemp("mlflow") / "blank.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


def records(folder: Path) -> dict[str, JobRecord]:
    return Store(folder).records()


def leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    """Every non-mapping value of a nested mapping by its dotted path (written apart from bench.export)."""
    if not isinstance(value, dict) or not value:
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, inner in value.items():
        out.update(leaves(inner, f"{prefix}.{key}" if prefix else key))
    return out


def numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in leaves(metrics).items() if isinstance(v, (int, float))}


def mlflow_runs(uri: str, experiment: str = "tiny") -> list[Any]:
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r} at {uri}"
    return client.search_runs([found.experiment_id], max_results=1000)


def test_mlflow_export_reads_back_as_the_store(tiny_run, run_copy):
    scenario, _ = tiny_run
    result = invoke("export", str(run_copy), "--to", "mlflow")
    assert result.exit_code == 0, result.output
    uri = f"sqlite:///{(run_copy / 'mlflow.db').resolve()}"
    assert result.stdout.strip() == uri
    stored = records(run_copy)
    assert {r.kind for r in stored.values()} == {"train", "defend", "evaluate"}
    runs = mlflow_runs(uri)
    assert len(runs) == len(stored) == 7  # 2 trainings, 1 defense, 4 evaluations
    client = MlflowClient(tracking_uri=uri)
    assert {run.data.tags["pmoe.job_id"] for run in runs} == set(stored)
    for run in runs:
        record = stored[run.data.tags["pmoe.job_id"]]
        # the resolved spec, every leaf, as dotted parameters (text as is, the rest as JSON)
        expected = {k: v if isinstance(v, str) else json.dumps(v) for k, v in leaves(record.spec).items()}
        assert run.data.params == expected
        # every number of the row; the per-epoch losses as steps, nothing else under the list's name
        scalars = numbers(record.metrics)
        assert run.data.metrics.keys() - {"loss"} == scalars.keys()
        for key, value in scalars.items():
            assert run.data.metrics[key] == pytest.approx(value, rel=1e-12), key
        history = client.get_metric_history(run.info.run_id, "loss")
        if record.kind == "train":
            assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))
            assert [m.value for m in sorted(history, key=lambda m: m.step)] == record.metrics["epoch_losses"]
        else:
            assert history == []
        tags = run.data.tags
        assert tags["pmoe.git_commit"] == record.git_commit and tags["pmoe.version"] == __version__
        assert tags["pmoe.kind"] == record.kind and tags["pmoe.device"] == record.device
        assert json.loads(tags["pmoe.deps"]) == record.deps
        assert run.info.run_name.startswith(f"{record.kind} pmoe/digits ")
        assert run.info.status == "FINISHED"
    names = sorted(run.info.run_name for run in runs)
    assert "train pmoe/digits badnets@0.1 seed 0" in names and "train pmoe/digits clean seed 0" in names
    assert "evaluate pmoe/digits badnets@0.1 seed 0 fine-pruning/finetuned" in names
    defend = next(run for run in runs if run.data.tags["pmoe.kind"] == "defend")
    assert defend.data.tags["pmoe.metric.sees"] == stored[defend.data.tags["pmoe.job_id"]].metrics["sees"]
    assert "finetuned.final_loss" in defend.data.metrics
    # the scenario file names the same run folder; an experiment's artifacts stay in the run folder
    again = invoke("export", str(scenario), "--runs-dir", str(tiny_run[1]), "--to", "mlflow", "--uri", uri)
    assert again.exit_code == 0 and "7 unchanged" in again.output, again.output
    location = client.get_experiment_by_name("tiny").artifact_location
    assert location == (run_copy / "mlflow-artifacts").resolve().as_uri()


def test_mlflow_reexport_skips_unchanged_and_replaces_a_rerecorded_job(run_copy, blank_mlflow_db):
    shutil.copyfile(blank_mlflow_db, run_copy / "elsewhere.db")
    uri = f"sqlite:///{run_copy / 'elsewhere.db'}"
    assert invoke("export", str(run_copy), "--to", "mlflow", "--uri", uri).exit_code == 0
    first = {run.data.tags["pmoe.job_id"]: run.info.run_id for run in mlflow_runs(uri)}
    second = invoke("export", str(run_copy), "--to", "mlflow", "--uri", uri)
    assert second.exit_code == 0 and "0 run(s) created, 0 replaced, 7 unchanged" in second.output
    assert {run.data.tags["pmoe.job_id"]: run.info.run_id for run in mlflow_runs(uri)} == first
    # a job recorded again (as --retry-failed or a regenerated model does): its run is replaced, not doubled
    store = Store(run_copy)
    job = next(r for r in store.records().values() if r.kind == "evaluate" and "asr" in r.metrics)
    store.record(job.id, job.kind, job.spec, job.deps, {**job.metrics, "ba": 0.123}, job.seconds, job.device)
    third = invoke("export", str(run_copy), "--to", "mlflow", "--uri", uri)
    assert third.exit_code == 0 and "0 run(s) created, 1 replaced, 6 unchanged" in third.output
    runs = mlflow_runs(uri)
    assert len(runs) == 7
    mine = [run for run in runs if run.data.tags["pmoe.job_id"] == job.id]
    assert len(mine) == 1 and mine[0].data.metrics["ba"] == 0.123 and mine[0].info.run_id != first[job.id]
    assert {r.data.tags["pmoe.job_id"]: r.info.run_id for r in runs if r.data.tags["pmoe.job_id"] != job.id} == {
        k: v for k, v in first.items() if k != job.id
    }


def test_mlflow_failed_job_and_odd_metrics(tmp_path, blank_mlflow_db):
    """A failed row: run status FAILED with its reason as a tag; None left out, booleans as 0/1, a list of
    numbers as steps from 0, a list of text as a JSON tag."""
    store = Store(tmp_path / "odd")
    store.set_meta("scenario", {"name": "odd"})
    spec = {
        "model": {"name": "pmoe", "experts": 4},
        "dataset": {"name": "digits"},
        "attack": None,
        "seed": 3,
        "poison_rate": None,
        "train": {"epochs": 3, "lr": 0.1, "schedule": None, "grid": [1, 2]},
    }
    metrics = {
        "failed": "training diverged: mean loss nan in epoch 2",
        "failed_epoch": 2,
        "flag": True,
        "skipped": None,
        "curve": [0.5, 0.25],
        "names": ["a", "b"],
        "epoch_losses": [2.0],
    }
    store.record("tr-0123456789abcdef", "train", spec, [], metrics, 1.5, "cpu")
    shutil.copyfile(blank_mlflow_db, tmp_path / "odd" / "mlflow.db")
    result = invoke("export", str(tmp_path / "odd"), "--to", "mlflow")
    assert result.exit_code == 0, result.output
    (run,) = mlflow_runs(f"sqlite:///{(tmp_path / 'odd' / 'mlflow.db').resolve()}", "odd")
    assert run.info.status == "FAILED" and run.data.tags["pmoe.status"] == "failed"
    assert run.data.tags["pmoe.metric.failed"] == metrics["failed"]
    assert run.data.tags["pmoe.metric.names"] == '["a", "b"]'
    assert run.data.params["train.schedule"] == "null" and run.data.params["train.grid"] == "[1, 2]"
    assert run.data.params["model.name"] == "pmoe" and run.data.params["train.lr"] == "0.1"
    assert run.data.metrics == {"failed_epoch": 2.0, "flag": 1.0, "curve": 0.25, "loss": 2.0}
    client = MlflowClient(tracking_uri=f"sqlite:///{(tmp_path / 'odd' / 'mlflow.db').resolve()}")
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "curve")] == [(0, 0.5), (1, 0.25)]
    assert run.info.run_name == "train pmoe/digits clean seed 3"


def _accumulator(folder: Path) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_export_reads_back_as_the_store(tiny_run, run_copy):
    result = invoke("export", str(run_copy), "--to", "tensorboard")
    assert result.exit_code == 0, result.output
    out = run_copy / "tensorboard"
    assert result.stdout.strip() == str(out)
    stored = records(run_copy)
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(folders) == len(stored) == 7
    assert {f.name.rpartition("__")[2] for f in folders} == set(stored)
    for folder in folders:
        record = stored[folder.name.rpartition("__")[2]]
        acc = _accumulator(folder)
        scalars = numbers(record.metrics)
        assert set(acc.Tags()["scalars"]) - {"loss"} == scalars.keys()
        for key, value in scalars.items():
            (event,) = acc.Scalars(key)
            assert event.step == 0 and event.value == pytest.approx(value, rel=1e-6, abs=1e-6), key
        if record.kind == "train":
            loss = acc.Scalars("loss")
            assert [e.step for e in loss] == list(range(1, EPOCHS + 1))
            assert [e.value for e in loss] == pytest.approx(record.metrics["epoch_losses"], rel=1e-6)
        else:
            assert "loss" not in acc.Tags()["scalars"]
        (text,) = acc.Tensors("spec/text_summary")
        spec_text = text.tensor_proto.string_val[0].decode()
        for key, value in leaves(record.spec).items():
            shown = value if isinstance(value, str) else json.dumps(value)
            assert f"| {key} | {shown} |" in spec_text
        (tags,) = acc.Tensors("tags/text_summary")
        assert record.git_commit in tags.tensor_proto.string_val[0].decode()
        hparams = HParamsPluginData.FromString(acc.PluginTagToContent("hparams")["_hparams_/session_start_info"])
        values = hparams.session_start_info.hparams
        assert values["model.name"].string_value == "pmoe"
        assert values["model.experts"].number_value == record.spec["model"]["experts"] == 2


def test_tensorboard_reexport_is_idempotent(run_copy, tmp_path):
    out = tmp_path / "tb"
    assert invoke("export", str(run_copy), "--to", "tensorboard", "--uri", str(out)).exit_code == 0

    def event_files() -> dict[Path, float]:
        return {p: p.stat().st_mtime_ns for p in out.glob("*/events.out.tfevents.*")}

    before = event_files()
    assert len(before) == 7
    again = invoke("export", str(run_copy), "--to", "tensorboard", "--uri", str(out))
    assert again.exit_code == 0 and "7 unchanged" in again.output
    assert event_files() == before
    store = Store(run_copy)
    job = next(r for r in store.records().values() if r.kind == "train")
    changed = [*job.metrics["epoch_losses"][:-1], 0.001]
    store.record(
        job.id, job.kind, job.spec, job.deps, {**job.metrics, "epoch_losses": changed}, job.seconds, job.device
    )
    third = invoke("export", str(run_copy), "--to", "tensorboard", "--uri", str(out))
    assert third.exit_code == 0 and "1 replaced, 6 unchanged" in third.output
    (folder,) = out.glob(f"*__{job.id}")
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1  # the old events gone, not appended to
    assert [e.value for e in _accumulator(folder).Scalars("loss")] == pytest.approx(changed, rel=1e-6)
    assert len(list(out.iterdir())) == 7


@pytest.mark.parametrize("target", ["mlflow", "tensorboard"])
def test_missing_tracker_exits_2_with_the_install_command(run_copy, monkeypatch, target):
    monkeypatch.setitem(sys.modules, target, None)  # `import <target>` now raises ImportError
    result = invoke("export", str(run_copy), "--to", target)
    assert result.exit_code == 2
    assert f"the package '{target}' is not installed" in result.output and 'pip install -e ".[track]"' in result.output
    assert "Traceback" not in result.output
    assert not (run_copy / "mlflow.db").exists() and not (run_copy / "tensorboard").exists()


def test_bad_target_or_run_exits_2(run_copy, tmp_path):
    wrong = invoke("export", str(run_copy), "--to", "wandb")
    assert wrong.exit_code == 2 and "must be one of mlflow, tensorboard" in wrong.output
    missing = invoke("export", str(tmp_path / "nowhere"), "--to", "tensorboard")
    assert missing.exit_code == 2 and "no results store here" in missing.output
    assert not (tmp_path / "nowhere").exists()

"""What makes a cell trustworthy before and after it runs: plan-time checks with file-and-field messages,
not-applicable cells planned without jobs, diverged trainings recorded as failed (never as results), and a
``--fresh`` that deletes nothing outside the store."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bench import plan as planning
from bench import runner as runs
from bench import scenario as sc
from bench.applicability import Geometry, defense_not_applicable, quant_not_applicable
from bench.cli import app
from bench.data.info import DatasetInfo
from bench.errors import ScenarioError, StoreError, TrainingDiverged
from bench.plan import defense_stages
from bench.store import MARKER, Store, remove_store
from bench.train import fit
from tests.conftest import tiny_scenario

cli = CliRunner()


def _run(path: Path, tmp_path: Path, *extra: str):
    return cli.invoke(app, ["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--reports-dir",
                            str(tmp_path / "reports"), *extra])


# -- plan-time checks ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("change", "expected"), [
    ({"models": [{"name": "pmoe", "width": 1, "experts": 2, "topk": 40}]},
     "models[0].topk: must be in [1, 16]"),
    ({"attacks": [{"name": "badnets", "size": 2, "target": 10}]},
     "attacks[0].target: 10 is not a class of dataset 'digits' (valid: 0..9)"),
    ({"attacks": [{"name": "badnets", "size": 3}, {"name": "badnets", "size": 20}]},
     "attacks[1]:"),
    ({"attacks": [{"name": "badnets", "size": 4, "apply": "badpatches"}]},
     "attacks[0]: the trigger turns every image into one flat colour"),
])
def test_plan_refuses_what_run_would_refuse_naming_file_and_field(write_scenario, tmp_path: Path,
                                                                  change: dict, expected: str) -> None:
    path = write_scenario(tiny_scenario(**change))
    result = cli.invoke(app, ["plan", str(path), "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert f"{path}: {expected}" in message
    assert not (tmp_path / "runs").exists()  # nothing was created, nothing ran


def test_a_second_entry_keeps_its_own_index_in_messages(write_scenario, tmp_path: Path) -> None:
    path = write_scenario(tiny_scenario(models=[{"name": "pmoe", "width": 1, "experts": 2, "topk": 4},
                                                {"name": "pmoe", "width": 1, "experts": {"grid": [2, 4]},
                                                 "topk": 17}]))
    with pytest.raises(ScenarioError, match=r"models\[1\]\.topk: must be in \[1, 16\]"):
        runs.prepare(path)


def test_not_applicable_cells_are_planned_without_jobs_and_counted(write_scenario) -> None:
    path = write_scenario(tiny_scenario(
        models=[{"name": "pmoe", "width": 1, "experts": 2, "topk": 4}, {"name": "dense", "width": 1}],
        attacks=[{"name": "badnets", "size": 2, "apply": {"grid": ["image", "badpatches"]}}],
        quantization={"bits": ["fp32", 4], "scopes": ["whole", "gate"]},
        defenses=[{"name": "expert-pruning", "nc_steps": 5, "epochs": 1}],
    ))
    plan = runs.prepare(path).plan
    na = [c for c in plan.cells if c.not_applicable]
    # dense, 3 quant configs, S stages of expert-pruning: badpatches 3 x (1 + S); the gate scope on its clean
    # and image models 2; expert-pruning's stages on its image model 3 x S
    stages = len(defense_stages("expert-pruning"))
    expected = 3 * (1 + stages) + 2 + 3 * stages
    reasons = {c.not_applicable for c in na}
    assert all(c.model["name"] == "dense" for c in na) and len(na) == expected
    assert any("badpatches" in r and "'dense' has none" in r for r in reasons)
    assert any("quantization scope 'gate'" in r for r in reasons)
    assert any("defense 'expert-pruning' needs a model with experts" in r for r in reasons)
    assert all(c.eval_job == "" for c in na)
    specs = [j.spec for j in plan.jobs]
    assert not any(s["model"]["name"] == "dense" and (s.get("attack") or {}).get("apply") == "badpatches"
                   for s in specs)
    assert not any(j.kind == "defend" and j.spec["model"]["name"] == "dense" for j in plan.jobs)
    assert plan.summary(set())["not_applicable"] == expected
    # the same attack with its own trigger grid needs no routing grid: it runs on dense too
    path2 = write_scenario(tiny_scenario(
        models=[{"name": "dense", "width": 1}],
        attacks=[{"name": "badnets", "size": 2, "apply": "badpatches", "trigger_grid": 2}]), "grid.yaml")
    assert not [c for c in runs.prepare(path2).plan.cells if c.not_applicable]


def test_declared_requirements_decide_applicability() -> None:
    info = DatasetInfo((1, 16, 16), 10)
    dense = Geometry(info, None, frozenset({"prunable"})).capabilities
    moe = Geometry(info, (4, 4), frozenset({"routing", "gate", "experts", "prunable"})).capabilities
    assert quant_not_applicable({"label": "int4/gate", "scope": "gate"}, dense, "dense")
    assert quant_not_applicable({"label": "int4/gate", "scope": "gate"}, moe, "pmoe") is None
    assert quant_not_applicable({"label": "int4/whole", "scope": "whole"}, dense, "dense") is None
    assert defense_not_applicable({"name": "fine-tuning"}, dense, "dense") is None
    assert "needs a model with experts" in str(defense_not_applicable({"name": "expert-pruning"}, dense, "dense"))
    # a defense that quantizes one scope (EFRAP) applies where quantizing that scope does
    assert "scope 'gate'" in str(defense_not_applicable({"name": "efrap", "scope": "gate"}, dense, "dense"))
    assert defense_not_applicable({"name": "efrap", "scope": "gate"}, moe, "pmoe") is None
    assert defense_not_applicable({"name": "efrap", "scope": "whole"}, dense, "dense") is None


# -- divergence ---------------------------------------------------------------------------------------
def _linear_problem(epochs: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, dict]:
    """A linear classifier on 8 random 2x2 images, two steps of plain SGD per epoch."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    x, y = torch.rand(8, 1, 2, 2), torch.tensor([0, 1] * 4)
    cfg = {"epochs": epochs, "batch_size": 4, "optimizer": "sgd", "lr": 1.0, "momentum": 0.0, "weight_decay": 0.0}
    return model, x, y, cfg


def test_fit_stops_at_the_first_non_finite_epoch() -> None:
    model, x, y, cfg = _linear_problem(epochs=3)
    seen: list[int] = []

    def nan_loss(model: torch.nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        return loss * float("nan") if seen else loss

    with pytest.raises(TrainingDiverged, match="epoch 2") as caught:
        fit(model, x, y, cfg, seed=0, objective=nan_loss, on_epoch=lambda e, n, loss: seen.append(e))
    assert seen == [1] and caught.value.epoch == 2


def test_a_diverged_training_is_a_failed_cell_the_rest_runs_and_the_run_exits_1(write_scenario,
                                                                                 tmp_path: Path) -> None:
    raw = tiny_scenario(train={"epochs": 1, "lr": 1.0e6}, models=[{"name": "pmoe", "width": 1, "experts": 2,
                                                                   "topk": 4}])
    path = write_scenario(raw)
    result = _run(path, tmp_path)
    assert result.exit_code == 1, result.output
    out = " ".join(result.output.split())
    assert "job(s) failed" in out and "training diverged" in out
    store = Store(tmp_path / "runs" / "tiny")
    records = store.records()
    failed = {r.kind: r for r in records.values() if "failed" in r.metrics}
    assert set(failed) == {"train", "evaluate"}  # both trainings diverged; their evaluations inherit it
    assert all("ba" not in r.metrics and r.artifact is None for r in failed.values())
    assert any("failed_input" in r.metrics for r in failed.values() if r.kind == "evaluate")
    report = (tmp_path / "reports" / "tiny.md").read_text()
    assert "failed" in report and "100.0" not in report  # no ASR of a model predicting one class
    # a resume does not rerun them; --retry-failed does (and they fail again, deterministically)
    again = _run(path, tmp_path)
    assert again.exit_code == 1 and "ran 0 jobs" in " ".join(again.output.split())
    retried = _run(path, tmp_path, "--retry-failed")
    assert retried.exit_code == 1 and "ran 4 jobs" in " ".join(retried.output.split())


def test_a_failure_stops_only_its_dependents(write_scenario, tmp_path: Path) -> None:
    # two train settings: the lr 1e6 one diverges, the lr 0.05 one trains
    raw = tiny_scenario(train={"epochs": 1, "lr": {"grid": [0.05, 1.0e6]}})
    result = _run(write_scenario(raw), tmp_path)
    assert result.exit_code == 1
    records = Store(tmp_path / "runs" / "tiny").records()
    ok = [r for r in records.values() if "failed" not in r.metrics]
    bad = [r for r in records.values() if "failed" in r.metrics]
    assert {r.spec["train"]["lr"] for r in ok if r.kind == "train"} == {0.05}
    assert {r.spec["train"]["lr"] for r in bad if r.kind == "train"} == {1.0e6}
    assert all("ba" in r.metrics for r in ok if r.kind == "evaluate")
    # the diverged trainings' evaluations inherit the failure, naming their input, and run nothing
    failed_trainings = {r.id for r in bad if r.kind == "train"}
    evals = [r for r in bad if r.kind == "evaluate"]
    assert len(evals) == 2 and all(r.metrics["failed_input"] in failed_trainings for r in evals)


# -- --fresh and names --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["..", ".", ".hidden", "a/b", "../x"])
def test_names_that_are_not_plain_folder_names_are_refused(write_scenario, tmp_path: Path, name: str) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    result = _run(write_scenario(tiny_scenario(name=name)), tmp_path, "--fresh")
    assert result.exit_code == 2
    assert "name: must be a plain folder name" in " ".join(result.output.split())
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_fresh_refuses_a_folder_it_did_not_create(write_scenario, tmp_path: Path) -> None:
    target = tmp_path / "runs" / "tiny"
    target.mkdir(parents=True)
    (target / "notes.txt").write_text("mine")
    result = _run(write_scenario(tiny_scenario()), tmp_path, "--fresh")
    assert result.exit_code == 2 and "not a pmoe-bench results store" in " ".join(result.output.split())
    assert (target / "notes.txt").read_text() == "mine"


def test_fresh_removes_only_what_the_store_wrote(tmp_path: Path) -> None:
    root = tmp_path / "runs" / "study"
    store = Store(root)
    store.save_state("tr-x", {"w": torch.zeros(2)})
    store.record("tr-x", "train", {}, [], {"ba": 0.5}, 1.0, "cpu", "artifacts/tr-x.pt")
    (root / "my_notes.md").write_text("keep")
    (root / "analysis").mkdir()
    (root / "analysis" / "map.png").write_bytes(b"png")
    remove_store(root)
    assert sorted(p.name for p in root.iterdir()) == ["my_notes.md"]
    assert not (root / MARKER).exists()
    with pytest.raises(StoreError, match="not a pmoe-bench results store"):
        remove_store(root)  # no longer a store: refused, the note stays
    assert (root / "my_notes.md").read_text() == "keep"
    (root / "my_notes.md").unlink()
    Store(root)
    remove_store(root)
    assert not root.exists()  # an otherwise empty folder goes with it


def test_a_store_from_before_the_marker_is_still_recognised(tmp_path: Path) -> None:
    root = tmp_path / "old"
    Store(root)
    (root / MARKER).unlink()
    remove_store(root)
    assert not root.exists()
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "results.db").write_bytes(b"not a database at all, just bytes" * 10)
    with pytest.raises(StoreError, match="not a pmoe-bench results store"):
        remove_store(plain)


def test_the_report_says_when_cpu_and_gpu_rows_mix(tmp_path: Path) -> None:
    from bench.provenance import mixed_hardware_warning
    from bench.report import to_markdown
    from bench.store import JobRecord

    def row(job: str, environment: dict) -> JobRecord:
        return JobRecord(job, "evaluate", {}, [], {"ba": 0.9}, None, 1.0, environment.get("device", "cpu"),
                         "0.1.0", "abc", 0.0, environment)

    cpu = {"device": "cpu", "cpu": "AMD EPYC"}
    gpu = {"device": "cuda:0", "gpu": "NVIDIA H200"}
    assert mixed_hardware_warning([row("a", cpu), row("b", cpu)]) is None
    warning = mixed_hardware_warning([row("a", cpu), row("b", gpu)])
    assert warning is not None and "CPUs and GPUs" in warning
    assert warning in to_markdown([], {"scenario": "x", "hardware_warning": warning})


def test_a_last_step_that_breaks_the_weights_is_a_divergence() -> None:
    model, x, y, cfg = _linear_problem(epochs=1)
    steps: list[int] = []

    def poisoned_last_step(model: torch.nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        # every loss is finite; the last step's gradient is NaN, so only the weights after it show the damage
        steps.append(1)
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        if len(steps) == 2:
            model[1].weight.register_hook(lambda grad: torch.full_like(grad, float("nan")))
        return loss

    with pytest.raises(TrainingDiverged, match="non-finite weights after the last step"):
        fit(model, x, y, cfg, seed=0, objective=poisoned_last_step)


def test_qat_of_a_scope_the_model_lacks_is_planned_not_applicable(write_scenario) -> None:
    path = write_scenario(tiny_scenario(
        models=[{"name": "pmoe", "width": 1, "experts": 2, "topk": 4}, {"name": "dense", "width": 1}],
        train={"epochs": 1, "qat_bits": 4, "qat_scope": "experts"}))
    plan = runs.prepare(path).plan
    dense = [c for c in plan.cells if c.model["name"] == "dense"]
    assert dense and all("train.qat_scope 'experts'" in str(c.not_applicable) for c in dense)
    assert {j.spec["model"]["name"] for j in plan.jobs} == {"pmoe"}
    assert not [c for c in plan.cells if c.model["name"] == "pmoe" and c.not_applicable]


def test_min_seeds_beyond_the_seeds_is_refused(write_scenario) -> None:
    with pytest.raises(ScenarioError, match=r"report.min_seeds: 3 seeds required but the scenario has 2"):
        runs.prepare(write_scenario(tiny_scenario(seeds=[0, 1], report={"min_seeds": 3})))


def test_poisoned_set_defenses_are_planned_not_applicable_to_qcb_attacks() -> None:
    qcb = {"name": "badnets", "size": 2, "position": "top-left", "target": 0,
           "objective": {"name": "qcb", "target_bits": 4, "scope": "whole"}}
    plain = {"name": "badnets", "size": 2, "position": "top-left", "target": 0}
    plan = planning.build(sc.resolve(tiny_scenario(attacks=[plain, qcb], defenses=[
        {"name": "spectral-signatures"}, {"name": "fine-tuning", "epochs": 1}])))
    by = {(bool(d["attack"].get("objective")), d["defense"]["name"]): d for d in plan.defenses}
    assert "qcb-objective attack trains on clean data" in by[(True, "spectral-signatures")]["not_applicable"]
    assert by[(True, "spectral-signatures")]["job"] == ""
    assert by[(False, "spectral-signatures")]["job"] and by[(True, "fine-tuning")]["job"]

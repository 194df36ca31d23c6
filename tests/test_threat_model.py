"""Threat models in the engine: a defense gets what its ``sees`` names, the poisoned set is the attacked model's."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import pytest
import torch
from typer.testing import CliRunner

from bench import plan as planning
from bench import scenario as sc
from bench.cli import app
from bench.defenses.base import Defense, DefenseContext, DefenseStage, PoisonedData, ThreatModelError, snapshot
from bench.errors import PluginError
from bench.jobs import JobContext, run_defend, run_train
from bench.models.base import BenchModel
from bench.registry import REGISTRY
from bench.store import Store
from bench.train import fit
from tests.conftest import tiny_scenario


class Peek(Defense):
    """Reads the poisoned set and retrains on it from scratch (a stand-in data-inspection defense)."""

    name = "peek"
    stages = ("retrained",)
    sees: ClassVar[frozenset[str]] = frozenset({"poisoned"})

    def run(self, model: BenchModel, ctx: DefenseContext) -> list[DefenseStage]:
        assert ctx.fresh_model is not None
        fresh = ctx.fresh_model()
        fit(fresh, ctx.poisoned_x, ctx.poisoned_y, ctx.train_cfg, seed=ctx.seed, augment=ctx.augment)
        same_init = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                          ctx.fresh_model().state_dict().values(), strict=True))
        return [DefenseStage("retrained", snapshot(fresh), {"n_truth": int(ctx.poisoned_truth.sum()),
                                                            "fresh_without_model": int(same_init)})]


def ctx_for(sees: frozenset[str], poisoned: PoisonedData | None = None, name: str = "probe") -> DefenseContext:
    x, y = torch.rand(4, 1, 8, 8), torch.arange(4)
    return DefenseContext(clean_x=x, clean_y=y, train_cfg={}, seed=0, num_classes=4, defense=name, sees=sees,
                          poisoned=poisoned)


def test_a_defense_without_poisoned_in_sees_cannot_read_the_poisoned_set():
    ctx = ctx_for(frozenset({"model", "clean"}), name="fine-pruning")
    for field in ("poisoned_x", "poisoned_y", "poisoned_truth"):
        with pytest.raises(ThreatModelError, match=rf"'fine-pruning' read ctx\.{field}.*sees = model \+ clean"):
            getattr(ctx, field)
    assert ctx.clean_x.shape == (4, 1, 8, 8)
    data = PoisonedData(torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ThreatModelError, match="must not be given"):
        ctx_for(frozenset({"model", "clean"}), data)
    blind = ctx_for(frozenset({"model", "poisoned"}), data, name="ac")
    assert blind.poisoned_x is data.x and blind.device == torch.device("cpu")
    with pytest.raises(ThreatModelError, match=r"'ac' read ctx\.clean_x.*excludes 'clean'"):
        _ = blind.clean_x
    with pytest.raises(ThreatModelError, match="holds no poisoned"):
        _ = ctx_for(frozenset({"poisoned"})).poisoned_y


def test_unknown_sees_values_are_refused_when_the_class_is_defined():
    with pytest.raises(PluginError, match="unknown value.*labels"):
        type("Bad", (Defense,), {"name": "bad", "sees": frozenset({"model", "labels"}), "run": lambda s, m, c: []})
    with pytest.raises(PluginError, match="frozenset"):
        type("Bad", (Defense,), {"name": "bad", "sees": "poisoned", "run": lambda s, m, c: []})
    builtins = {c.name: c.factory.sees for c in REGISTRY.list("defense")}
    assert builtins["fine-pruning"] == builtins["strip"] == frozenset({"model", "clean"})
    assert builtins["abl"] == frozenset({"poisoned"})
    assert builtins["activation-clustering"] == builtins["spectral-signatures"] == frozenset({"model", "poisoned"})


@pytest.fixture
def peek_registered():
    REGISTRY.register("defense", "peek")(Peek)
    yield
    REGISTRY.unregister("defense", "peek")


def test_run_defend_rebuilds_the_training_set_the_attacked_model_saw(tmp_path, one_thread, peek_registered):
    """Retrained from the same initialisation on ``ctx.poisoned_x / y`` with the same seed, the model is the
    attacked model bit for bit: run_defend handed over exactly run_train's training set."""
    plan = planning.build(sc.resolve(tiny_scenario(defenses=[{"name": "peek"}])))
    train = next(j for j in plan.jobs if j.kind == "train" and j.spec["attack"] is not None)
    defend = next(j for j in plan.jobs if j.kind == "defend")
    ctx = JobContext(Store(tmp_path / "store"), torch.device("cpu"))
    trained = run_train(train.spec, ctx)
    ctx.store.record(train.id, "train", train.spec, [], trained.metrics, 0.0, "cpu",
                     ctx.store.save_state(train.id, trained.state))
    out = run_defend(defend.spec, (train.id,), ctx)
    assert out.metrics["sees"] == "poisoned" and out.metrics["n_defender"] == 0
    assert out.metrics["retrained"]["n_truth"] == trained.metrics["n_poisoned"] > 0
    assert out.metrics["retrained"]["fresh_without_model"] == 1  # no 'model' in sees: the untrained init
    retrained = out.stages["retrained"]
    assert all(torch.equal(retrained[k], v) for k, v in trained.state.items())


def test_poisoned_set_defenses_are_not_applicable_to_qcb_attacks(tmp_path, peek_registered):
    spec: dict[str, Any] = {
        "dataset": {"name": "digits", "image_size": 16}, "model": {"name": "pmoe", "width": 1, "experts": 2, "topk": 4},
        "train": sc.TrainSpec(epochs=1).model_dump(), "seed": 0, "poison_rate": 0.1, "defense": {"name": "peek"},
        "attack": {"name": "badnets", "params": {"size": 2}, "apply": "whole", "target": 0,
                   "objective": {"name": "qcb"}},
    }
    ctx = JobContext(Store(tmp_path / "store"), torch.device("cpu"))
    torch.manual_seed(0)
    from bench.jobs import build_model

    state = build_model(spec["model"], ctx.dataset(spec["dataset"])).state_dict()
    ctx.store.record("t", "train", spec, [], {}, 0.0, "cpu", ctx.store.save_state("t", state))
    out = run_defend(spec, ("t",), ctx)
    assert "qcb-objective attack" in out.metrics["not_applicable"] and "peek" in out.metrics["not_applicable"]


def test_cli_runs_the_three_data_defenses_and_the_report_names_their_threat_models(write_scenario, tmp_path,
                                                                                   one_thread):
    defenses = [
        {"name": "activation-clustering", "reduce": "pca", "retrain_epochs": 1},
        {"name": "spectral-signatures", "eps": 0.3, "retrain_epochs": 1},
        {"name": "abl", "isolation_epochs": 1, "finetune_epochs": 1, "unlearning_epochs": 1},
        {"name": "fine-tuning", "epochs": 1},
    ]
    path = write_scenario(tiny_scenario(defenses=defenses))
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--reports-dir",
                                 str(tmp_path / "reports")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = (tmp_path / "reports" / "tiny.md").read_text()
    legend = ("abl: poisoned; activation-clustering: model + poisoned; fine-tuning: model + clean; "
              "spectral-signatures: model + poisoned.")
    assert report.count(legend) == 2  # under the Table-3 defenses and under the detection metrics
    for stage in ("activation-clustering / retrained", "spectral-signatures / retrained", "abl / unlearned"):
        assert stage in report
    rows = json.loads(runner.invoke(app, ["report", str(tmp_path / "runs" / "tiny"), "--format", "json"]).stdout)
    found = {(d["defense"], d["stage"]): d for d in rows["meta"]["detections"]}
    for key in (("activation-clustering", "detected"), ("spectral-signatures", "detected"), ("abl", "isolated")):
        entry = found[key]
        assert entry["status"] == "ok" and {"precision", "recall", "f1", "n_flagged"} <= set(entry["metrics"])
    assert found[("abl", "isolated")]["sees"] == "poisoned"
    assert found[("fine-tuning", "finetuned")]["sees"] == "model + clean"
    assert found[("spectral-signatures", "detected")]["metrics"]["n_poisoned"]["mean"] > 0
    defended = [r for r in rows["rows"] if r["defense"] != "-"]
    assert all(r["ba_n"] == 1 and r["asr_n"] == 1 for r in defended) and len(defended) == 4

"""Defenses as plan stages end to end: one defend job per attacked model, every stage evaluated."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from bench import plan as planning
from bench import scenario as sc
from bench.cli import app
from bench.report import natural
from bench.store import Store
from tests.conftest import tiny_scenario

DEFENSES = [
    {"name": "fine-pruning", "rate": {"grid": [0.1, 0.3]}, "epochs": 1, "budget": 0.1},
    {"name": "strip", "n": 8, "budget": 0.1},
]


def test_plan_defends_attacked_models_only_and_never_retrains():
    base = planning.build(sc.resolve(tiny_scenario()))
    plan = planning.build(sc.resolve(tiny_scenario(defenses=DEFENSES)))
    trains = lambda p: {j.id for j in p.jobs if j.kind == "train"}  # noqa: E731
    assert trains(plan) == trains(base)
    defend = [j for j in plan.jobs if j.kind == "defend"]
    assert len(defend) == 3  # two pruning rates + STRIP, for the one attacked model
    attacked_train = next(j.id for j in plan.jobs if j.kind == "train" and j.spec["attack"] is not None)
    assert all(j.deps == (attacked_train,) for j in defend)
    stages = {(c.defense["rate"], c.defense["stage"]) for c in plan.cells if c.defense}
    assert stages == {(0.1, "pruned"), (0.1, "finetuned"), (0.3, "pruned"), (0.3, "finetuned")}
    assert all(c.base_eval_job for c in plan.cells if c.defense)


def test_run_reports_table3_and_der(write_scenario, tmp_path):
    path = write_scenario(tiny_scenario(defenses=DEFENSES, quantization={"bits": ["fp32", 4]}))
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--reports-dir",
                                 str(tmp_path / "reports")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = (tmp_path / "reports" / "tiny.md").read_text()
    assert "## Defenses" in report and "before defense" in report and "Defense leaderboard" in report
    assert "## Defense metrics" in report and "| strip " in report and "auroc=" in report  # STRIP: detection only
    rows = json.loads(runner.invoke(app, ["report", str(tmp_path / "runs" / "tiny"), "--format", "json"]).stdout)
    defended = [r for r in rows["rows"] if r["defense"] != "-"]
    # 2 rates x 2 stages x 2 quant configs (fp32, int4/whole), each with BA, ASR and DER
    assert len(defended) == 8
    assert all(r["ba_n"] == 1 and r["asr_n"] == 1 and r["der_n"] == 1 for r in defended)
    # DER from the stored rows of the paired jobs: the defended model and the same model before the defense
    store = Store(tmp_path / "runs" / "tiny")
    records = store.records()
    undefended = {(r["quant"], r["runs"][0]["eval_job"]) for r in rows["rows"] if r["defense"] == "-"}
    for row in defended:
        (run,) = row["runs"]
        assert (row["quant"], run["base_eval_job"]) in undefended  # paired with the same quant config
        after, before = records[run["eval_job"]].metrics, records[run["base_eval_job"]].metrics
        assert records[run["eval_job"]].deps != records[run["base_eval_job"]].deps  # a defended model, not the same
        expected = (max(0.0, before["asr"] - after["asr"]) - max(0.0, before["ba"] - after["ba"]) + 1) / 2
        assert row["der_mean"] == pytest.approx(expected, abs=1e-12)
        assert (row["ba_mean"], row["asr_mean"]) == (after["ba"], after["asr"])
    # Table 3's order: rates by value, each defense's stages in the order it runs them (pruned, then finetuned)
    fp32 = [r["defense"] for r in defended if r["quant"] == "fp32"]
    assert [d.rsplit(" / ", 1)[1] for d in fp32] == ["pruned", "finetuned"] * 2
    assert "rate=0.1" in fp32[0] and "rate=0.3" in fp32[2]


def test_labels_sort_by_the_numbers_inside_them():
    labels = ["fine-pruning (epochs=20, rate=0.3)", "fine-pruning (epochs=5, rate=0.3)", "int8/whole", "int4/whole",
              "fine-pruning (epochs=5, rate=0.25)"]
    assert sorted(labels, key=natural) == ["fine-pruning (epochs=5, rate=0.25)", "fine-pruning (epochs=5, rate=0.3)",
                                           "fine-pruning (epochs=20, rate=0.3)", "int4/whole", "int8/whole"]

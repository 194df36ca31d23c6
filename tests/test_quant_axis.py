"""The PTQ axis end to end: every trained model evaluated at every config, nothing retrained."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from bench import plan as planning
from bench import scenario as sc
from bench.cli import app
from tests.conftest import tiny_scenario

QUANT = {"bits": ["fp32", 8, 4], "scopes": ["whole", "gate"]}


def test_plan_adds_evaluations_not_trainings():
    base = planning.build(sc.resolve(tiny_scenario()))
    quant = planning.build(sc.resolve(tiny_scenario(quantization=QUANT)))
    kinds = lambda p, k: sorted(j.id for j in p.jobs if j.kind == k)  # noqa: E731
    assert kinds(quant, "train") == kinds(base, "train")
    # fp32 once + {8, 4} x {whole, gate} = 5 configs, for the clean and the attacked model
    assert len(kinds(quant, "evaluate")) == 2 * 5
    assert {c.quant["label"] for c in quant.cells} == {"fp32", "int8/whole", "int8/gate", "int4/whole", "int4/gate"}


def test_run_reports_quantized_metrics(write_scenario, tmp_path):
    data = tiny_scenario(quantization=QUANT, models=[
        {"name": "pmoe", "width": 1, "experts": 2, "topk": 4}, {"name": "dense", "width": 1}])
    path = write_scenario(data)
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--reports-dir",
                                 str(tmp_path / "reports")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    # 4 trainings + 2 models x 2 attacks (clean + badnets) x 5 configs, less the dense model's 2 x 2 gate
    # configs: planned as n/a (a dense model has no gate), so no job
    assert "ran 20 jobs" in result.output
    report = (tmp_path / "reports" / "tiny.md").read_text()
    assert "## Accuracy under quantization" in report and "## Dormancy" in report and "int4/gate" in report
    out = runner.invoke(app, ["report", str(tmp_path / "runs" / "tiny"), "--format", "json"])
    rows = json.loads(out.stdout)["rows"]
    by = {(r["model"], r["attack"], r["quant"]): r for r in rows}
    pmoe = [k for k in by if k[0].startswith("pmoe")][0][0]
    dense = [k for k in by if k[0].startswith("dense")][0][0]
    assert by[(pmoe, "badnets", "int4/gate")]["asr_n"] == 1
    assert by[(dense, "badnets", "int4/gate")]["ba_n"] == 0  # gate scope does not apply to a dense model
    assert by[(dense, "badnets", "int4/whole")]["ba_n"] == 1
    # 8-bit PTQ of the whole model keeps clean accuracy within a point or two of fp32
    assert abs(by[(pmoe, "clean", "int8/whole")]["ba_mean"] - by[(pmoe, "clean", "fp32")]["ba_mean"]) < 0.03

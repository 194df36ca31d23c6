"""The transfer matrix: lines by the quantizer an attack was trained against, columns by evaluated quantizer."""

from __future__ import annotations

import json
import re

from PIL import Image
from typer.testing import CliRunner

from bench.cli import app
from bench.transfer import PLAIN, backend_of, column_order, trained_against
from tests.conftest import tiny_scenario

QCB = {"name": "qcb", "target_bits": 4, "scope": "whole", "lambda_bd": 0.5}


def test_trained_against_names_the_objective_quantizer():
    assert trained_against(None) is None
    assert trained_against({"name": "badnets"}) == PLAIN
    assert trained_against({"name": "badnets", "objective": QCB}) == "int4/whole"
    spec = {**QCB, "target_bits": 8, "scope": "gate", "granularity": "channel", "symmetric": True}
    assert trained_against({"objective": spec}) == "int8/gate/channel/sym"
    assert trained_against({"objective": {**spec, "activations": True}}) == "int8/gate/channel/sym/act"
    assert trained_against({"objective": {**QCB, "target_backend": "torchao"}}) == "int4/whole@torchao"


def test_columns_put_fp32_then_fake_then_each_backend_by_bits():
    labels = ["int4/whole", "int8/whole@onnxruntime", "fp32", "int8/whole", "int8/whole/channel/sym@torch-x86"]
    assert sorted(labels, key=column_order) == [
        "fp32", "int8/whole", "int4/whole", "int8/whole@onnxruntime", "int8/whole/channel/sym@torch-x86"]
    assert backend_of("int8/whole@torch-x86") == "torch-x86" and backend_of("int4/whole") == "fake"


def test_run_reports_the_transfer_matrix_with_the_rows_numbers(write_scenario, tmp_path):
    attacks = [{"name": "badnets", "size": 2, "position": "top-left", "target": 0},
               {"name": "badnets", "size": 2, "position": "top-left", "target": 0, "objective": QCB}]
    path = write_scenario(tiny_scenario(attacks=attacks, quantization={"bits": ["fp32", 8, 4]}))
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--reports-dir",
                                 str(tmp_path / "reports")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = (tmp_path / "reports" / "tiny.md").read_text()
    section = report.split("## Transfer matrix", 1)[1]
    header = next(line for line in section.splitlines() if line.startswith("| trained against"))
    assert re.findall(r"fp32|int8/whole|int4/whole", header) == ["fp32", "int8/whole", "int4/whole"]
    rows = json.loads(runner.invoke(app, ["report", str(tmp_path / "runs" / "tiny"), "--format", "json"]).stdout)
    by = {(r["attack"].split(" (")[0], r["quant"]): r for r in rows["rows"]}
    for against, attack in ((PLAIN, "badnets"), ("int4/whole", "badnets+qcb")):
        line = next(x for x in section.splitlines() if x.startswith(f"| {against} ") and f"| {attack}" in x)
        cells = [c.strip() for c in line.strip("|").split("|")][3:]
        expected = [f"{by[(attack, q)]['asr_mean'] * 100:.1f} ({by[(attack, q)]['ba_mean'] * 100:.1f})"
                    for q in ("fp32", "int8/whole", "int4/whole")]
        assert cells == expected
    picture = tmp_path / "reports" / "tiny" / "transfer-digits-pmoe.png"
    assert f"![transfer-digits-pmoe](tiny/{picture.name})" in report
    with Image.open(picture) as image:
        assert image.format == "PNG" and image.width > 200 and image.height > 100


def test_no_transfer_matrix_without_a_quantization_conditioned_attack(write_scenario, tmp_path):
    path = write_scenario(tiny_scenario(quantization={"bits": ["fp32", 4]}, attacks=[
        {"name": "badnets", "size": 2, "position": "top-left", "target": 0}]))
    result = CliRunner().invoke(app, ["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--reports-dir",
                                      str(tmp_path / "reports")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "## Transfer matrix" not in (tmp_path / "reports" / "tiny.md").read_text()
    assert not (tmp_path / "reports" / "tiny").exists() or not list((tmp_path / "reports" / "tiny").glob("transfer*"))

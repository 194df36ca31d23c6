"""Real integer back-ends as an axis of ``quantization:``: configs, n/a reasons, planning, missing packages,
and each back-end quantizing a trained tiny pMoE (what it quantizes, and how its predictions compare)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from bench import plan as planning
from bench import scenario as sc
from bench.applicability import quant_not_applicable
from bench.cli import app
from bench.quant import QuantConfig, backends, quantized
from bench.quant.backends import base
from bench.registry import REGISTRY
from bench.train import fit
from tests.conftest import tiny_scenario

PMOE_CAPS = frozenset({"gate", "experts", "routing", "prunable"})


def test_real_backends_canonicalise_to_what_they_run():
    x86 = QuantConfig(bits=8, backend="torch-x86")
    assert x86 == QuantConfig(bits=8, backend="torch-x86", granularity="channel", symmetric=True, activations=True)
    assert x86.label == "int8/whole/channel/sym/act@torch-x86"
    ort = QuantConfig(bits=8, backend="onnxruntime", granularity="channel")
    assert ort.label == "int8/whole/channel/act@onnxruntime"
    assert QuantConfig(bits=8, backend="torchao", activations=True).label == "int8/whole/sym@torchao"
    assert QuantConfig(bits=None, backend="torchao") == QuantConfig()  # fp32 is fp32 whatever the back-end
    assert QuantConfig.from_dict(x86.to_dict()) == x86 and x86.to_dict()["calibration"] == 256
    # fake configs keep the dicts (hence job ids) they had before back-ends existed
    assert QuantConfig(bits=4, scope="gate").to_dict() == {
        "bits": 4, "scope": "gate", "granularity": "tensor", "symmetric": False, "activations": False}
    with pytest.raises(Exception, match="quant.backend"):
        QuantConfig.from_dict({"bits": 8, "backend": "tensorrt"})


def test_spec_default_is_the_fake_axis_and_grids_dedupe():
    plain = sc.QuantizationSpec(bits=["fp32", 8, 4], granularity=["tensor", "channel"])
    assert plain.configs() == sc.QuantizationSpec(bits=["fp32", 8, 4], granularity=["tensor", "channel"],
                                                  backends=["fake"]).configs()
    assert all("backend" not in c for c in plain.configs())
    spec = sc.QuantizationSpec(bits=[8], granularity=["tensor", "channel"], symmetric=[False, True],
                               backends=["torch-x86"], calibration=64)
    labels = [c["label"] for c in spec.configs()]
    assert labels == ["fp32", "int8/whole/channel/sym/act@torch-x86"]  # 4 asks, one effective setting
    assert spec.configs()[1]["calibration"] == 64
    with pytest.raises(Exception, match="greater than or equal to 1"):
        sc.QuantizationSpec(backends=["onnxruntime"], calibration=0)


def test_spec_activations_reach_every_fake_config():
    """quantization.activations: every fake config quantizes activations too (labels end in /act); fp32 stays
    fp32."""
    spec = sc.QuantizationSpec(bits=["fp32", 8, 4], symmetric=[False, True], activations=True)
    configs = spec.configs()
    assert [c["label"] for c in configs] == ["fp32", "int8/whole/act", "int8/whole/sym/act", "int4/whole/act",
                                             "int4/whole/sym/act"]
    assert [c["activations"] for c in configs[1:]] == [True] * 4
    assert configs[0]["bits"] is None and configs[0]["label"] == "fp32"


@pytest.mark.parametrize(("quant", "reason"), [
    ({"bits": 4, "backend": "torch-x86"}, "int8 oneDNN kernels only"),
    ({"bits": 4, "backend": "onnxruntime"}, "int8 weights"),
    ({"bits": 4, "backend": "torchao"}, "no CPU kernel for int4"),
    ({"bits": 8, "backend": "torchao", "scope": "experts"}, "nn.Linear layers only"),
    ({"bits": 8, "backend": "onnxruntime", "scope": "gate"}, None),
    ({"bits": 8, "backend": "torch-x86", "scope": "experts"}, None),
])
def test_not_applicable_reasons(quant, reason):
    cfg = QuantConfig.from_dict(quant)
    got = quant_not_applicable({**cfg.to_dict(), "label": cfg.label}, PMOE_CAPS, "pmoe")
    assert (got is None) if reason is None else (reason in got)


def test_plan_marks_what_a_backend_cannot_run():
    quant = {"bits": ["fp32", 8, 4], "scopes": ["whole", "gate"], "backends": ["fake", "onnxruntime", "torchao"]}
    plan = planning.build(sc.resolve(tiny_scenario(quantization=quant)))
    na = {c.quant["label"]: c.not_applicable for c in plan.cells if c.attack is None}
    assert na["int8/gate/act@onnxruntime"] is None and na["int4/whole/act@onnxruntime"] is not None
    assert na["int8/whole/sym@torchao"] is None and "nn.Linear" in na["int8/gate/sym@torchao"]
    base_plan = planning.build(sc.resolve(tiny_scenario()))
    assert {j.id for j in base_plan.jobs} <= {j.id for j in plan.jobs}  # fake ids unchanged


def test_missing_package_fails_validation_with_the_install_command(write_scenario, monkeypatch):
    monkeypatch.setattr(base, "installed", lambda package: package != "onnxscript")
    path = write_scenario(tiny_scenario(quantization={"bits": [8], "backends": ["fake", "onnxruntime"]}))
    result = CliRunner().invoke(app, ["plan", str(path)])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert str(path.name) in text and "quantization.backends" in text and "onnxscript" in text
    assert 'pip install -e ".[deploy]"' in text and 'pip install "pmoe-bench[deploy]"' in text


@pytest.fixture(scope="module")
def trained(one_thread):
    """A tiny pMoE trained one epoch on 16x16 digits (about 87% BA), its data and fp32 test predictions."""
    data = REGISTRY.get("dataset", "digits").create(image_size=16)
    torch.manual_seed(0)
    model = REGISTRY.get("model", "pmoe").create(input_shape=data.input_shape, num_classes=10, mean=data.mean,
                                                 std=data.std, width=1, experts=2, topk=4)
    train = sc.TrainSpec(epochs=1, batch_size=32, lr=0.05).model_dump()
    fit(model, data.train_x, data.train_y, train, seed=0, augment="none")
    model.eval()
    with torch.no_grad():
        ref = model(data.test_x).argmax(1)
    return model, data, ref


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a == b).float().mean())


def _fake_preds(model, x, **cfg) -> torch.Tensor:
    with quantized(model, QuantConfig(**cfg)), torch.no_grad():
        return model(x).argmax(1)


def test_torchao_quantizes_the_linear_head_like_its_own_scale_rule(trained):
    """torchao int8 weight-only vs the same quantizer written out (scale = max|w| / 127.5 per row, q =
    clamp(round(w / scale), -128, 127)) on ``fc`` only: measured 100% agreement on the 359 test images
    (and 100% with fp32: one int8 head barely moves the logits)."""
    pytest.importorskip("torchao")
    model, data, ref = trained
    runner = backends.prepare(model, QuantConfig(bits=8, backend="torchao", granularity="channel"), data.train_x[:8])
    weights = dict(runner.model.named_parameters())
    assert type(weights["fc.weight"]).__name__ == "Int8Tensor" and weights["fc.weight"].qdata.dtype == torch.int8
    assert all(type(p) is torch.nn.Parameter for n, p in weights.items() if n != "fc.weight")  # router, experts
    w = model.fc.weight.detach()
    scale = w.abs().amax(1, keepdim=True) / 127.5
    reference = torch.clamp(torch.round(w * (1.0 / scale)), -128, 127) * scale
    torch.testing.assert_close(weights["fc.weight"].dequantize(), reference, rtol=0, atol=1e-7)
    with torch.no_grad():
        saved = model.fc.weight.detach().clone()
        model.fc.weight.copy_(reference)
        expected = model(data.test_x)
        model.fc.weight.copy_(saved)
    got = runner(data.test_x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert _agreement(got.argmax(1), expected.argmax(1)) >= 0.99


def test_onnxruntime_runs_a_qdq_model_with_int8_weights(trained):
    """ORT int8 QDQ (weights per channel symmetric, activations static uint8) vs fake
    ``int8/whole/channel/sym`` (weights only): measured 97.8% agreement (98.9% with fp32) on 359 images."""
    for package in ("onnxruntime", "onnx", "onnxscript"):
        pytest.importorskip(package)
    import onnx

    model, data, ref = trained
    cfg = QuantConfig(bits=8, backend="onnxruntime", granularity="channel", symmetric=True)
    runner = backends.prepare(model, cfg, backends.calibration_images(data.train_x, 128))
    graph = runner.onnx_model.graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0
    int8 = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.INT8}
    conv_weights = [n.input[1] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int8]
    assert len(conv_weights) == 12  # 11 convolutions (router and experts included) and the fc head
    preds = runner(data.test_x).argmax(1)
    fake = _fake_preds(model, data.test_x, bits=8, granularity="channel", symmetric=True)
    assert _agreement(preds, fake) >= 0.95 and _agreement(preds, ref) >= 0.95


def test_onnxruntime_gate_scope_quantizes_the_router_only(trained):
    for package in ("onnxruntime", "onnx", "onnxscript"):
        pytest.importorskip(package)
    model, data, _ = trained
    runner = backends.prepare(model, QuantConfig(bits=8, backend="onnxruntime", scope="gate"), data.train_x[:64])
    graph = runner.onnx_model.graph
    quantized_weights = {i.name for i in graph.initializer if i.data_type == 3}  # INT8
    dequantized = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in quantized_weights]
    assert len(dequantized) == 1 and dequantized[0].input[0].startswith("moe.router.weight")
    assert runner(data.test_x[:5]).shape == (5, 10)


def test_scenario_with_onnxruntime_runs_end_to_end(write_scenario, tmp_path):
    for package in ("onnxruntime", "onnx", "onnxscript"):
        pytest.importorskip(package)
    quant = {"bits": ["fp32", 8], "backends": ["fake", "onnxruntime"], "calibration": 64}
    path = write_scenario(tiny_scenario(quantization=quant))
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--reports-dir",
                                 str(tmp_path / "reports")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "ran 8 jobs" in result.output  # 2 trainings + 2 models x (fp32, int8/whole, int8/whole/act@onnxruntime)
    out = runner.invoke(app, ["report", str(tmp_path / "runs" / "tiny"), "--format", "json"])
    rows = {(r["attack"], r["quant"]): r for r in json.loads(out.stdout)["rows"]}
    ort_row = rows[("badnets", "int8/whole/act@onnxruntime")]
    assert ort_row["asr_n"] == 1 and ort_row["ba_n"] == 1
    assert abs(ort_row["ba_mean"] - rows[("badnets", "fp32")]["ba_mean"]) < 0.05

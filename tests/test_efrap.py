"""EFRAP (bench.defenses.efrap): weights on the PTQ grid and idempotent under it, clean accuracy kept, a
dormant (qcb) backdoor's 4-bit ASR removed, parameters checked, and a scenario through the CLI.

The dormant model is the tiny digits (8x8) qcb model of tests/test_qcb.py (about 6 s on one thread): clean
at fp32, its backdoor wakes at int4 (about 65% ASR against 0.3%)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

from bench.attacks.badnets import BadNets
from bench.attacks.qcb import QCBSpec, prepare_qcb
from bench.cli import app
from bench.data.base import TensorData
from bench.defenses import DefenseContext, Efrap
from bench.defenses.rounding import grid_of, level_indices
from bench.errors import ComponentParamsError
from bench.evaluate import evaluate
from bench.models.base import BenchModel
from bench.quant import QuantConfig, fake_quantize, quantized, scope_parameters
from bench.registry import REGISTRY
from bench.train import fit
from tests.conftest import tiny_scenario

pytestmark = pytest.mark.usefixtures("one_thread")
TARGET = 0
FAST = {"iters": 100, "lr": 0.1}  # the code's 10000 steps at lr 1e-3 move a logit as far as 100 at 0.1


def trigger() -> BadNets:
    return BadNets(size=2, position="bottom-right", value=1.0)


def build(data: TensorData) -> BenchModel:
    torch.manual_seed(0)
    return REGISTRY.get("model", "pmoe").create(input_shape=data.input_shape, num_classes=10, mean=data.mean,
                                                std=data.std, width=1, experts=2, topk=2)


@pytest.fixture(scope="module")
def dormant(digits8: TensorData) -> BenchModel:
    """The qcb-trained tiny model (as tests/test_qcb.py's end-to-end test)."""
    model = build(digits8)
    spec = QCBSpec(qat_bits=4, lambda_bd=0.2, lambda_fp_trigger=0.2, warmup_epochs=2, repair_from_epoch=4)
    training = prepare_qcb(spec, model, digits8.train_x, digits8.train_y, trigger(), TARGET, 0.05, seed=0)
    cfg = {"epochs": 6, "batch_size": 128, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0,
           "schedule": "cosine"}
    try:
        fit(model, training.x, training.y, cfg, seed=1, objective=training.objective)
    finally:
        training.finish()
    return model.eval()


def ctx_for(data: TensorData, n: int = 96) -> DefenseContext:
    idx = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(1))[:n]
    return DefenseContext(clean_x=data.train_x[idx], clean_y=data.train_y[idx], train_cfg={}, seed=0,
                          num_classes=data.num_classes)


def at(model: BenchModel, data: TensorData, config: QuantConfig) -> dict[str, float]:
    with quantized(model, config):
        return evaluate(model, data, trigger(), TARGET)


@pytest.mark.parametrize(("granularity", "symmetric"), [("tensor", False), ("channel", True)])
def test_grid_pins_the_range_and_nearest_is_the_ptq(granularity: str, symmetric: bool) -> None:
    w = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    grid = grid_of(w, 3, granularity, symmetric)
    assert torch.equal(grid.nearest(), fake_quantize(w, 3, granularity, symmetric))
    flipped = grid.values(1 - grid.nearest_up)  # every element the other way, except the pinned ones
    assert torch.equal(level_indices(flipped, 3, granularity, symmetric), grid.levels(1 - grid.nearest_up))
    assert torch.allclose(fake_quantize(flipped, 3, granularity, symmetric), flipped, atol=1e-6)
    assert bool((grid.levels(1 - grid.nearest_up) != torch.round(grid.t)).any())


@pytest.mark.parametrize("config", [QuantConfig(bits=4), QuantConfig(bits=3, granularity="channel", symmetric=True)])
def test_stage_is_on_the_grid_and_ptq_keeps_it(dormant: BenchModel, digits8: TensorData, config: QuantConfig) -> None:
    model = copy.deepcopy(dormant)
    (stage,) = Efrap(bits=config.bits, granularity=config.granularity, symmetric=config.symmetric, iters=10,
                     lr=0.1).run(model, ctx_for(digits8, 64))
    assert stage.name == "efrap" and stage.state is not None and 0 < stage.metrics["flipped"] < 1
    original = dict(dormant.named_parameters())
    for name in scope_parameters(model, "whole"):
        w, before = stage.state[name], original[name].detach()
        again = fake_quantize(w, config.bits, config.granularity, config.symmetric)
        assert torch.allclose(again, w, rtol=0, atol=1e-6), name  # PTQ re-quantizes it to itself
        grid, ranges = (grid_of(v, config.bits, config.granularity, config.symmetric) for v in (w, before))
        assert float((grid.t - torch.round(grid.t)).abs().max()) < 1e-3, name  # on a level, not between two
        assert grid.low <= float(grid.t.min()) + 1e-3 and float(grid.t.max()) <= grid.high + 1e-3
        assert torch.equal(grid.offset, ranges.offset), name  # the min (or symmetric zero) is kept exactly
        assert torch.allclose(grid.scale, ranges.scale, rtol=1e-6), name  # and so is the range
    ptq = {k: v.clone() for k, v in stage.state.items()}
    model.load_state_dict(stage.state)
    with quantized(model, config), torch.no_grad():
        quantized_logits = model(digits8.test_x[:64])
    model.load_state_dict(ptq)
    with torch.no_grad():
        assert torch.allclose(model(digits8.test_x[:64]), quantized_logits, atol=1e-4)


def test_efrap_keeps_clean_accuracy_and_removes_the_dormant_backdoor(dormant: BenchModel, digits8: TensorData) -> None:
    int4 = QuantConfig(bits=4)
    nearest = at(dormant, digits8, int4)
    assert nearest["asr"] > 0.4  # the backdoor is awake at int4 with nearest rounding
    model = copy.deepcopy(dormant)
    (stage,) = Efrap(**FAST).run(model, ctx_for(digits8))
    after = at(model, digits8, int4)
    assert after["ba"] >= nearest["ba"] - 0.02, (nearest, after)
    assert after["asr"] < 0.1 and after["asr"] < nearest["asr"] - 0.3, (nearest, after)
    assert stage.metrics["config"] == "int4/whole" and stage.metrics["layers"] == 12


@pytest.mark.parametrize(("params", "message"), [
    ({"bits": 32}, "efrap.bits"), ({"scope": "all"}, "efrap.scope"), ({"granularity": "row"}, "efrap.granularity"),
    ({"iters": 0}, "efrap.iters"), ({"lambda_flip": -1.0}, "efrap.lambda_flip"), ({"guidance": "layer"}, "guidance"),
    ({"budget": 0.0}, "efrap.budget"),
])
def test_parameters_are_checked(params: dict, message: str) -> None:
    with pytest.raises(ComponentParamsError, match=message):
        Efrap(**params)


def test_efrap_and_the_audit_run_through_the_cli(write_scenario, tmp_path) -> None:
    scenario = tiny_scenario(
        train={"epochs": 2, "batch_size": 64, "lr": 0.05},
        models=[{"name": "pmoe", "width": 1, "experts": 2, "topk": 2}],
        datasets=[{"name": "digits", "image_size": 8}],
        attacks=[{"name": "badnets", "size": 2, "position": "bottom-right", "target": 0}],
        quantization={"bits": ["fp32", 4]},
        defenses=[{"name": "efrap", "iters": 5, "calib_images": 32, "budget": 0.05},
                  {"name": "quant-audit", "bits": [4], "granularity": ["tensor"], "reverse_steps": 3,
                   "reverse_batch": 8, "classes": [0, 1, 2]}],
    )
    path = write_scenario(scenario)
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--reports-dir",
                                 str(tmp_path / "reports")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = json.loads(runner.invoke(app, ["report", str(tmp_path / "runs" / "tiny"), "--format", "json"]).stdout)
    defended = {(r["defense"], r["quant"]) for r in rows["rows"] if r["defense"] != "-"}
    assert {q for d, q in defended if "efrap" in d} == {"fp32", "int4/whole"}
    report = (tmp_path / "reports" / "tiny.md").read_text()
    assert "| quant-audit" in report and "audit_score=" in report and "flip_int4_whole=" in report

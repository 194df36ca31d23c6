"""Shared fixtures: tiny scenarios on the embedded digits data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from bench.data.base import TensorData
from bench.registry import REGISTRY


def tiny_scenario(**overrides: Any) -> dict[str, Any]:
    """A scenario that trains in seconds on 2 CPU cores: digits at 16x16, a width-1 pMoE, one epoch of 45
    steps (batch 32), enough to lift the clean model well above chance (about 75% BA, not 10%)."""
    scenario: dict[str, Any] = {
        "name": "tiny",
        "seeds": [0],
        "device": "cpu",
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.05},
        "models": [{"name": "pmoe", "width": 1, "experts": 2, "topk": 4}],
        "datasets": [{"name": "digits", "image_size": 16}],
        "attacks": [{"name": "badnets", "size": 2, "position": "top-left", "target": 0}],
        "poison_rates": [0.1],
    }
    scenario.update(overrides)
    return scenario


@pytest.fixture
def write_scenario(tmp_path: Path):
    """Write a scenario dict to ``tmp_path/<name>.yaml`` and return the path."""

    def write(data: dict[str, Any] | str, name: str = "scenario.yaml") -> Path:
        path = tmp_path / name
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
        return path

    return write


@pytest.fixture(scope="module")
def one_thread():
    """Two cores are shared: a module that asks for it runs single-threaded (its module-scoped models are
    trained with one thread too, so their numbers do not depend on the machine's cores), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits8() -> TensorData:
    """scikit-learn's digits at their native 8x8: the smallest real data set, for defense tests."""
    return REGISTRY.get("dataset", "digits").create(image_size=8)


# -- a tiny BadNets-backdoored pMoE, shared by the defense tests ------------------------------------------
TINY_PMOE = {"name": "pmoe", "width": 1, "experts": 2, "topk": 2}

#: Train settings that pin what ``auto`` would choose per CPU (bf16 only where the CPU computes it): tests
#: whose thresholds were measured on a model trained in fp32 train it so on every machine.
FP32: dict[str, Any] = {"precision": "fp32", "channels_last": False}


def defense_cfg(**kw: Any) -> dict[str, Any]:
    """The resolved train settings the tiny backdoored model was trained with (overridable): fp32 and the
    contiguous layout, pinned, so the defense tests see the same model on every CPU (``precision: auto``
    would train it in bf16 on CPUs with AMX or AVX512-BF16 only)."""
    from bench.scenario import TrainSpec

    return TrainSpec(**{"epochs": 4, "batch_size": 64, "lr": 0.05, **FP32, **kw}).model_dump()


def defense_ctx(data: TensorData, n: int = 144, **kw: Any) -> Any:
    """A defense context holding ``n`` clean training images of ``data`` (a fixed draw)."""
    from bench.defenses import DefenseContext

    idx = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(1))[:n]
    return DefenseContext(clean_x=data.train_x[idx], clean_y=data.train_y[idx], train_cfg=defense_cfg(), seed=0,
                          num_classes=data.num_classes, **kw)


@pytest.fixture(scope="session")
def badnets_digits8_state(digits8: TensorData) -> dict[str, torch.Tensor]:
    """Weights of a width-1 pMoE (2 experts, top-2) trained 4 epochs on 8x8 digits with 10% BadNets (2x2
    top-left, target 0), single-threaded: trained once per session, each module builds its own copy."""
    from bench.attacks import BadNets, poison_training_set
    from bench.jobs import build_model
    from bench.train import fit

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = build_model(TINY_PMOE, digits8)
        poisoned = poison_training_set(digits8.train_x, digits8.train_y, BadNets(size=2, position="top-left"), 0,
                                       0.1, seed=0)
        fit(model, poisoned.x, poisoned.y, defense_cfg(), seed=0)
    finally:
        torch.set_num_threads(threads)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def backdoored_copy(data: TensorData, state: dict[str, torch.Tensor]) -> Any:
    """A fresh tiny pMoE holding ``state`` (see ``badnets_digits8_state``), in eval mode."""
    from bench.jobs import build_model

    model = build_model(TINY_PMOE, data)
    model.load_state_dict(state)
    return model.eval()


def run_with_page(root: Path, scenario: dict[str, Any]) -> tuple[Any, Path, Path]:
    """``bench run`` the scenario dict (named ``tiny``) under ``root``, then ``bench report --format html``:
    the CLI runner, the run folder and the page (the fixture of the report and plot tests)."""
    from typer.testing import CliRunner

    from bench.cli import app

    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(scenario, sort_keys=False))
    cli = CliRunner()
    ran = cli.invoke(
        app, ["run", str(path), "--runs-dir", str(root / "runs"), "--reports-dir", str(root / "reports")],
        catch_exceptions=False,
    )
    assert ran.exit_code == 0, ran.output
    run, page = root / "runs" / "tiny", root / "site" / "tiny.html"
    made = cli.invoke(app, ["report", str(run), "--format", "html", "--out", str(page)], catch_exceptions=False)
    assert made.exit_code == 0, made.output
    return cli, run, page

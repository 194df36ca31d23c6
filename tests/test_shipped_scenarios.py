"""Every shipped scenario's attacks can run on every model it names, and none is degenerate.

No data is loaded: each data set's shape comes from its declaration (digits 1 x image_size^2, MNIST 1x28x28
or image_size, CIFAR-10 3x32x32 or image_size, GTSRB 3 x image_size^2) and each model's routing grid from
building it on the meta device (no memory, no initialisation cost).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from bench.attacks import build_attack_trigger, trigger_problem
from bench.registry import REGISTRY
from bench.scenario import ResolvedScenario, load

ROOT = Path(__file__).resolve().parents[1] / "scenarios"
SCENARIOS = sorted(ROOT.glob("*.yaml"))
CHANNELS = {"digits": 1, "mnist": 1, "fashion-mnist": 1, "cifar10": 3, "gtsrb": 3}
NATIVE_SIZE = {"mnist": 28, "fashion-mnist": 28, "cifar10": 32}  # digits and gtsrb always name a size


def declared_shape(dataset: dict[str, Any]) -> tuple[int, int, int]:
    """``(C, H, W)`` of a resolved data-set spec, from its declaration alone."""
    name = dataset["name"]
    assert name in CHANNELS, f"add data set '{name}' to this test's declared shapes"
    size = dataset.get("image_size") or NATIVE_SIZE[name]
    return CHANNELS[name], size, size


def routing_grid(model: dict[str, Any], shape: tuple[int, int, int]) -> tuple[int, int] | None:
    """The model's patch grid for inputs of ``shape`` (None for a model without routing)."""
    c = shape[0]
    params = {k: v for k, v in model.items() if k != "name"}
    with torch.device("meta"):
        built = REGISTRY.get("model", model["name"]).create(
            input_shape=shape, num_classes=10, mean=(0.5,) * c, std=(0.25,) * c, **params
        )
    return tuple(built.patch_grid) if built.patch_grid is not None else None  # type: ignore[return-value]


def combinations(resolved: ResolvedScenario) -> list[tuple[str, tuple[int, int, int], tuple[int, int] | None]]:
    """``(label, shape, patch grid)`` for every data set x model of a scenario."""
    out = []
    for dataset in resolved.datasets:
        shape = declared_shape(dataset)
        for model in resolved.models:
            out.append((f"{dataset['name']} x {model['name']}", shape, routing_grid(model, shape)))
    return out


def test_scenarios_are_shipped() -> None:
    assert len(SCENARIOS) >= 9


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_every_attack_runs_on_every_model_and_is_not_degenerate(path: Path) -> None:
    resolved = load(path)
    for label, shape, grid in combinations(resolved):
        for attack in resolved.attacks:
            where = f"{path.name}: {label}: {attack['name']} ({attack['apply']})"
            problem = trigger_problem(attack, shape, grid)
            on_routing_grid = attack["apply"] == "badpatches" and attack.get("trigger_grid") is None
            if on_routing_grid and grid is None:
                assert problem is not None, f"{where}: BadPatches on the routing grid of a model without one"
                continue
            assert problem is None, f"{where}: {problem}"
            trigger = build_attack_trigger(attack["name"], attack["params"], attack["apply"], grid,
                                           attack.get("trigger_grid"))
            x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))
            assert trigger(x).shape == x.shape


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_badpatches_on_the_routing_grid_of_a_dense_model_has_a_reason(path: Path) -> None:
    resolved = load(path)
    for dataset in resolved.datasets:
        shape = declared_shape(dataset)
        dense_grid = routing_grid({"name": "dense"}, shape)
        assert dense_grid is None
        for attack in resolved.attacks:
            if attack["apply"] == "badpatches":
                on_routing_grid = {k: v for k, v in attack.items() if k != "trigger_grid"}
                assert trigger_problem(on_routing_grid, shape, dense_grid) is not None


PAPER_TRAINING = {"epochs": 25, "batch_size": 128, "optimizer": "sgd", "lr": 0.1, "momentum": 0.0,
                  "weight_decay": 0.0, "schedule": "constant", "augment": "none"}


@pytest.mark.parametrize("name", ["badpatches_paper", "pmoe_full"])
def test_badpatches_paper_settings_follow_the_published_code(name: str) -> None:
    resolved = load(ROOT / f"{name}.yaml")
    for train in resolved.train:
        assert {k: train[k] for k in PAPER_TRAINING} == PAPER_TRAINING
    plain = [a for a in resolved.attacks if not a.get("objective")]
    squares = [a for a in plain if a["name"] == "badnets"]
    assert squares and all(a["params"]["size"] == 4 and a["params"]["position"] == "top-left"
                           and a["params"]["value"] == pytest.approx(1 / 255) for a in squares)
    assert all(a["params"]["k"] == 2 and a["params"]["s"] == 0.25 and a["params"]["sampling"] == "nearest-truncate"
               for a in plain if a["name"] == "wanet")
    assert all(a["params"]["alpha"] == 0.5 for a in plain if a["name"] == "blend")
    badpatches = [a for a in plain if a["apply"] == "badpatches"]
    assert badpatches and all(a.get("trigger_grid") == [4, 4] for a in badpatches)
    for square in (a for a in badpatches if a["name"] == "badnets"):
        x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.5
        out = build_attack_trigger("badnets", square["params"], "badpatches", (8, 8), square["trigger_grid"])(x)
        assert (out != x).all(dim=1).float().mean() == 0.25  # the top-left quarter of every 8x8 patch


def test_quant_gtsrb_trains_as_its_paper_says() -> None:
    resolved = load(ROOT / "quant_gtsrb.yaml")
    assert {t["epochs"] for t in resolved.train} == {10}  # "SGD for 10 epochs" (quantized-backdoor paper)
    assert all(t["optimizer"] == "sgd" and t["augment"] == "none" and t["momentum"] == 0.0 for t in resolved.train)
    assert [m["name"] for m in resolved.models] == ["pmoe-paper"]  # 4 experts, top-16

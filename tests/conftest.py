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

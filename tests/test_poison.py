"""Poisoning: which indices, what changes (exactly those samples and labels), and the ASR test set."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.attacks import (
    BadNets,
    BadPatches,
    Blend,
    WaNet,
    poison_count,
    poison_indices,
    poison_training_set,
    triggered_test_set,
)
from bench.errors import ScenarioError

FAST = settings(max_examples=40, deadline=None)


def data(n: int = 60, classes: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=gen), torch.randint(0, classes, (n,), generator=gen)


@FAST
@given(n=st.integers(1, 2000), rate=st.floats(1e-4, 1.0), seed=st.integers(0, 2**31 - 1))
def test_indices_count_range_and_order(n: int, rate: float, seed: int) -> None:
    idx = poison_indices(n, rate, seed)
    assert idx.dtype == torch.long
    assert len(idx) == max(1, math.floor(rate * n + 0.5))
    assert len(idx) == poison_count(n, rate)
    assert len(set(idx.tolist())) == len(idx)  # without replacement
    assert idx.min() >= 0 and idx.max() < n
    assert torch.equal(idx, idx.sort().values)
    assert torch.equal(idx, poison_indices(n, rate, seed))  # frozen by the seed


def test_indices_known_counts_and_seeds() -> None:
    assert len(poison_indices(50_000, 0.0001, 0)) == 5  # the BadPatches paper's 0.01% of CIFAR-10
    assert len(poison_indices(100, 0.001, 0)) == 1  # a positive rate poisons at least one sample
    assert len(poison_indices(10, 0.25, 0)) == 3  # 2.5 rounds half up
    assert torch.equal(poison_indices(7, 1.0, 3), torch.arange(7))
    assert not torch.equal(poison_indices(1000, 0.1, 0), poison_indices(1000, 0.1, 1))


@pytest.mark.parametrize("rate", [0.0, -0.1, 1.5])
def test_rate_must_be_in_open_closed_unit_interval(rate: float) -> None:
    with pytest.raises(ScenarioError, match="poison_rate"):
        poison_indices(100, rate, 0)


def test_poisoning_changes_exactly_the_chosen_samples() -> None:
    x, y = data()
    x0, y0 = x.clone(), y.clone()
    trigger = BadNets(size=2)
    ps = poison_training_set(x, y, trigger, target=3, rate=0.2, seed=11)
    assert torch.equal(x, x0) and torch.equal(y, y0)  # inputs untouched
    assert torch.equal(ps.indices, poison_indices(60, 0.2, 11))
    rest = torch.ones(60, dtype=torch.bool)
    rest[ps.indices] = False
    assert torch.equal(ps.x[ps.indices], trigger(x[ps.indices]))
    assert torch.equal(ps.x[rest], x[rest]) and torch.equal(ps.y[rest], y[rest])
    assert (ps.y[ps.indices] == 3).all()
    assert len(ps.cross_indices) == 0
    changed = (ps.x != x).flatten(1).any(dim=1).nonzero().flatten()
    assert set(changed.tolist()) <= set(ps.indices.tolist())


def test_batching_does_not_change_the_result() -> None:
    x, y = data()
    trigger = BadPatches(Blend(alpha=0.3), (2, 2))
    a = poison_training_set(x, y, trigger, target=0, rate=0.5, seed=1, batch_size=7)
    b = poison_training_set(x, y, trigger, target=0, rate=0.5, seed=1)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.indices, b.indices)


def test_noise_mode_adds_cross_samples_with_true_labels() -> None:
    x, y = data(n=100)
    trigger = WaNet(noise_mode=True, cross_ratio=2.0)
    ps = poison_training_set(x, y, trigger, target=1, rate=0.1, seed=4)
    assert len(ps.indices) == 10 and len(ps.cross_indices) == 20
    assert not set(ps.indices.tolist()) & set(ps.cross_indices.tolist())
    assert torch.equal(ps.y[ps.cross_indices], y[ps.cross_indices])
    assert not torch.allclose(ps.x[ps.cross_indices], x[ps.cross_indices])
    assert not torch.allclose(ps.x[ps.cross_indices], trigger(x[ps.cross_indices]))
    untouched = torch.ones(100, dtype=torch.bool)
    untouched[ps.indices] = False
    untouched[ps.cross_indices] = False
    assert torch.equal(ps.x[untouched], x[untouched])
    again = poison_training_set(x, y, trigger, target=1, rate=0.1, seed=4)
    assert torch.equal(again.x, ps.x)
    plain = poison_training_set(x, y, WaNet(), target=1, rate=0.1, seed=4)
    assert len(plain.cross_indices) == 0


def test_bad_target_is_rejected() -> None:
    x, y = data()
    with pytest.raises(ScenarioError, match="target"):
        poison_training_set(x, y, BadNets(), target=-1, rate=0.1, seed=0)


def test_triggered_test_set_excludes_the_target_class() -> None:
    x, y = data(n=80)
    x0 = x.clone()
    trigger = Blend(alpha=0.4)
    xt, yt = triggered_test_set(x, y, trigger, target=2, batch_size=9)
    keep = y != 2
    assert int(keep.sum()) < 80 and len(yt) == int(keep.sum())
    assert (yt != 2).all() and torch.equal(yt, y[keep])
    torch.testing.assert_close(xt, trigger(x[keep]), rtol=0, atol=0)
    assert torch.equal(x, x0)
    xe, ye = triggered_test_set(x[y == 2], y[y == 2], trigger, target=2)
    assert len(xe) == 0 and len(ye) == 0

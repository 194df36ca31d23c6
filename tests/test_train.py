"""The training loop: device augmentation, determinism, and that it learns."""

from __future__ import annotations

import torch
from torch import nn

from bench.scenario import TrainSpec
from bench.train import augment_batch, fit


def test_crop_is_a_shift_with_zero_padding():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6) + 1
    out = augment_batch(x, "crop", torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    for i in range(2):
        # every non-zero value keeps its row/column neighbours: the output is a shifted window of x
        nz = out[i, 0][out[i, 0] > 0]
        assert set(nz.tolist()) <= set(x[i, 0].flatten().tolist())


def test_flip_and_none():
    x = torch.rand(64, 3, 8, 8)
    assert torch.equal(augment_batch(x, "none"), x)
    out = augment_batch(x, "crop_flip", torch.Generator().manual_seed(1))
    assert out.shape == x.shape


def test_fit_is_deterministic_and_learns():
    torch.manual_seed(0)
    x = torch.randn(256, 1, 4, 4)
    y = (x.sum(dim=(1, 2, 3)) > 0).long()
    cfg = TrainSpec(epochs=5, batch_size=32, lr=0.1).model_dump()

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(16, 2))

    a, b = make(), make()
    ra = fit(a, x, y, cfg, seed=3)
    fit(b, x, y, cfg, seed=3)
    assert torch.equal(a[1].weight, b[1].weight)
    assert ra.epoch_losses[-1] < ra.epoch_losses[0]
    assert ((a(x).argmax(1) == y).float().mean()) > 0.9

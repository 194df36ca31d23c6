"""The training loop: device augmentation, determinism, and that it learns."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bench.scenario import TrainSpec
from bench.train import CROP_PADDING as PAD
from bench.train import augment_batch, fit


def windows(x: torch.Tensor) -> torch.Tensor:
    """``[N, 81, C*H*W]``: every crop of ``x`` (offsets 0..8 in rows, then columns) from its padded copy."""
    n, c, h, w = x.shape
    padded = F.pad(x, (PAD, PAD, PAD, PAD))
    crops = padded.unfold(2, h, 1).unfold(3, w, 1)  # [N, C, 9, 9, H, W]
    return crops.permute(0, 2, 3, 1, 4, 5).reshape(n, (2 * PAD + 1) ** 2, c * h * w)


def test_crop_takes_the_window_at_the_seeded_offsets() -> None:
    # distinct values: a window of the padded image is identified by its pixels (neighbours stay neighbours)
    n, h, w = 32, 6, 6
    x = torch.arange(n * 2 * h * w, dtype=torch.float32).view(n, 2, h, w) + 1
    out = augment_batch(x, "crop", torch.Generator().manual_seed(0))
    offsets = torch.randint(0, 2 * PAD + 1, (2, n), generator=torch.Generator().manual_seed(0))
    padded = F.pad(x, (PAD, PAD, PAD, PAD))
    for i in range(n):
        r, c = int(offsets[0, i]), int(offsets[1, i])
        assert torch.equal(out[i], padded[i, :, r : r + h, c : c + w])
    assert len({(int(r), int(c)) for r, c in offsets.T}) > n // 2  # the offsets really vary
    assert torch.equal(augment_batch(x, "crop", torch.Generator().manual_seed(0)), out)  # seeded


def test_crop_never_flips_and_crop_flip_flips_about_half() -> None:
    n, h, w = 200, 6, 6
    x = torch.arange(n * h * w, dtype=torch.float32).view(n, 1, h, w) + 1
    plain, mirrored = windows(x), windows(x.flip(3))

    def kinds(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = out.reshape(n, 1, -1)
        return (plain == flat).all(-1).any(-1), (mirrored == flat).all(-1).any(-1)

    is_plain, is_flipped = kinds(augment_batch(x, "crop", torch.Generator().manual_seed(1)))
    assert is_plain.all() and not is_flipped.any()
    is_plain, is_flipped = kinds(augment_batch(x, "crop_flip", torch.Generator().manual_seed(1)))
    assert (is_plain ^ is_flipped).all()  # each image is a crop, mirrored or not, never both or neither
    assert 0.35 <= is_flipped.float().mean() <= 0.65


def test_none_is_the_identity() -> None:
    x = torch.rand(64, 3, 8, 8)
    assert torch.equal(augment_batch(x, "none"), x)


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

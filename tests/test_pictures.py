"""Trigger pictures: a real PNG of the expected size, one column per trigger, two rows per image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bench.attacks import BadNets, BadPatches, Blend, WaNet, trigger_grid_png
from bench.attacks.pictures import DPI, PANEL_INCHES

PANEL_PX = round(PANEL_INCHES * DPI)


@pytest.mark.parametrize("channels", [1, 3])
def test_png_has_one_column_per_trigger_and_two_rows_per_image(tmp_path, channels: int) -> None:
    x = torch.rand(2, channels, 16, 16, generator=torch.Generator().manual_seed(0))
    triggers = {"badnets": BadNets(), "wanet": WaNet(), "bp blend": BadPatches(Blend(), (4, 4))}
    path = trigger_grid_png(x, triggers, tmp_path / "sub" / "t.png", patch_grid=(4, 4))
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == (PANEL_PX * 4, PANEL_PX * 4)
        pixels = torch.from_numpy(np.asarray(img.convert("L"), dtype=np.float32))
    assert pixels.std() > 10  # not a blank canvas


def test_title_adds_room_and_different_triggers_give_different_pictures(tmp_path) -> None:
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    a = trigger_grid_png(x, {"t": BadNets(size=2)}, tmp_path / "a.png", title="demo")
    b = trigger_grid_png(x, {"t": BadNets(size=2, value=0.0)}, tmp_path / "b.png", title="demo")
    with Image.open(a) as img:
        assert img.size == (PANEL_PX * 2, PANEL_PX * 2 + round(0.4 * DPI))
    assert a.read_bytes() != b.read_bytes()


def test_rejects_non_batch_input(tmp_path) -> None:
    with pytest.raises(ValueError, match="N, C, H, W"):
        trigger_grid_png(torch.rand(3, 8, 8), {"t": BadNets()}, tmp_path / "x.png")

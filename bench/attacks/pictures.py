"""Pictures of triggers: clean images beside their triggered versions, like Figures 2 and 3 of the
BadPatches paper, plus the amplified difference so faint triggers (WaNet) can be seen at all.

matplotlib is imported lazily and drawn on an Agg canvas (no display, no pyplot global state).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bench.attacks.base import Trigger

if TYPE_CHECKING:
    from matplotlib.axes import Axes

PANEL_INCHES = 1.6
DPI = 120


def trigger_grid_png(
    images: torch.Tensor,
    triggers: Mapping[str, Trigger],
    path: Path | str,
    patch_grid: tuple[int, int] | None = None,
    title: str = "",
) -> Path:
    """Write a PNG with one column of clean ``images`` ``[N, C, H, W]`` and one column per trigger.

    Each image gets two rows: the pictures themselves, then ``|x' - x|`` averaged over channels and
    scaled to its own maximum (the panel says by how much), so a warp of a fraction of a pixel shows.
    ``patch_grid`` ``(rows, cols)`` draws faint patch boundaries (the routing grid). Grayscale data is
    shown in gray. Returns ``path``.
    """
    from matplotlib.figure import Figure

    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    clean = images.detach().float().cpu().clamp(0, 1)
    with torch.no_grad():
        triggered = {name: t(clean).detach().float().cpu().clamp(0, 1) for name, t in triggers.items()}
    n, _, h, w = clean.shape
    cols = 1 + len(triggered)
    fig = Figure(figsize=(PANEL_INCHES * cols, PANEL_INCHES * 2 * n + (0.4 if title else 0.0)))
    axes = fig.subplots(2 * n, cols, squeeze=False)
    for i in range(n):
        top, bottom = axes[2 * i], axes[2 * i + 1]
        _show_image(top[0], clean[i], patch_grid)
        bottom[0].text(0.5, 0.5, "|x' - x|\nscaled to\nits max", ha="center", va="center", fontsize=8)
        for j, (name, out) in enumerate(triggered.items(), start=1):
            _show_image(top[j], out[i], patch_grid)
            _show_difference(bottom[j], (out[i] - clean[i]).abs().mean(dim=0), patch_grid)
            if i == 0:
                top[j].set_title(name, fontsize=9)
        if i == 0:
            top[0].set_title("clean", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for i in range(n):
        axes[2 * i + 1][0].set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out_path = Path(path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, format="png", dpi=DPI)
    return out_path


def _show_image(ax: Axes, image: torch.Tensor, patch_grid: tuple[int, int] | None) -> None:
    c = image.shape[0]
    if c == 3:
        ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
    else:
        plane = image[0] if c == 1 else image.mean(dim=0)
        ax.imshow(plane.numpy(), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    _grid_lines(ax, image.shape[-2], image.shape[-1], patch_grid)


def _show_difference(ax: Axes, diff: torch.Tensor, patch_grid: tuple[int, int] | None) -> None:
    peak = float(diff.max())
    shown = diff / peak if peak > 0 else diff
    ax.imshow(shown.numpy(), cmap="inferno", vmin=0.0, vmax=1.0, interpolation="nearest")
    label = f"max {peak:.3f} (x{1 / peak:.0f})" if peak > 0 else "no change"
    ax.set_xlabel(label, fontsize=7)
    _grid_lines(ax, diff.shape[-2], diff.shape[-1], patch_grid)


def _grid_lines(ax: Axes, h: int, w: int, patch_grid: tuple[int, int] | None) -> None:
    if patch_grid is None:
        return
    rows, cols = patch_grid
    for r in range(1, rows):
        ax.axhline(r * h / rows - 0.5, color="cyan", alpha=0.4, linewidth=0.6)
    for c in range(1, cols):
        ax.axvline(c * w / cols - 0.5, color="cyan", alpha=0.4, linewidth=0.6)

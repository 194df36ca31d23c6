"""Pictures of routing: which patches each expert keeps (BadPatches paper, Figures 4-6 and 8), how often
over a test set (heat maps), and the pixel values of the patches each expert keeps (Figure 7).

The data behind every picture comes from small pure functions (:func:`highlight`,
:func:`selection_frequency`, :func:`expert_patch_values`) so tests can check it; the ``draw_*``
functions only lay it out. matplotlib is imported lazily and drawn on an Agg canvas (no pyplot state).
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PANEL_INCHES = 1.3
DPI = 110
#: How far an unselected patch is faded toward :data:`FADE_COLOR` in the selection maps (0 = not at all).
#: A blue-grey, not white or black: a white trigger or a black background must look different when an
#: expert leaves it out, on grayscale and colour data alike.
FADE = 0.7
FADE_COLOR = (0.55, 0.62, 0.75)
#: Outline of the patches the trigger touches (not one of the expert colours C0-C9).
TOUCH_COLOR = "magenta"
HIST_BINS = 20
#: Heat maps of grids up to this many patches print their values in the cells (more would not fit).
ANNOTATE_MAX_PATCHES = 36


def patch_means(images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``[N, rows, cols]``: mean pixel value (over channels and pixels) of every patch of ``images``."""
    n, c, h, w = images.shape
    rows, cols = grid
    if h % rows or w % cols:
        raise ValueError(f"a {rows}x{cols} patch grid does not divide a {h}x{w} image")
    return images.float().reshape(n, c, rows, h // rows, cols, w // cols).mean(dim=(1, 3, 5))


def selection_frequency(selection: torch.Tensor) -> torch.Tensor:
    """``[E, rows, cols]``: share of the images on which each expert kept each patch."""
    if selection.shape[0] == 0:
        return torch.zeros(selection.shape[1:], dtype=torch.float32)
    return selection.float().mean(dim=0).cpu()


def expert_patch_values(images: torch.Tensor, selection: torch.Tensor) -> list[torch.Tensor]:
    """Per expert, the mean pixel values of the patches it kept on ``images`` (Figure 7's data)."""
    means = patch_means(images, tuple(selection.shape[2:])).to(selection.device)
    return [means[selection[:, e]].cpu() for e in range(selection.shape[1])]


def highlight(image: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """``[H, W, 3]`` float RGB of ``image`` ``[C, H, W]``: patches where ``mask`` ``[rows, cols]`` is
    True as they are, the others faded toward :data:`FADE_COLOR` by :data:`FADE`."""
    rgb = _rgb(image)
    h, w, _ = rgb.shape
    rows, cols = mask.shape
    keep = mask.cpu().bool().repeat_interleave(h // rows, 0).repeat_interleave(w // cols, 1).numpy()
    faded = (1.0 - FADE) * rgb + FADE * np.asarray(FADE_COLOR)
    return np.where(keep[:, :, None], rgb, faded)


def draw_selection_maps(
    images: torch.Tensor,
    selections: Mapping[str, torch.Tensor],
    path: Path | str,
    triggered: torch.Tensor | None = None,
    triggered_selections: Mapping[str, torch.Tensor] | None = None,
    touch: torch.Tensor | None = None,
    title: str = "",
) -> Path:
    """Selection maps: one row per image and model, columns ``[image, expert 1..E]`` for the clean image
    and, when ``triggered`` is given, the same for the triggered image beside it.

    ``selections`` / ``triggered_selections``: model label -> ``[N, E, rows, cols]`` bool on ``images`` /
    ``triggered`` ``[N, C, H, W]``. ``touch`` ``[rows, cols]`` outlines the patches the trigger touches
    (left out when it touches every patch, as BadPatches does).
    """
    n = images.shape[0]
    experts = max(int(s.shape[1]) for s in selections.values())
    sides = [("clean", images, selections)]
    if triggered is not None and triggered_selections is not None:
        sides.append(("triggered", triggered, triggered_selections))
    outline = touch if touch is not None and not bool(touch.all()) else None
    cols = len(sides) * (1 + experts)
    labels = list(selections)
    legend = "kept patches as they are, inside the expert's outline; the others faded"
    if outline is not None:
        legend += "; magenta: patches the trigger touches"
    fig, axes = _panels(n * len(labels), cols, f"{title} ({legend})" if title else legend, _Layout())
    for i in range(n):
        for m, label in enumerate(labels):
            row = axes[i * len(labels) + m]
            for s, (side, pics, sels) in enumerate(sides):
                base = s * (1 + experts)
                sel = sels[label][i]
                row[base].imshow(_rgb(pics[i]), interpolation="nearest")
                for e in range(experts):
                    ax = row[base + 1 + e]
                    if e >= sel.shape[0]:
                        ax.set_axis_off()
                        continue
                    ax.imshow(highlight(pics[i], sel[e]), interpolation="nearest")
                    _outline(ax, sel[e], pics.shape[-2:], color=f"C{e}", linewidth=0.8)
                    if outline is not None and side == "triggered":
                        _outline(ax, outline, pics.shape[-2:])
                if i == 0 and m == 0:
                    row[base].set_title(f"{side} image", fontsize=8)
                    for e in range(experts):
                        row[base + 1 + e].set_title(f"expert {e + 1}", fontsize=8)
            row[0].set_ylabel(_label(f"#{i + 1} {label}"), fontsize=7)
    _finish(axes)
    return _save(fig, path)


def draw_frequency_maps(
    frequencies: Mapping[str, torch.Tensor],
    path: Path | str,
    touch: torch.Tensor | None = None,
    title: str = "",
) -> Path:
    """Heat maps of :func:`selection_frequency`: one row per label (e.g. ``"backdoored, triggered"``),
    one column per expert plus their mean; the shared colour scale is the share of images in [0, 1].
    ``touch`` outlines the trigger's patches (left out when it touches every patch)."""
    experts = max(int(f.shape[0]) for f in frequencies.values())
    outline = touch if touch is not None and not bool(touch.all()) else None
    fig, axes = _panels(len(frequencies), experts + 1, title, _Layout(left=0.5, right=0.9))
    image = None
    for r, (label, freq) in enumerate(frequencies.items()):
        panels = [*freq, freq.mean(dim=0)]
        for c, ax in enumerate(axes[r]):
            if c < experts and c >= freq.shape[0]:
                ax.set_axis_off()
                continue
            data = panels[c] if c < freq.shape[0] else panels[-1]
            image = ax.imshow(data.numpy(), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
            if data.numel() <= ANNOTATE_MAX_PATCHES:
                _annotate(ax, data)
            if outline is not None:
                _outline(ax, outline, outline.shape)
            if r == 0:
                ax.set_title("mean of experts" if c == experts else f"expert {c + 1}", fontsize=8)
        axes[r][0].set_ylabel(_label(label), fontsize=7)
    _finish(axes)
    if image is not None:
        width, height = fig.get_size_inches()
        bar = fig.add_axes((1 - 0.75 / width, 0.15, 0.12 / width, 0.7))
        fig.colorbar(image, cax=bar).set_label("share of images keeping the patch", fontsize=7)
        bar.tick_params(labelsize=6)
    return _save(fig, path)


def value_shares(values: torch.Tensor) -> np.ndarray:
    """``[HIST_BINS]``: share of ``values`` (in [0, 1]) in each of the equal bins over [0, 1]."""
    counts, _ = np.histogram(values.float().clamp(0, 1).numpy(), bins=HIST_BINS, range=(0.0, 1.0))
    return counts / max(int(values.numel()), 1)


def draw_patch_values(
    values: Mapping[str, tuple[list[torch.Tensor], torch.Tensor]], path: Path | str, title: str = ""
) -> Path:
    """Histograms of the mean pixel value of the patches each expert kept (Figure 7), one row per label,
    one column per expert; ``values[label] = (per-expert values, values of all patches)``, the latter
    drawn as a grey outline so a preference for dark or bright patches shows against the whole."""
    experts = max(len(v[0]) for v in values.values())
    layout = _Layout(panel=(1.7, 1.0), gap=(0.1, 0.1), left=1.05, right=0.1, top=0.25, bottom=0.65)
    fig, axes = _panels(len(values), experts, title, layout, share=True)
    edges = np.linspace(0.0, 1.0, HIST_BINS + 1)
    for r, (label, (per_expert, every)) in enumerate(values.items()):
        for e, ax in enumerate(axes[r]):
            if e >= len(per_expert):
                ax.set_axis_off()
                continue
            kept = per_expert[e]
            ax.stairs(value_shares(kept), edges, fill=True, color=f"C{e}", alpha=0.8, label="kept")
            ax.stairs(value_shares(every), edges, color="grey", label="all patches")
            mean = f"mean {float(kept.mean()):.2f}" if kept.numel() else "none kept"
            ax.text(0.97, 0.93, mean, transform=ax.transAxes, ha="right", va="top", fontsize=7)
            ax.tick_params(labelsize=6)
            ax.set_xticks([0.0, 0.5, 1.0])
            if r == 0:
                ax.set_title(f"expert {e + 1}", fontsize=8)
            if r == len(values) - 1:
                ax.set_xlabel("mean pixel value of patch", fontsize=7)
        axes[r][0].set_ylabel(_label(label, 16) + "\nshare of patches", fontsize=7)
    for ax in axes.flat:
        ax.label_outer()
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncols=2, fontsize=7, frameon=False)
    return _save(fig, path)


def _rgb(image: torch.Tensor) -> np.ndarray:
    """``[H, W, 3]`` float in [0, 1] (grayscale repeated; other channel counts averaged)."""
    img = image.detach().float().cpu().clamp(0, 1)
    if img.shape[0] != 3:
        img = img.mean(dim=0, keepdim=True).expand(3, -1, -1)
    return img.permute(1, 2, 0).numpy()


@dataclass(frozen=True)
class _Layout:
    """Panel sizes and margins in inches (a fixed layout: constrained layout costs seconds per figure)."""

    panel: tuple[float, float] = (PANEL_INCHES, PANEL_INCHES)
    gap: tuple[float, float] = (0.06, 0.06)
    left: float = 0.45
    right: float = 0.08
    top: float = 0.22
    bottom: float = 0.08


def _panels(
    rows: int, cols: int, title: str, layout: _Layout, share: bool = False
) -> tuple[Figure, np.ndarray]:
    """A figure of ``rows`` x ``cols`` axes laid out by ``layout``, with the title wrapped to its width."""
    from matplotlib.figure import Figure

    (pw, ph), (gw, gh) = layout.panel, layout.gap
    width = layout.left + layout.right + cols * pw + (cols - 1) * gw
    lines = textwrap.wrap(title, width=max(20, int(width * 12))) if title else []
    head = layout.top + 0.16 * len(lines)
    height = head + layout.bottom + rows * ph + (rows - 1) * gh
    fig = Figure(figsize=(width, height))
    if lines:
        fig.suptitle("\n".join(lines), fontsize=9, y=1 - 0.04 / height, va="top")
    axes = fig.subplots(rows, cols, squeeze=False, sharex=share, sharey=share, gridspec_kw={
        "left": layout.left / width, "right": 1 - layout.right / width, "bottom": layout.bottom / height,
        "top": 1 - head / height, "wspace": gw / pw, "hspace": gh / ph,
    })
    return fig, axes


def _label(text: str, width: int = 18) -> str:
    """A row label wrapped to fit beside a panel."""
    return "\n".join(textwrap.wrap(text, width=width, break_long_words=True)) or text


def _outline(ax: Axes, mask: torch.Tensor, size: tuple[int, int] | torch.Size, color: str = TOUCH_COLOR,
             linewidth: float = 1.2) -> None:
    """Draw the boundary of the region of ``mask`` ``[rows, cols]`` on axes showing an image of ``size``
    (H, W) pixels: the edges of kept patches whose neighbour across the edge is not kept."""
    from matplotlib.collections import LineCollection

    m = np.pad(mask.cpu().bool().numpy(), 1)
    rows, cols = mask.shape
    ph, pw = size[0] / rows, size[1] / cols
    segments = []
    for r, c in np.argwhere(m[1:-1, 1:-1]):
        top, left = r * ph - 0.5, c * pw - 0.5
        bottom, right = top + ph, left + pw
        if not m[r, c + 1]:
            segments.append([(left, top), (right, top)])
        if not m[r + 2, c + 1]:
            segments.append([(left, bottom), (right, bottom)])
        if not m[r + 1, c]:
            segments.append([(left, top), (left, bottom)])
        if not m[r + 1, c + 2]:
            segments.append([(right, top), (right, bottom)])
    if segments:
        ax.add_collection(LineCollection(segments, colors=color, linewidths=linewidth))


def _annotate(ax: Axes, data: torch.Tensor) -> None:
    for (r, c), v in np.ndenumerate(data.numpy()):
        ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=5, color="white" if v < 0.6 else "black")


def _finish(axes: np.ndarray) -> None:
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])


def _save(fig: Figure, path: Path | str) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=DPI)
    return out

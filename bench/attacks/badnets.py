"""BadNets square trigger: a solid square stamped at a fixed position.

Paper: Gu, Dolan-Gavitt, Garg, "BadNets: Identifying Vulnerabilities in the Machine Learning Model Supply
Chain", 2017, https://arxiv.org/abs/1708.06733. The BadPatches paper (Section 3.3.1) uses a black 4x4
square in the top-left corner; the quantized-backdoor paper a white 2x2 square bottom-right. Both are
settings of this one trigger.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from bench.attacks.base import Trigger
from bench.errors import ComponentParamsError
from bench.registry import register_trigger

Position = Literal["top-left", "top-right", "bottom-left", "bottom-right", "center"]


@register_trigger("badnets")
class BadNets(Trigger):
    r"""BadNets square trigger (Gu et al. 2017, https://arxiv.org/abs/1708.06733).

    Every channel of a ``size`` x ``size`` square at ``position`` becomes
    ``(1 - intensity) * x + intensity * value``; other pixels are untouched.

    Arguments:
        size (int): side of the square in pixels. Default: 3.
        position (str): "top-left", "top-right", "bottom-left", "bottom-right" or "center".
            Default: "bottom-right".
        value (float): colour of the square in [0, 1] (1 = white, 0 = black). Default: 1.0.
        intensity (float): strength in [0, 1]; 0 leaves images unchanged, 1 stamps a solid square.
            Default: 1.0.
        margin (int): distance in pixels from the nearest edges (ignored for "center"). Default: 0.

    Shape:
        images: ``[N, C, H, W]`` in [0, 1], any ``H, W`` with room for the square (and margin).
        output: ``[N, C, H, W]`` in [0, 1].

    Examples::

        >>> trigger = BadNets(size=4, position="top-left", value=0.0)
        >>> poisoned = trigger(images)
    """

    strength_param: ClassVar[str] = "intensity"

    def __init__(
        self,
        size: int = 3,
        position: Position = "bottom-right",
        value: float = 1.0,
        intensity: float = 1.0,
        margin: int = 0,
    ) -> None:
        if size < 1:
            raise ComponentParamsError(f"badnets.size: must be at least 1 pixel, got {size}")
        if margin < 0:
            raise ComponentParamsError(f"badnets.margin: must be >= 0 pixels, got {margin}")
        if not 0.0 <= value <= 1.0:
            raise ComponentParamsError(f"badnets.value: must be in [0, 1] (0 black, 1 white), got {value}")
        if not 0.0 <= intensity <= 1.0:
            raise ComponentParamsError(f"badnets.intensity: must be in [0, 1], got {intensity}")
        self.size = size
        self.position: Position = position
        self.value = value
        self.intensity = intensity
        self.margin = margin

    def box(self, height: int, width: int) -> tuple[int, int]:
        """Top-left corner ``(row, col)`` of the square on an ``height`` x ``width`` image."""
        margin = 0 if self.position == "center" else self.margin
        if self.size + margin > height or self.size + margin > width:
            raise ComponentParamsError(
                f"badnets.size: a {self.size}x{self.size} square (margin {margin}) does not fit an image of "
                f"{height}x{width} pixels; size + margin must be <= {min(height, width)}"
            )
        far_row, far_col = height - self.size - self.margin, width - self.size - self.margin
        corners = {
            "top-left": (self.margin, self.margin),
            "top-right": (self.margin, far_col),
            "bottom-left": (far_row, self.margin),
            "bottom-right": (far_row, far_col),
            "center": ((height - self.size) // 2, (width - self.size) // 2),
        }
        return corners[self.position]

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        row, col = self.box(images.shape[-2], images.shape[-1])
        out = images.clone()
        square = out[..., row : row + self.size, col : col + self.size]
        out[..., row : row + self.size, col : col + self.size] = (
            (1.0 - self.intensity) * square + self.intensity * self.value
        )
        return out

    def touched_mask(self, shape: tuple[int, int, int]) -> torch.Tensor:
        """The square's pixels (empty when ``intensity`` is 0)."""
        _, h, w = shape
        mask = torch.zeros(h, w, dtype=torch.bool)
        if self.intensity > 0:
            row, col = self.box(h, w)
            mask[row : row + self.size, col : col + self.size] = True
        return mask

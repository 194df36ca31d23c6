"""Blend trigger: the image is mixed with a fixed pattern image.

Paper: Chen, Liu, Li, Lu, Song, "Targeted Backdoor Attacks on Deep Learning Systems Using Data Poisoning",
2017, https://arxiv.org/abs/1712.05526 (the blended-injection strategy; its random-noise pattern is our
default). The BadPatches paper (Section 3.3.2) blends a Hello Kitty image with alpha = 0.5; pass that
image's path as ``pattern``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from bench.attacks.base import Trigger
from bench.errors import ComponentParamsError
from bench.registry import register_trigger

if TYPE_CHECKING:
    from PIL.Image import Image

#: Side of the square on which the "noise" pattern is drawn; every other size is a resize of it.
NOISE_BASE_SIZE = 32


@register_trigger("blend")
class Blend(Trigger):
    r"""Blended-injection trigger (Chen et al. 2017, https://arxiv.org/abs/1712.05526).

    ``x' = (1 - alpha) * x + alpha * t`` with ``t`` the pattern at the images' size.

    The pattern is one fixed image resized to whatever ``H, W`` the trigger is called on, so it is the same
    pattern at every size: a whole 32x32 image and each 8x8 patch under BadPatches see the same picture,
    only scaled (as the BadPatches paper resizes its blend image to the patch). An image file is resized
    bilinearly (antialiased when shrinking, a faithful thumbnail). The "noise" pattern is uniform noise in
    [0, 1] drawn from ``seed`` at a fixed 32x32 base resolution, one plane per channel, resized by nearest
    neighbour: every pixel at every size is one of the base pattern's pixels, so it stays full-contrast
    per-pixel noise as in Chen et al. (a smooth resize would average a 4x4 patch's noise to near-uniform
    gray and turn the trigger into a mere contrast change).

    Arguments:
        alpha (float): blend ratio in [0, 1], the strength; 0 leaves images unchanged. Default: 0.5 (the
            BadPatches paper).
        pattern (str): "noise", or the path of an image file (any format PIL reads); it is converted to
            the data's channel count (grayscale "L" for 1 channel, "RGB" for 3). Default: "noise".
        seed (int): seed of the "noise" pattern. Default: 0.

    Shape:
        images: ``[N, C, H, W]`` in [0, 1], any ``H, W``; ``C`` is 1 or 3 for an image-file pattern.
        output: ``[N, C, H, W]`` in [0, 1].

    Examples::

        >>> trigger = Blend(alpha=0.2, pattern="hello_kitty.png")
        >>> poisoned = trigger(images)
    """

    strength_param: ClassVar[str] = "alpha"

    def __init__(self, alpha: float = 0.5, pattern: str = "noise", seed: int = 0) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ComponentParamsError(f"blend.alpha: must be in [0, 1], got {alpha}")
        self.alpha = alpha
        self.pattern = pattern
        self.seed = seed
        self._image = None if pattern == "noise" else _open_image(pattern)
        self._base: dict[int, torch.Tensor] = {}
        self._sized: dict[tuple[int, int, int, torch.device, torch.dtype], torch.Tensor] = {}

    def base_pattern(self, channels: int) -> torch.Tensor:
        """``[C, h, w]`` pattern in [0, 1] at its own resolution (32x32 for noise, the file's size)."""
        if channels not in self._base:
            if self._image is None:
                gen = torch.Generator().manual_seed(self.seed)
                base = torch.rand(channels, NOISE_BASE_SIZE, NOISE_BASE_SIZE, generator=gen)
            else:
                base = _image_tensor(self._image, channels, self.pattern)
            self._base[channels] = base
        return self._base[channels]

    def pattern_for(
        self, channels: int, height: int, width: int, device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """``[C, H, W]`` pattern ``t`` at the given size, on ``device`` (cached)."""
        key = (channels, height, width, torch.device(device), dtype)
        if key not in self._sized:
            base = self.base_pattern(channels)
            if base.shape[-2:] != (height, width):
                base = self._resize(base, height, width)
            self._sized[key] = base.to(device=device, dtype=dtype)
        return self._sized[key]

    def _resize(self, base: torch.Tensor, height: int, width: int) -> torch.Tensor:
        if self._image is None:  # noise stays per-pixel uniform noise: each pixel is one of the base's
            return F.interpolate(base[None], size=(height, width), mode="nearest-exact")[0]
        shrink = height < base.shape[-2] or width < base.shape[-1]
        resized = F.interpolate(
            base[None], size=(height, width), mode="bilinear", align_corners=False, antialias=shrink
        )
        return resized[0].clamp(0.0, 1.0)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        _, c, h, w = images.shape
        t = self.pattern_for(c, h, w, images.device, images.dtype)
        return ((1.0 - self.alpha) * images + self.alpha * t).clamp(0.0, 1.0)


def _open_image(path: str) -> Image:
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    file = Path(path).expanduser()
    if not file.is_file():
        raise ComponentParamsError(
            f"blend.pattern: no image file at '{path}'; give \"noise\" or the path of an image file"
        )
    try:
        with PILImage.open(file) as img:
            img.load()
            return img.copy()
    except (OSError, UnidentifiedImageError) as exc:
        raise ComponentParamsError(f"blend.pattern: cannot read '{path}' as an image: {exc}") from None


def _image_tensor(img: Image, channels: int, path: str) -> torch.Tensor:
    modes = {1: "L", 3: "RGB"}
    if channels not in modes:
        raise ComponentParamsError(
            f"blend.pattern: an image-file pattern ('{path}') works on 1- or 3-channel data, "
            f"got {channels} channels; use pattern=\"noise\""
        )
    converted = img.convert(modes[channels])
    data = torch.frombuffer(bytearray(converted.tobytes()), dtype=torch.uint8)
    h, w = converted.height, converted.width
    return data.view(h, w, channels).permute(2, 0, 1).float().div(255.0)

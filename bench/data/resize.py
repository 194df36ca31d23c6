"""The one image-resize rule every data set uses.

Bilinear with antialiasing on and ``align_corners=False``: the same filter family as
``torchvision.transforms.Resize`` on PIL images (PIL's bilinear resample is antialiased), which is what
the reference pipelines apply to GTSRB before a 32x32 model. Antialiasing only matters when shrinking
(GTSRB's up to 250x250 photos); enlarging (digits 8 -> 16) is plain bilinear interpolation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """``[N, C, H, W]`` float images in [0, 1] resized to ``[N, C, size, size]``, still in [0, 1].

    Returns the input unchanged when it already has that size. Non-square inputs are stretched to a
    square, as the BadPatches paper does for GTSRB ("we resize all images to 32x32x3").
    """
    if images.dim() != 4:
        raise ValueError(f"resize_images expects [N, C, H, W], got shape {tuple(images.shape)}")
    if size < 1:
        raise ValueError(f"resize_images: size must be >= 1, got {size}")
    if images.shape[-2:] == (size, size):
        return images
    if not images.is_floating_point():
        raise ValueError(f"resize_images expects float images in [0, 1], got dtype {images.dtype}")
    out = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out.clamp_(0.0, 1.0)

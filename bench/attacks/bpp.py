"""BppAttack trigger: image colour quantization (fewer bits per channel) with Floyd-Steinberg dithering.

Paper: Wang, Zhai, Ma, "BppAttack: Stealthy and Efficient Trojan Attacks against Deep Neural Networks via
Image Quantization and Contrastive Adversarial Learning", CVPR 2022; the authors' release
github.com/RU-System-Software-and-Security/BppAttack (``bppattack.py``). The trigger is the quantization
itself: each channel is requantized to ``2 ** squeeze_bits`` levels, and Floyd-Steinberg dithering spreads
each pixel's rounding error to its unvisited neighbours (7/16 right, 3/16 down-left, 5/16 down, 1/16
down-right), which hides the banding that plain rounding leaves.

Defaults: ``squeeze_bits = 5`` (32 levels), the setting of the release's run command for CIFAR-10
(``--squeeze_num 32``; its argparse default is 8 levels), with dithering on, the paper's method.

Left out: the paper's "contrastive adversarial learning", its negative samples that keep their labels so
that the network learns this exact quantization rather than any small perturbation (the release's
``neg_rate`` = 0.2: clean images plus the quantization residual of another image, redrawn every batch). They
are an addition to the poisoning, not the trigger; here only the triggered images poison. Also different
from the release: pixels are quantized in [0, 1] to ``k / (2 ** bits - 1)`` (the release rounds the result
to whole 8-bit grey levels), and the chosen level is clamped to the valid range (the release lets the
diffused error push it outside [0, 255]).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from bench.attacks.base import Trigger
from bench.errors import ComponentParamsError
from bench.registry import register_trigger


@register_trigger("bpp")
class Bpp(Trigger):
    r"""BppAttack trigger (Wang, Zhai, Ma, CVPR 2022; github.com/RU-System-Software-and-Security/BppAttack).

    ``x' = round(x * (L - 1)) / (L - 1)`` with ``L = 2 ** squeeze_bits`` levels per channel, each pixel's
    rounding error diffused Floyd-Steinberg style in row-major order (``dithering``), on every channel
    separately. Under ``apply: badpatches`` each patch is quantized and dithered on its own.

    There is no strength that is 0 for "no trigger" (``strength_param`` is empty): fewer bits is a
    stronger, more visible trigger; at 8 bits images already on the 8-bit grid are unchanged.

    Arguments:
        squeeze_bits (int): bits per channel after quantization, 1..8. Default: 5 (32 levels, the authors'
            CIFAR-10 run).
        dithering (bool): Floyd-Steinberg error diffusion (the paper's method); False rounds each pixel on
            its own. Default: True.

    Shape:
        images: ``[N, C, H, W]`` in [0, 1], any ``H, W``.
        output: ``[N, C, H, W]`` in [0, 1], every value one of the ``L`` levels.

    Examples::

        >>> trigger = Bpp(squeeze_bits=5)
        >>> poisoned = trigger(images)
    """

    strength_param: ClassVar[str] = ""

    def __init__(self, squeeze_bits: int = 5, dithering: bool = True) -> None:
        if not 1 <= squeeze_bits <= 8:
            raise ComponentParamsError(f"bpp.squeeze_bits: must be in 1..8 bits per channel (5 = the authors' "
                                       f"32 levels), got {squeeze_bits}")
        self.squeeze_bits = squeeze_bits
        self.dithering = dithering

    @property
    def levels(self) -> int:
        return 2**self.squeeze_bits

    def quantize(self, values: torch.Tensor) -> torch.Tensor:
        """Nearest of the ``L`` levels ``k / (L - 1)`` (halves to even, as the release's ``np.round``)."""
        top = self.levels - 1
        return torch.round(values * top).clamp(0, top) / top

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        if not self.dithering:
            return self.quantize(images)
        work = images.to(torch.float64, copy=True)  # the error is diffused into this copy
        out = torch.empty_like(work)
        width = work.shape[-1]
        for row in range(work.shape[-2]):
            errors = torch.empty_like(work[..., row, :])
            carry = torch.zeros_like(work[..., row, 0])
            for col in range(width):
                old = work[..., row, col] + carry
                new = self.quantize(old)
                out[..., row, col] = new
                errors[..., col] = old - new
                carry = errors[..., col] * (7 / 16)
            if row + 1 < work.shape[-2]:  # the whole row's error reaches the next row at once
                below = work[..., row + 1, :]
                below += errors * (5 / 16)
                below[..., 1:] += errors[..., :-1] * (1 / 16)
                below[..., :-1] += errors[..., 1:] * (3 / 16)
        return out.to(images.dtype)

    def touched_mask(self, shape: tuple[int, int, int]) -> torch.Tensor:
        """Every pixel: each one is requantized (the default probe on flat images would miss most)."""
        _, h, w = shape
        return torch.ones(h, w, dtype=torch.bool)

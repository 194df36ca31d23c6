"""Low-frequency (smooth) trigger: a fixed pattern without high-frequency content, added to the image.

Paper: Zeng, Park, Mao, Jia, "Rethinking the Backdoor Attacks' Triggers: A Frequency Perspective", ICCV
2021, https://arxiv.org/abs/2104.03413 (Section 5, smooth triggers; BackdoorBench's ``lf``); the authors'
release github.com/YiZeng623/frequency-backdoor (``Sec5_Smooth_Trigger``). Their trigger is a universal
adversarial perturbation (DeepFool steps on 100 training images against a pretrained model) that is passed
through a low-pass filter after every step, min-max normalised to [0, 0.2] (``normalization``), and fitted
into each image's [0, 1] range by an iterative smooth clip.

What we simplify, to keep it cheap and model-free (no surrogate model, no optimisation):

* the pattern is random, not adversarial: Gaussian coefficients drawn from ``seed``, so it carries no
  pull towards any class (the paper's lets a lower poison rate reach a high ASR);
* the low-pass filter is an ideal one in the 2-D DCT domain: only the ``cutoff`` x ``cutoff`` lowest
  frequencies are kept (the release blurs with a Gaussian of 6 pixels' deviation on 32x32 images, whose
  gain at DCT frequency u = 1, 2, 3, 4 is 0.84, 0.50, 0.21, 0.06: ``cutoff = 4`` keeps u = 0..3, about what
  it passes). The pattern is synthesised from those coefficients at any ``H, W``, so it is the same
  smooth picture at every size (an image, or a BadPatches patch);
* like the release it is min-max normalised to ``[0, epsilon]`` (``epsilon`` = 0.2, its setting, is the
  L_inf norm of what is added); the sum is then clipped to [0, 1] instead of the smooth clip.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from bench.attacks.base import Trigger
from bench.errors import ComponentParamsError
from bench.registry import register_trigger


@register_trigger("lowfreq")
class LowFrequency(Trigger):
    r"""Low-frequency smooth trigger (Zeng et al., ICCV 2021, https://arxiv.org/abs/2104.03413).

    A random smooth pattern instead of the paper's adversarial one (see the module doc):
    ``p(i, j) = sum_{u, v < cutoff} a_{c,u,v} cos(pi (2i + 1) u / 2H) cos(pi (2j + 1) v / 2W)`` with
    ``a ~ N(0, 1)`` from ``seed`` (one plane per channel), ``t = epsilon * (p - min p) / (max p - min p)``
    (min and max over the whole pattern), ``x' = clip(x + t, 0, 1)``.

    Arguments:
        epsilon (float): L_inf norm of the added pattern in [0, 1], the strength; 0 leaves images unchanged.
            Default: 0.2 (the authors' normalisation).
        cutoff (int): DCT frequencies kept per axis, >= 2 (1 would keep only a constant). Default: 4.
        seed (int): seed of the pattern's coefficients. Default: 0.

    Shape:
        images: ``[N, C, H, W]`` in [0, 1], any ``H, W`` with more than one pixel.
        output: ``[N, C, H, W]`` in [0, 1].

    Examples::

        >>> trigger = LowFrequency(epsilon=0.2, cutoff=4)
        >>> poisoned = trigger(images)
    """

    strength_param: ClassVar[str] = "epsilon"

    def __init__(self, epsilon: float = 0.2, cutoff: int = 4, seed: int = 0) -> None:
        if not 0.0 <= epsilon <= 1.0:
            raise ComponentParamsError(f"lowfreq.epsilon: must be in [0, 1] (0.2 is the authors'), got {epsilon}")
        if cutoff < 2:
            raise ComponentParamsError(f"lowfreq.cutoff: must be >= 2 DCT frequencies per axis (1 keeps only a "
                                       f"constant), got {cutoff}")
        self.epsilon = epsilon
        self.cutoff = cutoff
        self.seed = seed
        self._patterns: dict[tuple[int, int, int, torch.device, torch.dtype], torch.Tensor] = {}

    def coefficients(self, channels: int) -> torch.Tensor:
        """``[C, cutoff, cutoff]`` DCT coefficients; channel ``c``'s do not depend on ``channels``."""
        gen = torch.Generator().manual_seed(self.seed)
        return torch.randn(channels, self.cutoff, self.cutoff, generator=gen, dtype=torch.float64)

    def pattern(
        self, channels: int, height: int, width: int, device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """``[C, H, W]``: the added pattern ``t`` in ``[0, epsilon]`` (cached per size and device)."""
        key = (channels, height, width, torch.device(device), dtype)
        if key not in self._patterns:
            smooth = torch.einsum("cuv,ui,vj->cij", self.coefficients(channels), _basis(self.cutoff, height),
                                  _basis(self.cutoff, width))
            spread = float(smooth.max() - smooth.min())
            if spread < 1e-12:
                raise ComponentParamsError(
                    f"lowfreq: the pattern is flat on a {height}x{width} image (its {self.cutoff} lowest "
                    "frequencies vanish there); use larger images or patches (apply: badpatches: a coarser "
                    "trigger_grid)"
                )
            self._patterns[key] = (self.epsilon * (smooth - smooth.min()) / spread).to(device=device, dtype=dtype)
        return self._patterns[key]

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        if self.epsilon == 0:
            return images.clone()
        _, c, h, w = images.shape
        return (images + self.pattern(c, h, w, images.device, images.dtype)).clamp(0.0, 1.0)

    def touched_mask(self, shape: tuple[int, int, int]) -> torch.Tensor:
        """Pixels where the pattern is not 0 in some channel (its minimum is 0 by construction)."""
        c, h, w = shape
        if self.epsilon == 0:
            return torch.zeros(h, w, dtype=torch.bool)
        return (self.pattern(c, h, w) > 0).any(dim=0)


def _basis(cutoff: int, size: int) -> torch.Tensor:
    """``[cutoff, size]``: the DCT-II cosines ``cos(pi (2i + 1) u / 2 size)`` (float64)."""
    u = torch.arange(cutoff, dtype=torch.float64)[:, None]
    i = torch.arange(size, dtype=torch.float64)[None, :]
    return torch.cos(math.pi * (2 * i + 1) * u / (2 * size))

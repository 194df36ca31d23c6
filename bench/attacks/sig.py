"""SIG trigger: a horizontal sinusoidal signal added to the whole image.

Paper: Barni, Kallas, Tondi, "A new Backdoor Attack in CNNs by training set corruption without label
poisoning", ICIP 2019, https://arxiv.org/abs/1902.11237. The signal is ``v(i, j) = delta * sin(2 pi j f / m)``
on column ``j`` of an ``m``-column image, the same on every row and channel, added to the image; the paper's
setting is ``delta = 20`` grey levels (20/255 here, images in [0, 1]) and ``f = 6``.

The paper's attack is clean-label: only target-class training images get the signal and keep their labels.
The trigger itself does not know how it is used; a scenario sets ``mode: clean-label`` on the attack for
the paper's attack (``mode: dirty``, the default, measures the signal as a dirty-label trigger, which is
far easier to learn). The paper also amplifies the signal at test time in some experiments; here training
and test use the same ``delta``.

Registered as ``sinusoid``: the name ``sig`` belongs to the worked plugin example ``plugins/sig.py`` (the
same signal), and a built-in of that name would refuse to load it.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from bench.attacks.base import Trigger
from bench.errors import ComponentParamsError
from bench.registry import register_trigger


@register_trigger("sinusoid")
class SIG(Trigger):
    r"""SIG sinusoidal-signal trigger (Barni et al., ICIP 2019, https://arxiv.org/abs/1902.11237).

    ``x' = clip(x + delta * sin(2 pi j f / W), 0, 1)`` on column ``j`` of ``W``, every row and channel.
    Use it with ``mode: clean-label`` for the paper's attack. Under ``apply: badpatches`` every patch gets
    the whole signal (``f`` periods per patch); where every sample falls on a zero of the sine (``f = 6`` on
    a 4-pixel patch: ``sin(3 pi j) = 0``) applying it raises an error, so the planner refuses the attack with
    that reason instead of training on an unchanged image.

    Arguments:
        delta (float): amplitude in [0, 1], the strength; 0 leaves images unchanged. Default: 20/255 (the
            paper's 20 grey levels).
        frequency (float): periods across the image width, > 0. Default: 6 (the paper's f).

    Shape:
        images: ``[N, C, H, W]`` in [0, 1], any ``H, W``.
        output: ``[N, C, H, W]`` in [0, 1].

    Examples::

        >>> trigger = SIG(delta=20 / 255, frequency=6)
        >>> poisoned = trigger(images)
    """

    strength_param: ClassVar[str] = "delta"

    def __init__(self, delta: float = 20 / 255, frequency: float = 6.0) -> None:
        if not 0.0 <= delta <= 1.0:
            raise ComponentParamsError(f"sinusoid.delta: must be in [0, 1] (20/255 is the paper's), got {delta}")
        if not frequency > 0.0:
            raise ComponentParamsError(f"sinusoid.frequency: must be > 0 periods per image, got {frequency}")
        self.delta = delta
        self.frequency = frequency

    def signal(
        self, width: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """``[W]``: ``delta * sin(2 pi j f / W)`` for each column ``j`` (computed in float64)."""
        cols = torch.arange(width, dtype=torch.float64)
        return (self.delta * torch.sin(2.0 * math.pi * cols * self.frequency / width)).to(device=device, dtype=dtype)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        width = images.shape[-1]
        if self.delta > 0 and not self._nonzero(width).any():
            raise ComponentParamsError(
                f"sinusoid.frequency: {self.frequency:g} periods across {width} columns samples the sine only at "
                f"its zeros, so the signal vanishes; use a frequency below {width / 2:g} with 2 * frequency / "
                f"{width} not a whole number (under apply: badpatches, {width} is the patch width)"
            )
        return (images + self.signal(width, images.device, images.dtype)).clamp(0.0, 1.0)

    def touched_mask(self, shape: tuple[int, int, int]) -> torch.Tensor:
        """Every column where the signal is not zero (column 0 never is touched: ``sin(0) = 0``)."""
        _, h, w = shape
        return self._nonzero(w).expand(h, w).clone()

    def _nonzero(self, width: int) -> torch.Tensor:
        """``[W]`` bool: columns where the sine is not (numerically) zero; none when ``delta`` is 0."""
        wave = self.signal(width, dtype=torch.float64).abs()
        return wave > 1e-9 * self.delta if self.delta > 0 else torch.zeros(width, dtype=torch.bool)

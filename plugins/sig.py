"""SIG trigger: a horizontal sinusoidal signal added to the whole image (a worked plugin example).

Paper: Barni, Kallas, Tondi, "A new Backdoor Attack in CNNs by training set corruption without label
poisoning", ICIP 2019, https://arxiv.org/abs/1902.11237. The sinusoidal signal is
``v(i, j) = delta * sin(2 * pi * j * f / W)`` on column ``j`` of a ``W``-column image, the same on every
row and channel; the paper's setting is ``delta = 20`` grey levels (20/255 here, images in [0, 1]) and
``f = 6`` periods across the image.

Clean label in the paper, dirty label here. Barni et al. add the signal to training images *of the target
class only* and keep their (correct) labels, so no label is wrong and the network learns "signal =>
target" only because the signal co-occurs with that class. pmoe-bench's engine poisons every trigger the
same way (README, Metrics): a ``poison_rate`` fraction of the whole training set, drawn from every class,
triggered and relabelled to ``target`` (dirty label, all-to-one). So results for ``sig`` here measure the
SIG *signal* as a dirty-label trigger: it is easier to learn than the paper's clean-label attack (a much
lower poison rate reaches a high ASR), and the numbers are not comparable to the paper's. The paper also
amplifies the signal at test time in some experiments; here training and test use the same trigger.

Loaded as a plugin: ``plugins: [../plugins/sig.py]`` in a scenario (paths resolve relative to the scenario
file) or ``bench plugins --plugins plugins/sig.py``.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from bench.attacks.base import Trigger
from bench.errors import ComponentParamsError
from bench.registry import register_trigger


@register_trigger("sig")
class SIG(Trigger):
    r"""SIG sinusoidal-signal trigger (Barni et al. 2019, https://arxiv.org/abs/1902.11237).

    ``x' = clip(x + delta * sin(2 * pi * j * f / W), 0, 1)`` for column ``j`` of ``W``, on every row and
    channel. Under ``apply: badpatches`` each patch gets the whole signal (``f`` periods per patch).
    The sine is sampled once per column, so ``f`` must stay below ``W / 2`` to be seen as ``f`` periods;
    where every sample falls on a zero of the sine (e.g. ``f = 6`` on a 4-pixel patch) it raises an error
    instead of silently adding nothing.

    Arguments:
        delta (float): amplitude in [0, 1], the strength; 0 leaves images unchanged. Default: 20/255
            (the paper's 20 grey levels).
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
            raise ComponentParamsError(f"sig.delta: must be in [0, 1] (20/255 is the paper's), got {delta}")
        if not frequency > 0.0:
            raise ComponentParamsError(f"sig.frequency: must be > 0 periods per image, got {frequency}")
        self.delta = delta
        self.frequency = frequency

    def signal(
        self, width: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """``[W]`` values ``delta * sin(2 * pi * j * f / W)``, one per column."""
        cols = torch.arange(width, device=device, dtype=torch.float64)
        return (self.delta * torch.sin(2.0 * math.pi * cols * self.frequency / width)).to(dtype)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        width = images.shape[-1]
        if self.delta > 0 and not self._nonzero(width).any():
            raise ComponentParamsError(
                f"sig.frequency: {self.frequency:g} periods across {width} columns samples the sine only at "
                f"its zeros, so the signal vanishes; use a frequency below {width / 2:g} with 2 * frequency "
                f"/ {width} not a whole number (under apply: badpatches, {width} is the patch width)"
            )
        wave = self.signal(width, images.device, images.dtype)
        return (images + wave).clamp(0.0, 1.0)

    def touched_mask(self, shape: tuple[int, int, int]) -> torch.Tensor:
        """Every column where the signal is not zero (where ``j * f / W`` is a multiple of 1/2, e.g.
        column 0, ``sin`` is 0 and the pixel is untouched)."""
        _, h, w = shape
        return self._nonzero(w).expand(h, w).clone()

    def _nonzero(self, width: int) -> torch.Tensor:
        """``[W]`` bool: columns where the sine is not (numerically) zero."""
        return self.signal(width, dtype=torch.float64).abs() > 1e-12 * max(self.delta, 1e-300)

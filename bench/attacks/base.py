"""The contract every trigger follows (torchattacks' call shape: build with parameters, call on a batch).

A trigger maps images ``[N, C, H, W]`` in [0, 1] to triggered images of the same shape, still in [0, 1],
deterministically (any randomness is fixed by the trigger's own ``seed`` parameter). It must work for any
``H, W``: BadPatches calls it on each patch of its grid (the attack's ``trigger_grid``, else the model's
routing grid) as if the patch were an image. :func:`bench.attacks.checks.trigger_problem` checks at plan
time that a trigger does not turn images or patches into flat colour.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import torch


class Trigger(abc.ABC):
    """Base class. Subclasses set ``strength_param`` and implement :meth:`apply`."""

    #: Name of the constructor parameter that acts as the common "strength" knob (searches tune it).
    strength_param: ClassVar[str] = ""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4:
            raise ValueError(f"a trigger expects images [N, C, H, W], got shape {tuple(images.shape)}")
        return self.apply(images)

    @abc.abstractmethod
    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """The triggered images: same shape as ``images``, values in [0, 1]."""

    def touched_mask(self, shape: tuple[int, int, int]) -> torch.Tensor:
        """``[H, W]`` bool: pixels this trigger can change on an image of ``shape`` (C, H, W).

        Used for the trigger routing rate. The default probes the trigger on two constant images.
        """
        c, h, w = shape
        probe = torch.stack([torch.zeros(c, h, w), torch.ones(c, h, w), torch.full((c, h, w), 0.5)])
        changed = (self(probe) - probe).abs().sum(dim=(0, 1)) > 0
        return changed

"""The contract every trigger follows (torchattacks' call shape: build with parameters, call on a batch).

A trigger maps images ``[N, C, H, W]`` in [0, 1] to triggered images of the same shape, still in [0, 1],
deterministically (any randomness is fixed by the trigger's own ``seed`` parameter). It must work for any
``H, W``: BadPatches calls it on each patch of its grid (the attack's ``trigger_grid``, else the model's
routing grid) as if the patch were an image. :func:`bench.attacks.checks.trigger_problem` checks at plan
time that a trigger does not turn images or patches into flat colour.

A trigger with learned state (``learned = True``, e.g. the input-aware attack's generator) is trained with the
classifier: :meth:`Trigger.joint_training` gives the train job its data and objective instead of a poisoned set,
:meth:`Trigger.state_dict` is stored beside the trained model (the train job's ``trigger`` stage) and
:meth:`Trigger.load_state_dict` restores it wherever the trigger is rebuilt (evaluation, defenses, pictures).
A trigger may declare, from the attack entry alone, why it cannot run as asked
(:meth:`Trigger.attack_not_applicable`): the planner makes those cells n/a.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

#: The name of the stored stage that holds a learned trigger's state (``<train job>.trigger.pt``).
TRIGGER_STAGE = "trigger"


@dataclass
class JointTraining:
    """What a learned trigger gives the train job instead of a poisoned set: the training data, the objective
    (``f(model, x, y) -> loss``, optionally with ``before_batch(indices)`` and ``after_step()``, see
    :func:`bench.train.fit`), a ``finish`` called after training, and metrics for the train job's row."""

    x: torch.Tensor
    y: torch.Tensor
    objective: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    finish: Callable[[], None]
    metrics: dict[str, Any] = field(default_factory=dict)


class Trigger(abc.ABC):
    """Base class. Subclasses set ``strength_param`` and implement :meth:`apply`."""

    #: Name of the constructor parameter that acts as the common "strength" knob (searches tune it).
    strength_param: ClassVar[str] = ""
    #: True for a trigger trained with the classifier (see the module doc): it implements
    #: :meth:`joint_training`, :meth:`state_dict` and :meth:`load_state_dict`.
    learned: ClassVar[bool] = False

    @classmethod
    def attack_not_applicable(cls, attack: dict[str, Any]) -> str | None:
        """Why this trigger cannot run as the resolved ``attack`` entry asks (``apply``, ``mode``, ...): the
        planner plans its cells n/a with this reason. None (the default): it can."""
        return None

    def joint_training(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        target: int | None,
        rate: float,
        seed: int,
        mode: str,
        num_classes: int,
        train_cfg: dict[str, Any],
    ) -> JointTraining:
        """A learned trigger's training of itself with ``model`` on the clean set ``(x, y)``: ``rate`` is the
        poison rate, ``mode`` the poisoning mode, ``train_cfg`` the resolved train settings."""
        raise NotImplementedError(f"{type(self).__name__} is not a learned trigger")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A learned trigger's state (tensors only: stored and loaded with ``weights_only=True``)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned (a trigger without learned state has nothing to restore)."""
        if state:
            raise ValueError(f"{type(self).__name__} has no learned state to restore")

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

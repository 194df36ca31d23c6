"""The in-memory form every data set takes: whole splits as float tensors in [0, 1].

Keeping whole sets as tensors lets training poison them once and run on the device with no per-sample
Python (the performance stance: train where the data already is).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

Augment = Literal["none", "crop", "crop_flip"]


@dataclass
class TensorData:
    """A data set with both splits as tensors.

    train_x / test_x: ``[N, C, H, W]`` float32 in [0, 1]; train_y / test_y: ``[N]`` int64.
    ``augment`` is the train-time augmentation the field uses for this data set (random crop with
    4-pixel padding, plus horizontal flip for natural images; none for digits).
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: Augment = "none"
    classes: list[str] = field(default_factory=list)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train_x.shape[1:]
        return int(c), int(h), int(w)

    def to(self, device: torch.device | str) -> TensorData:
        """The same data with all tensors on ``device``."""
        return TensorData(
            self.name,
            self.train_x.to(device),
            self.train_y.to(device),
            self.test_x.to(device),
            self.test_y.to(device),
            self.num_classes,
            self.mean,
            self.std,
            self.augment,
            list(self.classes),
        )

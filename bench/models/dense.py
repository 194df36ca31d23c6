"""The dense baseline: the same wide ResNet as WRN-pMoE with an ordinary last stage.

Chowdhury et al. 2023 compare pMoE against this network (nowazrabbani/pMoE_CNN, ``wideresnet.py``):
stem and three WRN groups (``16, 32, 64`` times ``width`` channels), BN-ReLU, global average pooling and
a linear classifier. Blocks, initialisation and the deviations from their Keras code are those of
:mod:`bench.models.wrn`. It has no routing, so ``forward_routing`` returns ``None`` for it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bench.errors import ComponentParamsError
from bench.models.base import BenchModel, Normalize, PrunableLayer
from bench.models.wrn import (
    WideTrunk,
    blocks_per_group,
    check_context,
    group_channels,
    init_glorot,
    make_group,
)
from bench.registry import register_model


class DenseWRN(BenchModel):
    """WRN-``depth``-``width`` classifier without experts."""

    def __init__(
        self,
        *,
        input_shape: tuple[int, int, int],
        num_classes: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        depth: int = 10,
        width: int = 10,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        c_in, h_in, w_in = check_context("dense", input_shape, num_classes, mean, std)
        blocks = blocks_per_group(depth)
        _, c2, c3 = group_channels(width)
        if not 0.0 <= dropout < 1.0:
            raise ComponentParamsError(f"dropout: must be in [0, 1), got {dropout}")
        self.input_shape = (c_in, h_in, w_in)
        self.config: dict[str, Any] = {"depth": depth, "width": width, "dropout": dropout}
        self.normalize = Normalize(tuple(mean), tuple(std))
        self.trunk = WideTrunk(c_in, width, blocks, dropout)
        self.group3 = make_group(c2, c3, blocks, stride=2, dropout=dropout)
        self.head_norm = nn.BatchNorm2d(c3)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(c3, num_classes)
        init_glorot(self)

    def forward_routing(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        h = self.group3(self.trunk(self.normalize(x)))
        pooled = self.relu(self.head_norm(h)).mean(dim=(2, 3))
        return self.fc(pooled), None

    def prunable_convs(self) -> list[tuple[str, nn.Conv2d]]:
        """The backbone's last convolution (second conv of the last block)."""
        last = len(self.group3) - 1
        return [(f"group3.{last}.conv2", self.group3[last].conv2)]

    def prunable_layers(self) -> list[PrunableLayer]:
        """The last feature map before pooling (after the final BN-ReLU), Liu et al.'s last conv layer.

        The last convolution's output is added to the residual shortcut, so zeroing its filters alone
        leaves the channel alive; pruning therefore also zeroes ``head_norm``'s weight and bias, which
        makes the channel exactly 0 after the ReLU.
        """
        [(name, conv)] = self.prunable_convs()
        return [PrunableLayer(name, conv, norm=self.head_norm, act=self.relu)]


@register_model("dense")
def dense(
    *,
    input_shape: tuple[int, int, int],
    num_classes: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    depth: int = 10,
    width: int = 10,
    dropout: float = 0.0,
) -> DenseWRN:
    """Dense WRN baseline (the network pMoE replaces the last stage of); defaults WRN-10-10."""
    return DenseWRN(
        input_shape=input_shape, num_classes=num_classes, mean=mean, std=std, depth=depth, width=width,
        dropout=dropout,
    )

"""Wide ResNet building blocks shared by the pMoE and dense models.

Zagoruyko & Komodakis 2016, "Wide Residual Networks" (https://arxiv.org/abs/1605.07146), in the
pre-activation form of the WRN that Chowdhury et al. 2023 ship with their pMoE code
(nowazrabbani/pMoE_CNN, ``wideresnet.py``), which the BadPatches paper used unchanged:

- a 3x3 stem convolution with 16 channels, then groups of ``(depth - 4) / 6`` blocks with
  ``16 * width``, ``32 * width`` and ``64 * width`` channels (strides 1, 2, 2);
- a block is BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3 plus the identity; the *first* block of every group
  projects the identity with a 1x1 convolution even when the channel counts match (their code always
  passes ``channel_mismatch=True`` there; the original WRN projects only on a mismatch);
- every convolution has a bias (Keras' ``Conv2D`` default in their code) and Glorot-uniform weights.

Where we deviate from their Keras code, and why:

- BatchNorm keeps PyTorch's momentum 0.1 (Keras' 0.99 is 0.01 in PyTorch terms): with the short CPU runs
  of the quickstart (about a hundred steps) the slower running averages would not settle;
- ``dropout`` sits between the two convolutions of a block as in the original WRN (their code has none,
  so the default is 0).

:func:`check_context` validates the engine-supplied parameters (input shape, classes, statistics) that
every model shares.
"""

from __future__ import annotations

import torch
from torch import nn

from bench.errors import ComponentParamsError

#: Channels of the stem convolution and the width multipliers of the three groups (WRN).
STEM_CHANNELS = 16
GROUP_CHANNELS = (16, 32, 64)


def blocks_per_group(depth: int) -> int:
    """Blocks in each group of a WRN of ``depth`` (``depth = 6 n + 4``, ``n >= 1``)."""
    if depth < 10 or (depth - 4) % 6:
        raise ComponentParamsError(
            "depth: a wide ResNet has depth 6n+4 with n >= 1 blocks per group (10, 16, 22, 28, ...), "
            f"got {depth}"
        )
    return (depth - 4) // 6


def group_channels(width: int) -> tuple[int, int, int]:
    """Output channels of the three WRN groups for widen factor ``width``."""
    if width < 1:
        raise ComponentParamsError(f"width: the widen factor must be an integer >= 1, got {width}")
    return tuple(c * width for c in GROUP_CHANNELS)  # type: ignore[return-value]


def init_glorot(module: nn.Module) -> None:
    """Keras' defaults, as in the reference code: Glorot-uniform weights, zero biases, BN at (1, 0)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class PreActBlock(nn.Module):
    """One WRN block: BN-ReLU-conv3x3(stride)-BN-ReLU-[dropout]-conv3x3, plus the (projected) identity."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, project: bool, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride=stride) if project else None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.dropout(self.relu(self.bn2(out))))
        identity = x if self.shortcut is None else self.shortcut(x)
        return identity + out


def make_group(in_ch: int, out_ch: int, blocks: int, stride: int, dropout: float = 0.0) -> nn.Sequential:
    """A WRN group: ``blocks`` blocks, the first one strided and projecting its identity."""
    layers = [PreActBlock(in_ch, out_ch, stride, project=True, dropout=dropout)]
    layers += [PreActBlock(out_ch, out_ch, 1, project=False, dropout=dropout) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class WideTrunk(nn.Module):
    """Stem convolution and the first two WRN groups; both models put their own last stage on top.

    Output: ``[N, 32 * width, ceil(H / 2), ceil(W / 2)]``.
    """

    def __init__(self, in_channels: int, width: int, blocks: int, dropout: float = 0.0) -> None:
        super().__init__()
        c1, c2, _ = group_channels(width)
        self.stem = nn.Conv2d(in_channels, STEM_CHANNELS, 3, padding=1)
        self.group1 = make_group(STEM_CHANNELS, c1, blocks, stride=1, dropout=dropout)
        self.group2 = make_group(c1, c2, blocks, stride=2, dropout=dropout)
        self.out_channels = c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group2(self.group1(self.stem(x)))


def downsampled(size: int) -> int:
    """Spatial size after one 3x3 convolution with stride 2 and padding 1 (Keras ``same``: ceil)."""
    return (size + 1) // 2


def check_context(
    model: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> tuple[int, int, int]:
    """Validate the engine-supplied parameters every model takes; return ``input_shape`` as ints."""
    if len(input_shape) != 3 or any(int(s) < 1 for s in input_shape):
        raise ComponentParamsError(
            f"model '{model}': input_shape must be (channels, height, width) of positive sizes, "
            f"got {input_shape!r}"
        )
    c, h, w = (int(s) for s in input_shape)
    if num_classes < 2:
        raise ComponentParamsError(f"model '{model}': num_classes must be >= 2, got {num_classes}")
    for name, values in (("mean", mean), ("std", std)):
        if len(values) != c:
            raise ComponentParamsError(
                f"model '{model}': {name} has {len(values)} values but the input has {c} channel(s)"
            )
    if any(s <= 0 for s in std):
        raise ComponentParamsError(f"model '{model}': std must be positive per channel, got {tuple(std)}")
    return c, h, w

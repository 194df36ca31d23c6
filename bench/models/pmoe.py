"""WRN-pMoE: a wide ResNet whose last stage is a patch-level Mixture-of-Experts layer.

Chowdhury et al. 2023, "Patch-level Routing in Mixture-of-Experts is Provably Sample-efficient for
Convolutional Neural Networks" (https://arxiv.org/abs/2306.04073), built as in their public WRN-pMoE code
(nowazrabbani/pMoE_CNN, ``wideresnet_moe.py`` with ``gater_2.py``), which the BadPatches paper
(geefmegeld/pMoE-backdoor) and the quantized-backdoor paper (linrally/moe-backdoor) used unchanged:

1. ``Normalize`` (inputs in [0, 1]), then the stem and the first two WRN groups (:mod:`bench.models.wrn`).
2. The last group is replaced: BN-ReLU-conv3x3 with stride 2 to ``64 * width`` channels (their fixed
   640 for ``width=10``). Its ``[N, C, H/4, W/4]`` output is the routed feature map; a patch is a block
   of cells of it, so on 32x32 input the 8x8 grid gives 64 patches of 4x4 input pixels each.
3. Router: one kernel ``w_s`` per expert, applied to every patch, ``g_{j,s} = <w_s, x^(j)>`` (a
   convolution with kernel = stride = patch, no bias, N(0, 1e-4) init as in their code). Each expert
   keeps its own top-``k`` patches (expert-choice: a patch may go to several experts or none).
4. Gating values (joint training): their code takes the softmax over *all* ``n`` scores of an expert and
   keeps the values at the top-``k`` positions (``gate_softmax="all"``, the default), while the paper's
   formula normalises over the kept ``k`` scores only (``gate_softmax="kept"``, gates sum to 1; also
   their MNIST ``gater.py``). We follow the code by default; both are offered.
5. Experts: as in their code, each expert sees the feature map multiplied by its gate map (gate value
   on its kept patches, zero elsewhere) and applies BN-ReLU-conv1x1 to ``64 * width / experts``
   channels; the expert outputs are concatenated, then BN-ReLU, global average pooling and a linear
   classifier. This is the paper's two-layer expert (hidden convolution over patches, then a linear
   read-out) with the read-out shared through the classifier. Where paper and code differ we follow the
   code: the gate scales the expert's *input* (paper: its hidden output), and unselected positions enter
   as zeros, so BatchNorm statistics and the average pool count them (their content never does).

Their Keras ``AveragePooling2D((8, 8))`` is a global pool on 32x32 input; we pool globally for any size.
Experts are separate modules (``moe.experts.{e}``) called on the whole batch: a loop over the few
experts, never over samples, so fine-pruning hooks and channel zeroing act on a real ``nn.Conv2d`` each.
The router runs in float32 even under autocast, since top-k is sensitive to rounding of the scores.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Literal

import torch
from torch import nn

from bench.errors import ComponentParamsError
from bench.models.base import BenchModel, Normalize, PrunableLayer, Routing
from bench.models.wrn import (
    WideTrunk,
    blocks_per_group,
    check_context,
    downsampled,
    group_channels,
    init_glorot,
)
from bench.registry import register_model

GateSoftmax = Literal["all", "kept"]

#: Standard deviation of the router kernels at initialisation (their ``initializer_gate``).
ROUTER_INIT_STD = 1e-4


class Expert(nn.Module):
    """One expert: BN-ReLU-conv1x1 on its gated feature map (``conv`` is what fine-pruning prunes)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.relu(self.norm(x)))


class PatchMoE(nn.Module):
    """Patch-level MoE layer: per-expert routers keep top-k patches, experts see the gated patches.

    Input ``[N, C, rows * cell, cols * cell]``; output ``[N, experts * expert_channels, same]`` and the
    routing (indices, gates, scores) of the batch.
    """

    def __init__(
        self,
        channels: int,
        grid: tuple[int, int],
        cell: tuple[int, int],
        experts: int,
        topk: int,
        expert_channels: int,
        gate_softmax: GateSoftmax = "all",
    ) -> None:
        super().__init__()
        self.grid = grid
        self.cell = cell
        self.topk = topk
        self.gate_softmax = gate_softmax
        self.router = nn.Conv2d(channels, experts, kernel_size=cell, stride=cell, bias=False)
        self.experts = nn.ModuleList(Expert(channels, expert_channels) for _ in range(experts))
        self.out_channels = experts * expert_channels

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router scores ``[N, E, n]`` (float32), kept indices and their gates ``[N, E, k]``."""
        with torch.autocast(device_type=h.device.type, enabled=False):
            scores = self.router(h.float())
        scores = scores.reshape(scores.shape[0], scores.shape[1], -1)
        top, indices = scores.topk(self.topk, dim=2)
        if self.gate_softmax == "kept":
            gates = top.softmax(dim=2)
        else:
            gates = scores.softmax(dim=2).gather(2, indices)
        return scores, indices, gates

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        scores, indices, gates = self.route(h)
        n, e, _ = scores.shape
        gate_map = torch.zeros_like(scores).scatter(2, indices, gates).view(n, e, *self.grid)
        if self.cell != (1, 1):
            gate_map = gate_map.repeat_interleave(self.cell[0], 2).repeat_interleave(self.cell[1], 3)
        gate_map = gate_map.to(h.dtype)
        out = torch.cat([expert(h * gate_map[:, i : i + 1]) for i, expert in enumerate(self.experts)], 1)
        return out, indices, gates, scores


class PMoE(BenchModel):
    """WRN-pMoE (see the module docstring). ``forward_routing`` returns logits and the batch's routing."""

    def __init__(
        self,
        *,
        input_shape: tuple[int, int, int],
        num_classes: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        depth: int = 10,
        width: int = 10,
        experts: int = 4,
        topk: int = 16,
        patch_grid: int | None = None,
        expert_channels: int | None = None,
        gate_softmax: GateSoftmax = "all",
        dropout: float = 0.0,
        name: str = "pmoe",
    ) -> None:
        super().__init__()
        c_in, h_in, w_in = check_context(name, input_shape, num_classes, mean, std)
        blocks = blocks_per_group(depth)
        _, _, c3 = group_channels(width)
        grid, cell, patch_px = _geometry(h_in, w_in, patch_grid)
        n_patches = grid[0] * grid[1]
        _check_range("experts", experts, 1, None, "the number of experts")
        _check_range("topk", topk, 1, n_patches, f"patches in the {grid[0]}x{grid[1]} grid")
        if expert_channels is None:
            expert_channels = max(1, c3 // experts)
        _check_range("expert_channels", expert_channels, 1, None, "output channels per expert")
        if not 0.0 <= dropout < 1.0:
            raise ComponentParamsError(f"dropout: must be in [0, 1), got {dropout}")

        self.input_shape = (c_in, h_in, w_in)
        self.patch_grid = grid
        self.patch_px = patch_px
        self.config: dict[str, Any] = {
            "depth": depth,
            "width": width,
            "experts": experts,
            "topk": topk,
            "patch_grid": grid[0],
            "expert_channels": expert_channels,
            "gate_softmax": gate_softmax,
            "dropout": dropout,
        }
        self.normalize = Normalize(tuple(mean), tuple(std))
        self.trunk = WideTrunk(c_in, width, blocks, dropout)
        self.embed = nn.Sequential(
            OrderedDict(
                norm=nn.BatchNorm2d(self.trunk.out_channels),
                relu=nn.ReLU(inplace=True),
                conv=nn.Conv2d(self.trunk.out_channels, c3, 3, stride=2, padding=1),
            )
        )
        self.moe = PatchMoE(c3, grid, cell, experts, topk, expert_channels, gate_softmax)
        self.head_norm = nn.BatchNorm2d(self.moe.out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(self.moe.out_channels, num_classes)
        init_glorot(self)
        nn.init.normal_(self.moe.router.weight, std=ROUTER_INIT_STD)

    def forward_routing(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"PMoE built for inputs {self.input_shape}, got a batch of {tuple(x.shape)}")
        h = self.embed(self.trunk(self.normalize(x)))
        mixed, indices, gates, scores = self.moe(h)
        pooled = self.relu(self.head_norm(mixed)).mean(dim=(2, 3))
        routing = Routing(indices, gates, scores, self.patch_grid, self.patch_px)  # type: ignore[arg-type]
        return self.fc(pooled), routing

    def parameter_groups(self) -> dict[str, list[str]]:
        """``gate``: the router kernels ``w_s`` only; ``experts``: every parameter of the experts."""
        names = [n for n, _ in self.named_parameters()]
        return {
            "gate": [n for n in names if n.startswith("moe.router.")],
            "experts": [n for n in names if n.startswith("moe.experts.")],
        }

    def prunable_convs(self) -> list[tuple[str, nn.Conv2d]]:
        """The 1x1 convolution of every expert (its output channels are what fine-pruning removes)."""
        return [(f"moe.experts.{i}.conv", e.conv) for i, e in enumerate(self.moe.experts)]

    def prunable_layers(self) -> list[PrunableLayer]:
        """One layer per expert: its 1x1 convolution's channels of the last feature map.

        The experts' outputs are concatenated and pass ``head_norm`` and a ReLU before pooling; a zeroed
        filter alone would still emit the BatchNorm's shift there, so pruning also zeroes ``head_norm``'s
        weight and bias at the expert's channels, which makes them exactly 0 after the ReLU.
        """
        width = self.moe.out_channels // len(self.moe.experts)
        return [
            PrunableLayer(name, conv, norm=self.head_norm, act=self.relu, start=i * width)
            for i, (name, conv) in enumerate(self.prunable_convs())
        ]


def _check_range(field: str, value: int, low: int, high: int | None, what: str) -> None:
    if value < low or (high is not None and value > high):
        valid = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ComponentParamsError(f"{field}: must be {valid} ({what}), got {value}")


def _geometry(
    height: int, width: int, patch_grid: int | None
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Patch grid ``(rows, cols)``, patch size in feature cells and in input pixels.

    The routed map is the input downsampled twice by 2 (group 2 and the MoE stage's convolution), so
    one cell covers 4x4 input pixels; ``patch_grid=None`` makes every cell a patch (the paper's 8x8 grid
    on 32x32 input).
    """
    if height % 4 or width % 4:
        raise ComponentParamsError(
            f"input_shape: pmoe needs height and width divisible by 4 (two stride-2 stages before routing), "
            f"got {height}x{width}"
        )
    fh, fw = downsampled(downsampled(height)), downsampled(downsampled(width))
    if patch_grid is None:
        return (fh, fw), (1, 1), (4, 4)
    grid = patch_grid
    if grid < 1 or fh % grid or fw % grid:
        valid = [g for g in range(1, min(fh, fw) + 1) if fh % g == 0 and fw % g == 0]
        raise ComponentParamsError(
            f"patch_grid: must divide the {fh}x{fw} routing feature map of a {height}x{width} input "
            f"(valid: {', '.join(map(str, valid))}), got {grid}"
        )
    return (grid, grid), (fh // grid, fw // grid), (height // grid, width // grid)


@register_model("pmoe")
def pmoe(
    *,
    input_shape: tuple[int, int, int],
    num_classes: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    depth: int = 10,
    width: int = 10,
    experts: int = 4,
    topk: int = 16,
    patch_grid: int | None = None,
    expert_channels: int | None = None,
    gate_softmax: GateSoftmax = "all",
    dropout: float = 0.0,
) -> PMoE:
    """WRN-pMoE (Chowdhury et al. 2023): last WRN stage replaced by a patch-level MoE layer.

    Defaults are their code's: WRN-10-10, 4 experts, top-16 patches each, one patch per cell of the
    routed map (8x8 = 64 patches of 4x4 pixels on 32x32 input). ``patch_grid`` coarsens the grid (it must
    divide the map: H/4 x W/4); ``expert_channels`` defaults to ``64 * width / experts``;
    ``gate_softmax``: ``all`` (their code) or ``kept`` (the paper's formula). A small CPU model is
    ``width: 1``; on 16x16 input the grid is 4x4 (16 patches), so use e.g. ``topk: 4``.
    """
    return PMoE(
        input_shape=input_shape,
        num_classes=num_classes,
        mean=mean,
        std=std,
        depth=depth,
        width=width,
        experts=experts,
        topk=topk,
        patch_grid=patch_grid,
        expert_channels=expert_channels,
        gate_softmax=gate_softmax,
        dropout=dropout,
    )


#: The configuration of the papers (Chowdhury et al. 2023 CIFAR-10; BadPatches; quantized backdoors).
PAPER_CONFIG: dict[str, Any] = {
    "depth": 10,
    "width": 10,
    "experts": 4,
    "topk": 16,
    "patch_grid": 8,
    "expert_channels": 160,
    "gate_softmax": "all",
    "dropout": 0.0,
}


@register_model("pmoe-paper")
def pmoe_paper(
    *,
    input_shape: tuple[int, int, int],
    num_classes: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> PMoE:
    """The papers' WRN-pMoE: WRN-10-10, 4 experts, each keeps the top 16 of 64 patches (8x8 grid, 32x32)."""
    try:
        return PMoE(input_shape=input_shape, num_classes=num_classes, mean=mean, std=std, name="pmoe-paper",
                    **PAPER_CONFIG)
    except ComponentParamsError as exc:
        raise ComponentParamsError(
            f"model 'pmoe-paper' is fixed at {PAPER_CONFIG}; for other inputs use 'pmoe' with its own "
            f"patch_grid and topk. {exc}"
        ) from None

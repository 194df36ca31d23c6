"""Channel pruning of the last convolution of every expert (or of a dense backbone), the first half of
fine-pruning.

Liu, Dolan-Gavitt, Garg, "Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural Networks",
RAID 2018 (https://arxiv.org/abs/1805.12185), Section 4: a backdoor tends to live in neurons that stay
dormant on clean inputs, so the defender runs its clean data through the network and removes the
channels of the last convolutional layer with the lowest mean activation.

The BadPatches paper (Section 3.6) prunes "the last convolutional layer of every expert"; its text
speaks of "parameter values set to 0" by pruning rate, but its code (geefmegeld/pMoE-backdoor,
``Backdoor_attack_Square_trigger.ipynb``, class ``KerasPruning``) does what Liu et al. do, per layer:
the mean of the layer's *output* over clean images and positions, the ``int(rate * channels)`` lowest
output channels get their weights and bias set to zero. We follow that code for
``criterion="activation"`` (the default), including the mean of the raw convolution output and the
rounding down; ``criterion="magnitude"`` ranks output channels by the L1 norm of their filter instead
(Li et al. 2017, "Pruning Filters for Efficient ConvNets"), a data-free variant.

Pruned channels are kept at zero during later fine-tuning by :func:`hold_pruned` (gradient hooks, so an
optimizer never moves them, plus re-zeroing on exit). The BadPatches code fine-tunes without such a
mask (Keras ``fit`` after ``set_weights``), so pruned weights may grow back there; fine-pruning's
``keep_pruned=False`` reproduces that.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from bench.defenses.base import (
    DEFAULT_BUDGET,
    Defense,
    DefenseContext,
    DefenseStage,
    check_budget,
    check_range,
    snapshot,
)
from bench.errors import ComponentParamsError
from bench.models.base import BenchModel
from bench.registry import register_defense

Criterion = Literal["activation", "magnitude"]

#: Fine-pruning's default pruning rate (BadPatches Table 3 reports 10%, 20% and 30%).
DEFAULT_RATE = 0.2


@dataclass
class ChannelMask:
    """Output channels ``pruned`` of the convolution ``conv`` (named ``name`` in the model) are zero."""

    name: str
    conv: nn.Conv2d
    pruned: torch.Tensor  # [P] long, sorted

    def keep(self) -> torch.Tensor:
        """``[C_out]`` float: 1 for kept output channels, 0 for pruned ones."""
        keep = torch.ones(self.conv.out_channels, device=self.conv.weight.device)
        keep[self.pruned.to(keep.device)] = 0.0
        return keep

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the pruned channels' filters and biases."""
        idx = self.pruned.to(self.conv.weight.device)
        self.conv.weight[idx] = 0.0
        if self.conv.bias is not None:
            self.conv.bias[idx] = 0.0


@torch.no_grad()
def channel_scores(
    model: BenchModel, x: torch.Tensor, criterion: Criterion, batch_size: int = 1024
) -> dict[str, torch.Tensor]:
    """Per prunable convolution (``model.prunable_convs()``), a ``[C_out]`` score; lowest goes first.

    ``activation``: mean output of the convolution over the images ``x`` and all positions, in eval
    mode (as the BadPatches code, whose activation model runs with ``training=False``).
    ``magnitude``: L1 norm of each output channel's filter.
    """
    convs = _prunable(model)
    if criterion == "magnitude":
        return {name: conv.weight.detach().abs().flatten(1).sum(1) for name, conv in convs}
    if criterion != "activation":
        raise ComponentParamsError(
            f"pruning.criterion: must be 'activation' or 'magnitude', got {criterion!r}"
        )
    if len(x) == 0:
        raise ComponentParamsError("pruning: the activation criterion needs clean images; budget gave none")
    sums = {n: torch.zeros(c.out_channels, dtype=torch.float64, device=x.device) for n, c in convs}

    def hook(name: str):  # noqa: ANN202 - a forward-hook factory
        def record(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            # per image, the mean over positions; summed over the batch (every image has as many positions)
            sums[name] += output.detach().double().mean(dim=(2, 3)).sum(0)

        return record

    handles = [conv.register_forward_hook(hook(name)) for name, conv in convs]
    was_training = model.training
    model.eval()
    try:
        for begin in range(0, len(x), batch_size):
            model(x[begin : begin + batch_size])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: (s / len(x)).float() for name, s in sums.items()}


def select_channels(model: BenchModel, scores: dict[str, torch.Tensor], rate: float) -> list[ChannelMask]:
    """For every prunable convolution, the ``int(rate * C_out)`` channels with the lowest scores (ties:
    lower channel index first)."""
    masks = []
    for name, conv in _prunable(model):
        n = int(conv.out_channels * rate)
        order = torch.argsort(scores[name], stable=True)
        masks.append(ChannelMask(name, conv, order[:n].sort().values.cpu()))
    return masks


def prune(
    model: BenchModel,
    x: torch.Tensor,
    rate: float,
    criterion: Criterion = "activation",
    batch_size: int = 1024,
) -> list[ChannelMask]:
    """Score, select and zero channels of every prunable convolution; return the masks (for fine-tuning)."""
    masks = select_channels(model, channel_scores(model, x, criterion, batch_size), rate)
    for mask in masks:
        mask.apply()
    return masks


@contextlib.contextmanager
def hold_pruned(masks: Sequence[ChannelMask]) -> Iterator[None]:
    """Keep pruned channels at exactly zero while training inside the block.

    The gradients of pruned weights and biases are masked, so SGD (with momentum and weight decay) and
    Adam leave a zero weight at zero at every step; on exit the masks are applied once more.
    """
    handles = []
    for mask in masks:
        keep = mask.keep()
        handles.append(mask.conv.weight.register_hook(lambda g, k=keep: g * k.view(-1, 1, 1, 1).to(g.dtype)))
        if mask.conv.bias is not None:
            handles.append(mask.conv.bias.register_hook(lambda g, k=keep: g * k.to(g.dtype)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for mask in masks:
            mask.apply()


def prune_stage(model: BenchModel, ctx: DefenseContext, rate: float, criterion: Criterion) -> tuple[
    list[ChannelMask], DefenseStage
]:
    """Prune ``model`` with the defender's clean data; the "pruned" stage and the masks."""
    masks = prune(model, ctx.clean_x, rate, criterion, ctx.eval_batch_size)
    total = sum(m.conv.out_channels for m in masks)
    pruned = sum(len(m.pruned) for m in masks)
    metrics = {
        "criterion": criterion,
        "rate": rate,
        "pruned_channels": pruned,
        "channels": total,
        "pruned_layers": len(masks),
    }
    return masks, DefenseStage("pruned", snapshot(model), metrics)


def check_rate(defense: str, rate: float) -> None:
    check_range(defense, "rate", rate, 0.0, 1.0, high_open=True, what="share of output channels per layer")


@register_defense("pruning")
class Pruning(Defense):
    """Pruning alone (the first step of fine-pruning): zero the lowest-ranked output channels of the
    last convolution of every expert.

    Arguments:
        rate (float): share of output channels pruned in each layer, in [0, 1). Default: 0.2.
        criterion (str): "activation" (mean output on clean data; Liu et al. 2018 and the BadPatches
            code) or "magnitude" (filter L1 norm). Default: "activation".
        budget (float): share of the clean training set the defender holds. Default: 0.05.

    Stages: "pruned" (weights; metrics ``pruned_channels``, ``channels``, ``rate``, ``criterion``).
    """

    stages = ("pruned",)
    name = "pruning"

    def __init__(self, rate: float = DEFAULT_RATE, criterion: Criterion = "activation",
                 budget: float = DEFAULT_BUDGET) -> None:
        check_rate(self.name, rate)
        self.rate = rate
        self.criterion: Criterion = criterion
        self.budget = check_budget(self.name, budget)

    def run(self, model: BenchModel, ctx: DefenseContext) -> list[DefenseStage]:
        _, stage = prune_stage(model, ctx, self.rate, self.criterion)
        return [stage]


def _prunable(model: BenchModel) -> list[tuple[str, nn.Conv2d]]:
    convs = model.prunable_convs()
    if not convs:
        raise ComponentParamsError(
            f"pruning: model {type(model).__name__} declares no prunable convolution "
            "(its prunable_convs() is empty)"
        )
    return convs

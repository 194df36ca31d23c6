"""Channel pruning of the last convolutional layer of every expert (or of a dense backbone), the first
half of fine-pruning.

Liu, Dolan-Gavitt, Garg, "Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural Networks",
RAID 2018 (https://arxiv.org/abs/1805.12185), Section 4: a backdoor tends to live in neurons that stay
dormant on clean inputs, so the defender runs its clean data through the network and removes the
channels of the last convolutional layer with the lowest mean activation, i.e. the mean of each channel
*after the non-linearity*. ``criterion="activation"`` (the default) is that criterion: the mean of each
channel of the model's last feature map (after its final BN-ReLU) over the defender's clean images and
all positions.

The BadPatches paper (Section 3.6) prunes "the last convolutional layer of every expert"; its published
code (geefmegeld/pMoE-backdoor, ``Backdoor_attack_Square_trigger.ipynb``, class ``KerasPruning``) ranks
each expert's 1x1 convolution's output channels by the mean of its *raw* output (before BatchNorm and
ReLU) over the first 10,000 training images (20% of the training set, batch 8), zeroes the weights and
biases of the ``int(rate * channels)`` lowest ones per layer, then fine-tunes 5 epochs (batch 128) on the
full clean training set with the same plain SGD. ``criterion="raw-output"`` is that ranking; fine-pruning's
``rank_budget`` expresses "rank on 20%, fine-tune on 100%". ``criterion="magnitude"`` ranks by the L1 norm
of each channel's filter instead (Li et al. 2017, "Pruning Filters for Efficient ConvNets"), data-free.
Every criterion prunes ``int(rate * channels)`` channels per layer (rounded down, as the BadPatches code).

What is pruned is declared by the model (:meth:`bench.models.base.BenchModel.prunable_layers`). A pruned
channel must be *silent*: zero where the classifier reads it. Zeroing the convolution's filters is not
enough in our WRNs: in the dense model the last convolution is added to a residual shortcut, and in
pMoE the experts' outputs pass a BatchNorm whose shift survives a zero input. So pruning zeroes the
convolution's filters and biases *and* the weight and bias of the BatchNorm in front of the final ReLU at
those channels, which makes them exactly 0 on every input, in train and eval mode. :func:`hold_pruned`
keeps them there during fine-tuning (gradient masks, plus re-zeroing on exit). The BadPatches code
zeroes only the convolution and fine-tunes without a mask, so its pruned channels pass a constant and
may grow back; ``silence=False`` here (fine-pruning's ``keep_pruned=False``) reproduces that.
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
from bench.models.base import BenchModel, PrunableLayer
from bench.registry import register_defense

Criterion = Literal["activation", "raw-output", "magnitude"]
CRITERIA: tuple[str, ...] = ("activation", "raw-output", "magnitude")

#: Fine-pruning's default pruning rate (BadPatches Table 3 reports 10%, 20% and 30%).
DEFAULT_RATE = 0.2


@dataclass
class ChannelMask:
    """Output channels ``pruned`` of the convolution ``conv`` (named ``name`` in the model) are zero.

    With ``norm`` (silenced channels), the BatchNorm's weight and bias at ``start + pruned`` are zero too,
    so the channels are exactly 0 after the ReLU that follows it.
    """

    name: str
    conv: nn.Conv2d | nn.Linear
    pruned: torch.Tensor  # [P] long, sorted
    norm: nn.BatchNorm2d | None = None
    start: int = 0

    def targets(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(parameter, indices along its first dimension)`` for every tensor held at zero."""
        idx = self.pruned.to(self.conv.weight.device)
        out = [(p, idx) for p in (self.conv.weight, self.conv.bias) if p is not None]
        if self.norm is not None:
            out += [(p, idx + self.start) for p in (self.norm.weight, self.norm.bias) if p is not None]
        return out

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the pruned channels' filters and biases (and their BatchNorm weight and bias)."""
        for param, idx in self.targets():
            param[idx] = 0.0


def layer_mask(layer: PrunableLayer, pruned: torch.Tensor, silence: bool = True) -> ChannelMask:
    """The mask of ``pruned`` channels of ``layer``; ``silence=False`` zeroes the convolution only."""
    norm = layer.norm if silence else None
    return ChannelMask(layer.name, layer.conv, pruned, norm, layer.start)


@torch.no_grad()
def channel_scores(
    model: BenchModel, x: torch.Tensor, criterion: Criterion, batch_size: int = 1024
) -> dict[str, torch.Tensor]:
    """Per prunable layer (``model.prunable_layers()``), a ``[channels]`` score; lowest goes first.

    ``activation`` (Liu et al. 2018): mean of each channel of the last feature map after its
    non-linearity (the layer's ``act`` output) over the images ``x`` and all positions, in eval mode.
    ``raw-output`` (the BadPatches code): the same mean of the convolution's raw output, before
    BatchNorm and ReLU. ``magnitude``: L1 norm of each output channel's filter.
    """
    layers = prunable(model)
    if criterion == "magnitude":
        return {lay.name: lay.conv.weight.detach().abs().flatten(1).sum(1) for lay in layers}
    check_criterion("pruning", criterion)
    if len(x) == 0:
        raise ComponentParamsError(f"pruning: the {criterion} criterion needs clean images; budget gave none")
    sums = {lay.name: torch.zeros(lay.channels, dtype=torch.float64, device=x.device) for lay in layers}
    handles = [_watched(lay, criterion).register_forward_hook(_recorder(lay, criterion, sums)) for lay in layers]
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


def _watched(layer: PrunableLayer, criterion: Criterion) -> nn.Module:
    """The module whose output a data criterion averages: the activation or the raw convolution."""
    return layer.act if criterion == "activation" and layer.act is not None else layer.conv


def _recorder(layer: PrunableLayer, criterion: Criterion, sums: dict[str, torch.Tensor]):  # noqa: ANN202
    """A forward hook adding, per image, the mean over positions of the layer's channels to ``sums``."""
    span = layer.span() if criterion == "activation" and layer.act is not None else slice(None)

    def record(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        # every image has as many positions, so the mean of per-image means is the overall mean; a
        # convolution's output is [N, C, H, W], a linear layer's [N, tokens, C] (channels last)
        out = output.detach().double()
        per_image = out[:, span].mean(dim=(2, 3)) if out.dim() == 4 else out[..., span].mean(dim=1)
        sums[layer.name] += per_image.sum(0)

    return record


def select_channels(
    model: BenchModel, scores: dict[str, torch.Tensor], rate: float, silence: bool = True
) -> list[ChannelMask]:
    """For every prunable layer, the ``int(rate * channels)`` channels with the lowest scores (ties:
    lower channel index first)."""
    masks = []
    for layer in prunable(model):
        n = int(layer.channels * rate)
        order = torch.argsort(scores[layer.name], stable=True)
        masks.append(layer_mask(layer, order[:n].sort().values.cpu(), silence))
    return masks


def prune(
    model: BenchModel,
    x: torch.Tensor,
    rate: float,
    criterion: Criterion = "activation",
    batch_size: int = 1024,
    silence: bool = True,
) -> list[ChannelMask]:
    """Score, select and zero channels of every prunable layer; return the masks (for fine-tuning).

    ``silence=False`` zeroes only the convolutions' filters and biases (the BadPatches code), which
    behind a BatchNorm or a residual leaves the channels alive.
    """
    masks = select_channels(model, channel_scores(model, x, criterion, batch_size), rate, silence)
    for mask in masks:
        mask.apply()
    return masks


@contextlib.contextmanager
def hold_pruned(masks: Sequence[ChannelMask]) -> Iterator[None]:
    """Keep pruned channels at exactly zero while training inside the block.

    The gradients of every zeroed parameter entry are masked, so SGD (with momentum and weight decay)
    and Adam leave a zero at zero at every step; on exit the masks are applied once more.
    """
    handles = []
    for mask in masks:
        for param, idx in mask.targets():
            keep = torch.ones(param.shape[0], device=param.device)
            keep[idx] = 0.0
            shape = (-1,) + (1,) * (param.dim() - 1)
            handles.append(param.register_hook(lambda g, k=keep.view(shape): g * k.to(g.dtype)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for mask in masks:
            mask.apply()


def prune_stage(
    model: BenchModel,
    ctx: DefenseContext,
    rate: float,
    criterion: Criterion,
    x: torch.Tensor | None = None,
    silence: bool = True,
) -> tuple[list[ChannelMask], DefenseStage]:
    """Prune ``model``, ranking on ``x`` (default: the defender's clean data); the "pruned" stage and the
    masks."""
    images = ctx.clean_x if x is None else x
    masks = prune(model, images, rate, criterion, ctx.eval_batch_size, silence)
    metrics = {
        "criterion": criterion,
        "rate": rate,
        "pruned_channels": sum(len(m.pruned) for m in masks),
        "channels": sum(int(m.conv.weight.shape[0]) for m in masks),
        "pruned_layers": len(masks),
        "n_rank": 0 if criterion == "magnitude" else int(len(images)),
        "silenced": int(silence),
    }
    return masks, DefenseStage("pruned", snapshot(model), metrics)


def check_rate(defense: str, rate: float) -> None:
    check_range(defense, "rate", rate, 0.0, 1.0, high_open=True, what="share of output channels per layer")


def check_criterion(defense: str, criterion: str) -> None:
    """``criterion`` must be one of :data:`CRITERIA`."""
    if criterion not in CRITERIA:
        raise ComponentParamsError(
            f"{defense}.criterion: must be one of {', '.join(CRITERIA)}, got {criterion!r}"
        )


@register_defense("pruning")
class Pruning(Defense):
    """Pruning alone (the first step of fine-pruning): silence the lowest-ranked output channels of the
    last convolutional layer of every expert (of the backbone for a dense model).

    Arguments:
        rate (float): share of output channels pruned in each layer, in [0, 1). Default: 0.2.
        criterion (str): "activation" (mean activation after the non-linearity on clean data; Liu et
            al. 2018), "raw-output" (mean raw convolution output, before BatchNorm and ReLU; the
            BadPatches paper's published code) or "magnitude" (filter L1 norm). Default: "activation".
        budget (float): share of the clean training set the defender holds. Default: 0.05.

    Stages: "pruned" (weights; metrics ``pruned_channels``, ``channels``, ``rate``, ``criterion``,
    ``n_rank``).
    """

    stages = ("pruned",)
    name = "pruning"

    def __init__(self, rate: float = DEFAULT_RATE, criterion: Criterion = "activation",
                 budget: float = DEFAULT_BUDGET) -> None:
        check_rate(self.name, rate)
        check_criterion(self.name, criterion)
        self.rate = rate
        self.criterion: Criterion = criterion
        self.budget = check_budget(self.name, budget)

    def run(self, model: BenchModel, ctx: DefenseContext) -> list[DefenseStage]:
        _, stage = prune_stage(model, ctx, self.rate, self.criterion)
        return [stage]


def prunable(model: BenchModel) -> list[PrunableLayer]:
    """The model's prunable layers; a model that declares none cannot be pruned."""
    layers = model.prunable_layers()
    if not layers:
        raise ComponentParamsError(
            f"pruning: model {type(model).__name__} declares no prunable layer "
            "(its prunable_layers() and prunable_convs() are empty)"
        )
    return layers

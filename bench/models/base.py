"""The surface every model in pmoe-bench exposes, so defenses and routing analysis can rely on it.

Inputs are images in [0, 1]; normalisation belongs to the model (a :class:`Normalize` first layer), so
triggers and defenses never need to know a data set's statistics.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Routing:
    """Which patches each expert's router kept for a batch.

    indices: ``[N, E, k]`` long, patch positions in row-major order over ``grid``.
    gates:   ``[N, E, k]`` float, the softmax gating value of each kept patch.
    scores:  ``[N, E, n]`` float, every router score (n = grid rows * grid cols), before top-k.
    grid:    ``(rows, cols)`` of the patch grid.
    patch_px: ``(height, width)`` of one patch in *input* pixels, so maps can be drawn over the image.
    valid:   ``[N, E, k]`` bool or None. None (pMoE, expert-choice routing): every slot holds a kept patch.
             Token-choice routing with a capacity (V-MoE) keeps a variable number ``<= k`` of patches per
             expert: ``k`` is then the capacity, the slots are padded (index 0, gate 0) and ``valid`` marks
             the real ones. Read selections through :meth:`selection_mask` / :meth:`kept`, never by
             scattering ``indices`` directly.
    layers:  the routing of every MoE layer of the model, first to last, for a model with several; the
             top-level fields then describe the last one (``layers[-1]``). Empty: one MoE layer, this one.
    """

    indices: torch.Tensor
    gates: torch.Tensor
    scores: torch.Tensor
    grid: tuple[int, int]
    patch_px: tuple[int, int]
    valid: torch.Tensor | None = None
    layers: tuple[Routing, ...] = ()

    @property
    def num_experts(self) -> int:
        return int(self.indices.shape[1])

    def per_layer(self) -> tuple[Routing, ...]:
        """The routing of every MoE layer, first to last (``(self,)`` for a one-layer model)."""
        return self.layers or (self,)

    def selection_mask(self) -> torch.Tensor:
        """``[N, E, rows, cols]`` bool: True where the expert kept that patch."""
        n, e, _ = self.indices.shape
        cells = self.grid[0] * self.grid[1]
        if self.valid is None:
            flat = torch.zeros(n, e, cells, dtype=torch.bool, device=self.indices.device)
            flat.scatter_(2, self.indices, True)
            return flat.view(n, e, *self.grid)
        # padded slots go to an extra column that is dropped (a scatter of duplicates would be racy)
        idx = torch.where(self.valid, self.indices, torch.full_like(self.indices, cells))
        flat = torch.zeros(n, e, cells + 1, dtype=torch.bool, device=self.indices.device)
        flat.scatter_(2, idx, True)
        return flat[:, :, :cells].reshape(n, e, *self.grid)

    def kept(self) -> torch.Tensor:
        """``[N, E]`` long: how many patches each expert kept on each image."""
        if self.valid is None:
            n, e, k = self.indices.shape
            return torch.full((n, e), k, dtype=torch.long, device=self.indices.device)
        return self.valid.sum(dim=2)


@dataclass(frozen=True)
class PrunableLayer:
    """Output channels that channel pruning (fine-pruning) ranks and silences together: one layer.

    name:  label in masks and metrics (for pMoE the expert's convolution, ``moe.experts.0.conv``).
    conv:  the convolution (or ``nn.Linear``: a ViT's MLP hidden layer) whose output channels these are.
           Pruning zeroes its filters and biases at the pruned channels (rows of the weight);
           ``raw-output`` ranks by the mean of its output, ``magnitude`` by its filters. A convolution's
           output is ``[N, C, H, W]``; a linear layer's ``[N, tokens, C]`` (channels last), averaged over
           the tokens.
    norm:  the affine BatchNorm that, followed by a ReLU, turns those channels into the last feature map
           (channels ``start .. start + conv.out_channels`` of it). Pruning also zeroes its weight and bias
           there, so a pruned channel is exactly 0 after the ReLU in train and eval mode alike (and gets no
           gradient through the ReLU): silent, whatever reaches it from a residual or a BatchNorm shift.
           None: the model guarantees that a zero output of ``conv`` is silent by itself.
    act:   the module whose output is the post-activation feature map holding those channels (what the
           classifier pools); the ``activation`` criterion reads it. None: the output of ``conv``.
    start: offset of the layer's channels in ``norm`` and ``act`` (the experts' outputs are concatenated).
    """

    name: str
    conv: nn.Conv2d | nn.Linear
    norm: nn.BatchNorm2d | None = None
    act: nn.Module | None = None
    start: int = 0

    @property
    def channels(self) -> int:
        """Number of prunable output channels (those of ``conv``: its weight's first dimension)."""
        return int(self.conv.weight.shape[0])

    def span(self) -> slice:
        """The layer's channels in the output of ``norm`` and ``act``."""
        return slice(self.start, self.start + self.channels)


class Normalize(nn.Module):
    """Per-channel standardisation as the model's first layer."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class BenchModel(nn.Module, abc.ABC):
    """Base class of every model. Subclasses implement :meth:`forward_routing`.

    Parameter groups name the parameters that quantization scopes and defenses act on:
    ``"gate"`` (router kernels), ``"experts"`` (expert parameters). Dense models have neither.
    """

    #: ``(rows, cols)`` patch grid and patch size in input pixels, or None for a model without routing.
    patch_grid: tuple[int, int] | None = None
    patch_px: tuple[int, int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_routing(x)[0]

    @abc.abstractmethod
    def forward_routing(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing | None]:
        """Logits ``[N, classes]`` and the routing of this batch (None for models without routing)."""

    def auxiliary_loss(self) -> torch.Tensor | None:
        """The model's own training loss term of its forwards since the last call, already weighted by
        the model's coefficient (e.g. an MoE load-balancing loss), or None. The training loop
        (:func:`bench.train.fit`) adds it to every objective's loss; calling it clears the record."""
        return None

    def parameter_groups(self) -> dict[str, list[str]]:
        """Qualified parameter names per group: ``{"gate": [...], "experts": [...]}``."""
        return {"gate": [], "experts": []}

    def prunable_convs(self) -> list[tuple[str, nn.Conv2d]]:
        """The last convolution of every expert (or of the backbone for dense models), named.

        The short form of :meth:`prunable_layers` for a model in which a zeroed output channel of each
        convolution is silent by itself (no BatchNorm or residual between it and the classifier).
        """
        return []

    def prunable_layers(self) -> list[PrunableLayer]:
        """The layers whose output channels fine-pruning ranks and silences (one per expert for pMoE).

        Default: one :class:`PrunableLayer` per :meth:`prunable_convs` entry, silenced at the convolution
        itself. Override it when a BatchNorm (or a residual) sits between the convolution and the
        classifier, so that pruned channels stay exactly zero where the classifier reads them.
        """
        return [PrunableLayer(name, conv) for name, conv in self.prunable_convs()]

"""The B-bit grid of one weight tensor and learned (non-nearest) rounding onto it, for EFRAP.

The grid is the one :func:`bench.quant.fake_quantize` uses (Eq. 2, min-max, per tensor or per output
channel, asymmetric or narrow-range symmetric), so a tensor written here with :meth:`Grid.values` is
re-quantized to itself by the benchmark's PTQ: its level indices come back unchanged, and the min-max
range does too because the elements that define it (the min and max, or the largest magnitude when
symmetric) are *pinned* to nearest rounding, which puts them exactly on the range's ends. Every other
element may take the level below or above its value (``floor + {0, 1}``), never leaving
``[low, high]``.

The soft rounding is AdaRound's relaxation (Nagel et al., "Up or Down? Adaptive Rounding for
Post-Training Quantization", ICML 2020, https://arxiv.org/abs/2004.10568) with EFRAP's code's plain
sigmoid (its ``zeta, gamma = 1, 0``): ``h(V) = sigmoid(V)``, ``V`` started so that ``h(V)`` equals the
fractional part, i.e. the soft weight starts at the fp32 weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: Keeps the initial h(V) = fractional part strictly inside (0, 1) (a fraction of 0 has logit -inf).
REST_EPS = 1e-4


@dataclass
class Grid:
    """The grid of one tensor ``w``: ``value = level * scale + offset``, levels in ``[low, high]``.

    t: ``w`` in level units (``(w - offset) / scale``); pinned: elements that keep nearest rounding
    (they define the range); live: groups whose range is not degenerate (others stay as they are).
    """

    w: Tensor
    scale: Tensor
    offset: Tensor
    low: int
    high: int
    t: Tensor
    pinned: Tensor
    live: Tensor

    @property
    def floor(self) -> Tensor:
        return torch.floor(self.t)

    @property
    def rest(self) -> Tensor:
        """Fractional part of ``t`` in [0, 1)."""
        return self.t - self.floor

    @property
    def nearest_up(self) -> Tensor:
        """1 where nearest rounding (``torch.round``, as the PTQ) goes up from the floor, else 0."""
        return torch.round(self.t) - self.floor

    def levels(self, up: Tensor) -> Tensor:
        """Level indices for a rounding choice ``up`` (soft in [0, 1] or hard 0/1); pinned stay nearest."""
        chosen = torch.where(self.pinned, torch.round(self.t), self.floor + up)
        return chosen.clamp(self.low, self.high)

    def values(self, up: Tensor) -> Tensor:
        """The weight for rounding choice ``up``; degenerate groups keep ``w`` as the PTQ does."""
        q = self.levels(up) * self.scale + self.offset
        return torch.where(self.live, q, self.w)

    def nearest(self) -> Tensor:
        """Round-to-nearest: what the benchmark's PTQ gives for ``w``."""
        return self.values(self.nearest_up)

    def init_logits(self) -> Tensor:
        """``V`` with ``sigmoid(V)`` = the fractional part: the soft weight starts at ``w`` itself."""
        rest = self.rest.clamp(REST_EPS, 1 - REST_EPS)
        return torch.log(rest / (1 - rest))


def grid_of(w: Tensor, bits: int, granularity: str, symmetric: bool) -> Grid:
    """The grid :func:`bench.quant.fake_quantize` puts ``w`` on (same ranges, scale and clamp), in float32."""
    work = w.detach().float()
    per_channel = granularity == "channel" and work.dim() >= 2
    if per_channel:
        rows = work.reshape(work.shape[0], -1)
        shape = (work.shape[0],) + (1,) * (work.dim() - 1)
        zmin, zmax = rows.amin(dim=1).view(shape), rows.amax(dim=1).view(shape)
    else:
        zmin, zmax = work.amin(), work.amax()
    if symmetric:
        top = 2 ** (bits - 1) - 1
        amax = torch.maximum(zmax.abs(), zmin.abs())
        scale = amax / top
        offset = torch.zeros_like(scale)
        low, high = -top, top
        pinned = work.abs() == amax
    else:
        top = 2**bits - 1
        scale = (zmax - zmin) / top
        offset = zmin
        low, high = 0, top
        pinned = (work == zmin) | (work == zmax)
    live = scale > 0
    safe = torch.where(live, scale, torch.ones_like(scale))
    t = (work - offset) / safe
    return Grid(work, safe, offset, low, high, t, pinned, live.expand_as(work))


def level_indices(w: Tensor, bits: int, granularity: str, symmetric: bool) -> Tensor:
    """The level index of every element of ``w`` under nearest rounding on its own grid (for checks)."""
    return torch.round(grid_of(w, bits, granularity, symmetric).t)

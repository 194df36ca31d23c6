"""Fake quantization, Eq. 2 of the quantized-backdoor paper (Lin & Hu, 2025, section 4.2.1).

    Q_B(z) = clip(round((z - z_min) / s_B), 0, 2^B - 1) * s_B + z_min,   s_B = (z_max - z_min) / (2^B - 1)

with the range taken from the tensor itself (min-max), one range per tensor: the paper's default.

Variants, because deploy tool-chains use them:

- ``granularity="channel"``: one range per output channel (dim 0, the PyTorch weight layout of conv and
  linear kernels and of an ``[experts, d]`` router kernel). Tensors with fewer than two dimensions have no
  channel axis to speak of and are quantized per tensor.
- ``symmetric=True``: ``s = max|z| / (2^(B-1) - 1)``, integer levels in ``[-(2^(B-1) - 1), 2^(B-1) - 1]``,
  so zero is exact and the grid is symmetric. This is the *narrow range* convention of TensorRT and of
  TensorFlow's ``fake_quant(..., narrow_range=True)`` weight quantization (2^B - 1 levels, -2^(B-1) unused),
  not PyTorch's default ``[-2^(B-1), 2^(B-1) - 1]`` with ``s = max|z| / ((2^B - 1) / 2)``.

Rounding is ``torch.round`` (half to even), as ``nearbyint`` in PyTorch's own fake-quant kernels.

Gradients: straight-through estimator. The forward returns Q_B(z); the backward passes the upstream
gradient to z unchanged, everywhere. The range (z_min, z_max) is treated as a constant, as in every STE
fake-quant. PyTorch's ``fake_quantize_*`` zero the gradient of values outside the clip range; with a
min-max range computed from z itself no value is outside, so the two agree and we do not clip.

A degenerate tensor or channel (z_max == z_min; all-zero for symmetric) is returned unchanged. No Python
branch depends on tensor values, so there is no device synchronisation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bench.quant.config import Granularity, QuantError, normalize_bits

GRANULARITIES: tuple[str, ...] = ("tensor", "channel")


def _ranges(z: Tensor, per_channel: bool) -> tuple[Tensor, Tensor]:
    """(min, max) over the whole tensor, or per row of dim 0 shaped to broadcast against ``z``."""
    if not per_channel:
        return z.amin(), z.amax()
    rows = z.reshape(z.shape[0], -1)
    shape = (z.shape[0],) + (1,) * (z.dim() - 1)
    return rows.amin(dim=1).view(shape), rows.amax(dim=1).view(shape)


def _quantize(z: Tensor, bits: int, per_channel: bool, symmetric: bool) -> Tensor:
    work = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    zmin, zmax = _ranges(work, per_channel)
    if symmetric:
        top = 2 ** (bits - 1) - 1
        scale = torch.maximum(zmax.abs(), zmin.abs()) / top
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.clamp(torch.round(work / safe), -top, top) * safe
    else:
        top = 2**bits - 1
        scale = (zmax - zmin) / top
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.clamp(torch.round((work - zmin) / safe), 0, top) * safe + zmin
    return torch.where(scale > 0, q, work).to(z.dtype)


class _StraightThrough(torch.autograd.Function):
    """Forward: Q_B(z). Backward: identity."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, bits: int, per_channel: bool, symmetric: bool) -> Tensor:
        return _quantize(z, bits, per_channel, symmetric)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        return grad, None, None, None


def check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise QuantError(f"granularity: must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")


def fake_quantize(
    z: Tensor, bits: int | None, granularity: Granularity | str = "tensor", symmetric: bool = False
) -> Tensor:
    """Q_B(z) of Eq. 2 with a straight-through gradient; ``bits`` None or 32 returns ``z`` itself (fp32).

    ``bits`` must be in 2..16. The result has ``z``'s shape, dtype and device; half-precision inputs are
    quantized in float32 and cast back.
    """
    b = normalize_bits(bits)
    check_granularity(granularity)
    if b is None:
        return z
    if not z.is_floating_point():
        raise TypeError(f"fake_quantize needs a floating-point tensor, got {z.dtype}")
    per_channel = granularity == "channel" and z.dim() >= 2
    return _StraightThrough.apply(z, b, per_channel, symmetric)


def quantization_levels(bits: int, symmetric: bool = False) -> int:
    """How many distinct values one range can take: 2^B, or 2^B - 1 for narrow-range symmetric."""
    b = normalize_bits(bits)
    if b is None:
        raise QuantError("bits: fp32 has no finite set of levels; give an integer bit-width")
    return 2**b - 1 if symmetric else 2**b

"""Differentiable stand-ins for the weight quantizers of integer back-ends, exact to the bit.

A quantization-conditioned backdoor (:mod:`bench.attacks.qcb`) wakes only under the quantizer it was trained
against. To target a deploy tool-chain rather than Eq. 2, training needs that tool-chain's own quantizer as
a fake quantizer: same layers, same scale, same rounding and clamp, with a straight-through gradient.

``torchao``: ``torchao.quantization.quantize_(m, Int8WeightOnlyConfig())`` (torchao 0.18, version 2,
``granularity=PerRow()``) replaces the weight of every ``nn.Linear`` (``_is_linear``: not a
``NonDynamicallyQuantizableLinear``) by an ``Int8Tensor`` built by ``choose_qparams_affine`` and
``quantize_affine`` with ``MappingType.SYMMETRIC``, per output row::

    amax  = max(-min(min(w_row), 0), max(max(w_row), 0))
    scale = clamp(amax / ((127 - (-128)) / 2), min=float32 eps)       # amax / 127.5
    q     = clamp(round(w * (1.0 / scale)) + 0, -128, 127)            # round half to even

so the largest positive weight of a row lands on 127.5 and is clamped to 127, the most negative one on
-128; the linear computes ``(x @ q.T) * scale + bias`` in the input dtype. Conv2d, biases and
normalisation parameters stay fp32. :func:`torchao_int8` reproduces ``q`` and ``scale`` bit for bit
(``tests/test_standin.py`` checks it against ``quantize_``); the stand-in weight is ``q * scale``.

``fake``: Eq. 2 of :mod:`bench.quant.fake` at a :class:`QuantConfig` (what ``attach_qat`` attaches), here so
that both kinds share :class:`StandIn`'s ``frozen`` switch.

:class:`StandIn` is a parametrization with the ``bits`` / ``enabled`` switches of
:class:`bench.quant.apply.FakeQuantize`, so :func:`attach_standin` returns an ordinary
:class:`bench.quant.apply.QATHandle`. ``frozen`` detaches the quantized weight: a forward then uses the
integer model as a constant (used while the quantized weights are pinned to their rounding cells, where a
straight-through gradient would only push the fp32 weights against the cells).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from bench.quant.apply import QATHandle
from bench.quant.config import QuantConfig, QuantError, normalize_bits
from bench.quant.fake import fake_quantize
from bench.quant.scopes import scope_parameters

Backend = Literal["fake", "torchao"]
BACKENDS: tuple[str, ...] = ("fake", "torchao")
#: The bit-widths each back-end's weight quantizer has (None: any of 2..16, the fake quantizer).
BACKEND_BITS: dict[str, int | None] = {"fake": None, "torchao": 8}

_INT8_MIN, _INT8_MAX = -128, 127
_F32_EPS = torch.finfo(torch.float32).eps


def torchao_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """``(q, scale)`` of torchao 0.18's int8 weight-only per-row quantization of a ``[out, in]`` weight:
    ``q`` float (integer values in -128..127) shaped like ``w``, ``scale`` float32 ``[out, 1]``."""
    rows = w.detach().float().reshape(w.shape[0], -1)
    low = torch.minimum(rows.amin(dim=1, keepdim=True), torch.zeros(()))
    high = torch.maximum(rows.amax(dim=1, keepdim=True), torch.zeros(()))
    scale = torch.clamp(torch.maximum(-low, high) / (float(_INT8_MAX - _INT8_MIN) / 2), min=_F32_EPS)
    q = torch.clamp(torch.round(rows * (1.0 / scale)), _INT8_MIN, _INT8_MAX)
    return q.reshape(w.shape), scale


def torchao_int8_cells(w: Tensor, margin: float = 0.05) -> tuple[Tensor, Tensor]:
    """Bounds ``(lo, hi)`` shaped like ``w`` inside which :func:`torchao_int8` gives the same ``q`` and
    ``scale``: the element(s) of largest magnitude of each row are pinned (they set the scale), every other
    element may move within its rounding cell, ``margin`` of a step away from the edges."""
    q, scale = torchao_int8(w)
    rows = w.detach().float().reshape(w.shape[0], -1)
    q = q.reshape(rows.shape)
    amax = rows.abs().amax(dim=1, keepdim=True)
    lo = torch.maximum((q - 0.5 + margin) * scale, -amax)
    hi = torch.minimum((q + 0.5 - margin) * scale, amax)
    fixed = (rows.abs() == amax) | (amax == 0)
    lo, hi = torch.where(fixed, rows, lo), torch.where(fixed, rows, hi)
    return lo.reshape(w.shape).to(w.dtype), hi.reshape(w.shape).to(w.dtype)


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantized value given. Backward: identity to the fp32 weight."""

    @staticmethod
    def forward(ctx: object, w: Tensor, wq: Tensor) -> Tensor:
        return wq

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def torchao_int8_weight(w: Tensor) -> Tensor:
    """The dequantized torchao int8 weight ``q * scale`` with a straight-through gradient."""
    q, scale = torchao_int8(w)
    return _StraightThrough.apply(w, (q * scale.reshape((w.shape[0],) + (1,) * (w.dim() - 1))).to(w.dtype))


class StandIn(nn.Module):
    """Parametrization ``w -> Q(w)`` with a back-end's quantizer; ``bits`` None (or ``enabled`` False) is fp32,
    any other value must be the back-end's bit-width; ``frozen`` detaches the result."""

    def __init__(self, backend: Backend, config: QuantConfig) -> None:
        super().__init__()
        self.backend = backend
        self.config = config
        self.bits = config.bits
        self.enabled = True
        self.frozen = False

    def forward(self, w: Tensor) -> Tensor:
        if not self.enabled or self.bits is None:
            return w
        if self.backend == "torchao":
            if self.bits != 8:
                raise QuantError(f"the torchao stand-in quantizes at 8 bits only, asked for {self.bits}")
            out = torchao_int8_weight(w)
        else:
            out = fake_quantize(w, self.bits, self.config.granularity, self.config.symmetric)
        return out.detach() if self.frozen else out

    def extra_repr(self) -> str:
        return f"backend={self.backend}, bits={self.bits}, enabled={self.enabled}, frozen={self.frozen}"


def backend_scope(model: nn.Module, backend: Backend, config: QuantConfig) -> list[str]:
    """Names of the weights ``backend`` quantizes: every ``nn.Linear`` weight for torchao (as its default
    filter), the config's scope for the fake quantizer."""
    if backend == "fake":
        return scope_parameters(model, config.scope)
    names = []
    for mname, module in model.named_modules():
        if isinstance(module, nn.Linear) and not isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
            if parametrize.is_parametrized(module, "weight"):
                raise QuantError(f"module '{mname}' is parametrized already (QAT attached?)")
            names.append(f"{mname}.weight" if mname else "weight")
    if not names:
        raise QuantError(f"the torchao back-end quantizes nn.Linear weights only; {type(model).__name__} has none")
    return names


def check_backend_bits(backend: str, bits: int | None) -> None:
    """Refuse a bit-width the back-end cannot quantize at (fp32 is always allowed)."""
    wanted = BACKEND_BITS.get(backend)
    bits = normalize_bits(bits)
    if backend not in BACKENDS:
        raise QuantError(f"backend: must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if bits is not None and wanted is not None and bits != wanted:
        raise QuantError(f"the {backend} back-end quantizes weights at {wanted} bits only, got {bits}")


Cells = Callable[[Tensor], tuple[Tensor, Tensor]]


def standin_cells(backend: Backend, config: QuantConfig, margin: float = 0.05) -> Cells:
    """The rounding-cell function of ``backend`` at ``config``: ``cells(w) -> (lo, hi)``."""
    if backend == "torchao":
        return lambda w: torchao_int8_cells(w, margin)
    from bench.attacks.qcb import rounding_cells  # the fake quantizer's cells live with the attack

    if config.bits is None:
        raise QuantError("rounding cells need a quantized bit-width")
    return lambda w: rounding_cells(w, config.bits, config.granularity, config.symmetric, margin)


def attach_standin(model: nn.Module, backend: Backend, config: QuantConfig) -> QATHandle:
    """Parametrize every weight ``backend`` quantizes with a :class:`StandIn` at ``config.bits``; the
    returned handle switches them per forward (``at_bits``, ``fp32``) and removes them like ``attach_qat``."""
    check_backend_bits(backend, config.bits)
    names = backend_scope(model, backend, config)
    quantizers: list[StandIn] = []
    done: list[str] = []
    orders: dict[int, list[str]] = {}
    try:
        for name in names:
            prefix, _, leaf = name.rpartition(".")
            module = model.get_submodule(prefix)
            orders.setdefault(id(module), list(module._parameters))
            quantizer = StandIn(backend, config)
            parametrize.register_parametrization(module, leaf, quantizer)
            quantizers.append(quantizer)
            done.append(name)
    except BaseException:
        QATHandle(model, config, done, quantizers, [], [], orders).remove()  # type: ignore[arg-type]
        raise
    return QATHandle(model, config, names, quantizers, [], [], orders)  # type: ignore[arg-type]


def set_frozen(handle: QATHandle, frozen: bool) -> None:
    """Switch ``frozen`` on every :class:`StandIn` of ``handle`` (others have no such switch)."""
    for quantizer in handle._quantizers:
        if isinstance(quantizer, StandIn):
            quantizer.frozen = frozen

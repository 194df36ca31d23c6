"""Quantization: Eq. 2 fake quantization, scopes (gate / experts / whole), PTQ and QAT.

Public names are re-exported here; the modules behind them are :mod:`bench.quant.fake` (the operator),
:mod:`bench.quant.config` (:class:`QuantConfig`), :mod:`bench.quant.scopes` (which weights) and
:mod:`bench.quant.apply` (PTQ, QAT, a quantized forward). Real integer back-ends (torch-x86, onnxruntime,
torchao), chosen by ``QuantConfig.backend``, live in :mod:`bench.quant.backends`.
"""

from __future__ import annotations

from bench.quant.apply import (
    ActivationQuantizer,
    FakeQuantize,
    QATHandle,
    attach_qat,
    fake_quantized_forward,
    qat,
    quantize_copy,
    quantized,
)
from bench.quant.config import FP32_BITS, MAX_BITS, MIN_BITS, QuantConfig, QuantError, normalize_bits
from bench.quant.fake import GRANULARITIES, fake_quantize, quantization_levels
from bench.quant.scopes import SCOPES, is_weight, scope_parameters

__all__ = [
    "FP32_BITS",
    "GRANULARITIES",
    "MAX_BITS",
    "MIN_BITS",
    "SCOPES",
    "ActivationQuantizer",
    "FakeQuantize",
    "QATHandle",
    "QuantConfig",
    "QuantError",
    "attach_qat",
    "fake_quantize",
    "fake_quantized_forward",
    "is_weight",
    "normalize_bits",
    "qat",
    "quantization_levels",
    "quantize_copy",
    "quantized",
    "scope_parameters",
]

"""Real integer back-ends for PTQ (torch-x86, onnxruntime, torchao) next to fake quantization.

:mod:`bench.quant.backends.base` holds the declarations and the registry (no optional imports); one module
per back-end builds its runner: :mod:`~bench.quant.backends.torch_x86`,
:mod:`~bench.quant.backends.onnx_runtime`, :mod:`~bench.quant.backends.torchao_weights`.
"""

from __future__ import annotations

from bench.quant.backends.base import (
    BACKEND_NAMES,
    BACKENDS,
    INSTALL_HINT,
    Backend,
    QuantizedRunner,
    RunnerModule,
    calibration_images,
    canonical_fields,
    missing_packages,
    not_applicable,
    prepare,
    scope_modules,
)

__all__ = [
    "BACKENDS",
    "BACKEND_NAMES",
    "INSTALL_HINT",
    "Backend",
    "QuantizedRunner",
    "RunnerModule",
    "calibration_images",
    "canonical_fields",
    "missing_packages",
    "not_applicable",
    "prepare",
    "scope_modules",
]

"""``torchao``: weight-only int8 with ``torchao.quantization.quantize_(model, Int8WeightOnlyConfig())``.

What is quantized: torchao's default filter takes **nn.Linear modules only**, so on pMoE (router and experts
are Conv2d) only the classifier head ``fc`` is quantized, on the dense model its ``fc`` too; the router
(gate), the experts and every convolution stay fp32, hence only scope ``whole`` applies. The weight becomes
an ``Int8Tensor``: int8 values, symmetric, per output row (``granularity: channel``, ``PerRow()``) or one
scale for the tensor (``tensor``, ``PerTensor()``), range -128..127 with scale = max|w| / 127.5 (clamped to
fp32 eps) and q = clamp(round(w * (1 / scale)), -128, 127). Activations stay fp32: on the CPU the linear is
``(x @ q.float().T) * scale + bias`` (int8 storage, fp32 arithmetic; no integer kernel). int4 weight-only
does not run on this CPU with torchao 0.18 (its int4 layouts need CUDA or the ``mslk`` package): n/a.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from bench.quant.config import QuantConfig


class TorchaoRunner:
    """The torchao-quantized copy of the model (its ``fc.weight`` is an int8 ``Int8Tensor``)."""

    def __init__(self, model: nn.Module, seconds: float) -> None:
        self.model = model
        self.prepare_seconds = seconds

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.float()).float()


def prepare(model: nn.Module, config: QuantConfig, calib_x: torch.Tensor) -> TorchaoRunner:
    """Quantize the nn.Linear weights of a copy of ``model``; ``calib_x`` is unused (weight-only, no
    calibration)."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerRow, PerTensor

    start = time.perf_counter()
    clone = copy.deepcopy(model).eval()
    granularity = PerRow() if config.granularity == "channel" else PerTensor()
    quantize_(clone, Int8WeightOnlyConfig(granularity=granularity, set_inductor_config=False))
    return TorchaoRunner(clone, time.perf_counter() - start)

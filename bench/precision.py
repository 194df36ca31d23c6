"""``precision: auto`` and ``channels_last: auto``: the fast settings this hardware computes natively.

- ``precision: auto`` trains with bf16 autocast where the hardware has bf16 arithmetic (a CUDA device
  that supports it; a CPU with AVX512-BF16 or AMX), fp32 elsewhere: on a CPU without bf16 instructions
  autocast is emulated and several times *slower* than fp32. Training that is quantization-aware (QAT,
  or an attack whose objective trains against a quantizer, such as ``qcb``) stays fp32: bf16 would
  re-round the quantizer's integer grid inside every matmul, so the model would learn a different
  quantizer than the one it is evaluated with. The resolved precision is part of the job's identity (it
  changes the numbers), resolved where the run is planned: pin ``fp32`` or ``bf16`` to share one store
  between machines of different kinds.
- ``channels_last: auto`` is on for CPUs and CUDA (the convolutions' fast memory format on both; on the
  2-core AMX CPU of the README it made pmoe-paper training 1.2x (fp32) and 1.4x (bf16) faster). It does
  not change what is computed, only how fast: it is a speed-only setting, kept out of job identity
  (:data:`bench.plan.SPEED_ONLY_TRAIN_KEYS`) like ``compile``.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import torch

#: The CPU flags (``/proc/cpuinfo``) that mean native bf16 arithmetic.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16), as PyTorch's own checks say;
    from ``/proc/cpuinfo``'s flags where this PyTorch lacks them."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(callable(check) for check in checks):
        return any(bool(check()) for check in checks)  # type: ignore[misc]
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    return bool(flags & BF16_CPU_FLAGS)


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively. A CUDA device that this process cannot see (the head of a
    Ray cluster without GPUs planning for its GPU workers) counts as bf16-capable, as every GPU since
    Ampere is; pin ``precision: fp32`` for older GPUs."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return True
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return cpu_has_bf16()
    return False


def resolve_precision(requested: str, device: torch.device, quantization_aware: bool = False) -> str:
    """``fp32`` or ``bf16`` for a training that asked for ``requested`` (``auto``, ``fp32``, ``bf16``)."""
    if requested != "auto":
        return requested
    if quantization_aware:
        return "fp32"
    return "bf16" if bf16_native(device) else "fp32"


def resolve_channels_last(requested: bool | str, device: torch.device) -> bool:
    """Whether a training that asked for ``requested`` (``auto``, true, false) uses channels_last."""
    if requested == "auto":
        return device.type in ("cpu", "cuda")
    return bool(requested)


def quantization_aware(train: dict[str, Any], attack: dict[str, Any] | None) -> bool:
    """Whether a training trains against a quantizer: QAT (``qat_bits``) or an attack objective (qcb)."""
    return bool(train.get("qat_bits")) or bool(attack and attack.get("objective"))


def hardware_key(device: torch.device) -> str:
    """What the ``auto`` settings depend on: the device type and whether it computes bf16 natively."""
    return f"{device.type}:{'bf16' if bf16_native(device) else 'fp32'}"

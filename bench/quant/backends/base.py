"""Integer back-ends: what each one can do (declared as data, importable without its packages) and a
registry that turns ``(model, QuantConfig, calibration images)`` into a :class:`QuantizedRunner`.

``fake`` is the Eq. 2 fake quantization of :mod:`bench.quant.apply` and has no runner here. The real
back-ends (``torch-x86``, ``onnxruntime``, ``torchao``) run integer kernels on the CPU; each has settings it
cannot change, so a :class:`bench.quant.QuantConfig` naming one is canonicalised to its :attr:`Backend.fixed`
settings (the label names what runs), and asks it cannot honour (bits, scopes) are not applicable
(:func:`not_applicable`), planned ``n/a`` with the one-line reason.

Nothing here imports torch's export stack, onnxruntime or torchao: :func:`missing_packages` checks that
they are installed (via ``importlib.util.find_spec``), :func:`prepare` imports the back-end's module.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from bench.quant.config import QuantConfig

#: What to run to get the packages of the real back-ends.
INSTALL_HINT = 'pip install -e ".[deploy]" (from a checkout) or pip install "pmoe-bench[deploy]"'


class QuantizedRunner(Protocol):
    """A prepared back-end: an input batch (fp32, [N, C, H, W], in [0, 1]) -> fp32 logits on its device."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class Backend:
    """One integer back-end, as declarations.

    packages: import names it needs (the ``deploy`` extra).
    fixed:    QuantConfig fields it always runs with, whatever the config asks.
    bits:     bit-widths it runs (others: n/a, with ``bits_reason``).
    scopes:   quantization scopes it can restrict itself to (others: n/a, with ``scope_reason``).
    module:   the module whose ``prepare(model, config, calib_x)`` builds its runner.
    """

    name: str
    packages: tuple[str, ...]
    fixed: dict[str, Any]
    bits: tuple[int, ...]
    bits_reason: str
    module: str
    scopes: tuple[str, ...] = ("gate", "experts", "whole")
    scope_reason: str = ""
    notes: dict[str, str] = field(default_factory=dict)


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend(
            "torch-x86", ("torchao",), {"granularity": "channel", "symmetric": True, "activations": True}, (8,),
            "torch-x86 (X86InductorQuantizer) runs int8 oneDNN kernels only", "bench.quant.backends.torch_x86",
        ),
        Backend(
            "onnxruntime", ("onnxruntime", "onnx", "onnxscript"), {"activations": True}, (8,),
            "onnxruntime QDQ quantization is run with int8 weights and uint8 activations only",
            "bench.quant.backends.onnx_runtime",
        ),
        Backend(
            "torchao", ("torchao",), {"symmetric": True, "activations": False}, (8,),
            "torchao 0.18 has no CPU kernel for int4 weight-only (its int4 layouts need CUDA or the mslk package); "
            "only int8 weight-only runs on this CPU",
            "bench.quant.backends.torchao_weights", scopes=("whole",),
            scope_reason="torchao weight-only quantizes nn.Linear layers only, and the router and experts are "
            "convolutions: only scope 'whole' (every nn.Linear, i.e. the classifier head) applies",
        ),
    )
}

#: Every back-end name a config may give, ``fake`` first (the default).
BACKEND_NAMES: tuple[str, ...] = ("fake", *BACKENDS)


def canonical_fields(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (QuantConfig fields) with the back-end's fixed settings imposed; fake and unknown back-ends
    are returned unchanged (the unknown name fails validation)."""
    backend = BACKENDS.get(data.get("backend", "fake"))
    return data if backend is None else {**data, **backend.fixed}


def not_applicable(config: QuantConfig) -> str | None:
    """Why a real back-end cannot run ``config`` (bits or scope it cannot do), None when it can (or fake)."""
    backend = BACKENDS.get(config.backend)
    if backend is None or config.is_fp32:
        return None
    if config.bits not in backend.bits:
        return f"{backend.bits_reason} (asked: int{config.bits})"
    if config.scope not in backend.scopes:
        return f"{backend.scope_reason} (asked: scope '{config.scope}')"
    return None


def installed(package: str) -> bool:
    """Whether ``package`` can be imported (found on the path; not imported)."""
    return importlib.util.find_spec(package) is not None


def missing_packages(name: str) -> list[str]:
    """The packages back-end ``name`` needs that are not installed ([] for fake)."""
    backend = BACKENDS.get(name)
    if backend is None:
        return []
    return [pkg for pkg in backend.packages if not installed(pkg)]


def prepare(model: nn.Module, config: QuantConfig, calib_x: torch.Tensor) -> QuantizedRunner:
    """The runner of ``config``'s back-end for ``model`` (eval mode, not modified), calibrated on ``calib_x``."""
    from bench.quant.config import QuantError

    backend = BACKENDS.get(config.backend)
    if backend is None:
        raise QuantError(f"backend: '{config.backend}' has no runner (fake quantization uses quantized())")
    reason = not_applicable(config)
    if reason is not None:
        raise QuantError(f"backend {config.backend}: {reason}")
    missing = missing_packages(config.backend)
    if missing:
        raise QuantError(f"backend {config.backend} needs {', '.join(missing)}: {INSTALL_HINT}")
    return importlib.import_module(backend.module).prepare(model, config, calib_x)


def scope_modules(model: nn.Module, scope: str) -> list[str]:
    """Qualified names of the modules owning the weights quantized under ``scope`` (the fake path's rule of
    :func:`bench.quant.scopes.scope_parameters`), in order, each once."""
    from bench.quant.scopes import scope_parameters

    owners = [name.rpartition(".")[0] for name in scope_parameters(model, scope)]
    return list(dict.fromkeys(owners))


class RunnerModule(nn.Module):
    """A runner as an ``nn.Module`` (forward = runner) so :func:`bench.evaluate.evaluate` takes it. It has no
    ``forward_routing`` and no patch grid: routing metrics are absent for real back-ends."""

    def __init__(self, runner: QuantizedRunner) -> None:
        super().__init__()
        self.runner = runner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.runner(x)


#: Seed of the calibration draw (fixed: every model and back-end calibrates on the same images).
CALIBRATION_SEED = 20_011


def calibration_images(train_x: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` clean training images (all when fewer), drawn with :data:`CALIBRATION_SEED`."""
    gen = torch.Generator().manual_seed(CALIBRATION_SEED)
    idx = torch.randperm(len(train_x), generator=gen)[:n].to(train_x.device)
    return train_x[idx]

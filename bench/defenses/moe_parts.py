"""Parts of a patch-level MoE model, for defenses that act on one of them (part-finetune, expert-ablation).

A pMoE model names two parameter groups (:meth:`bench.models.base.BenchModel.parameter_groups`): ``gate``
(the router kernels) and ``experts``. A *part* is ``router`` (the gate group), ``experts``, or ``rest``
(every other parameter: trunk, MoE embedding, head BatchNorm, classifier). A module's buffers (BatchNorm
running statistics) belong to the part of its parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn

from bench.defenses.expert_pruning import expert_silencer
from bench.errors import ComponentParamsError
from bench.models.base import BenchModel

Part = Literal["router", "experts", "rest"]
PARTS: tuple[str, ...] = ("router", "experts", "rest")


def part_parameters(model: BenchModel, part: str) -> set[str]:
    """Names of the parameters of ``part`` (see the module docstring); empty when the model has no router
    or experts, so a caller can refuse it."""
    groups = model.parameter_groups()
    router, experts = set(groups.get("gate", [])), set(groups.get("experts", []))
    if part == "router":
        return router
    if part == "experts":
        return experts
    if part == "rest":
        if not router or not experts:
            return set()  # without a router and experts, "rest" is the whole model: not a part
        return {n for n, _ in model.named_parameters()} - router - experts
    raise ComponentParamsError(f"part: must be one of {', '.join(PARTS)}, got {part!r}")


def _module_part(module: nn.Module, trainable: set[str], prefix: str) -> bool | None:
    """Whether the module's own parameters are trainable (None: it has none)."""
    own = [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters(recurse=False)]
    if not own:
        return None
    return all(n in trainable for n in own)


@contextlib.contextmanager
def frozen_except(model: nn.Module, trainable: set[str]) -> Iterator[None]:
    """Inside the block only the parameters named in ``trainable`` get gradients, and every BatchNorm of a
    frozen part normalises with its running statistics and keeps them (evaluation mode, forced before each
    of its forwards), so training changes the trainable parameters and their modules' buffers only.

    Optimizers skip parameters without a gradient (momentum and weight decay included), so a whole-model
    optimizer leaves the frozen ones exactly as they were. ``requires_grad`` and modes are restored on exit.
    """
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {m: m.training for m in model.modules()}
    handles = []
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not _module_part(module, trainable, name):
            handles.append(module.register_forward_pre_hook(_evaluation_mode))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for name, param in model.named_parameters():
            param.requires_grad_(grads[name])
        for module, mode in modes.items():
            module.training = mode


def _evaluation_mode(module: nn.Module, _args: object) -> None:
    module.train(False)


@contextlib.contextmanager
def silenced(model: BenchModel, expert: int) -> Iterator[None]:
    """Expert ``expert`` silenced inside the block exactly as expert-pruning's ``drop`` does
    (:func:`bench.defenses.expert_pruning.expert_silencer`), its weights restored on exit."""
    mask = expert_silencer(model, expert)
    saved = [(param, idx, param.detach()[idx].clone()) for param, idx in mask.targets()]
    mask.apply()
    try:
        yield
    finally:
        with torch.no_grad():
            for param, idx, values in saved:
                param[idx] = values

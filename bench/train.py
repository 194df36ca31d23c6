"""The one training loop. Clean, poisoned, QAT and quantization-conditioned training all run here;
they differ only in the data they are given and the objective (a loss function of model and batch).

Performance stance (DESIGN.md): the whole training set is a device tensor, batches are index slices of
it, augmentation happens on the device, and the loop synchronises with the host once per epoch (to
report the loss), never per step.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import TrainingDiverged

Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
EpochCallback = Callable[[int, int, float], None]

CROP_PADDING = 4  # the field's habit for 32x32 data (random crop with 4-pixel zero padding)


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The plain objective: cross-entropy of the model's logits."""
    return F.cross_entropy(model(x), y)


@dataclass
class TrainResult:
    """What a training run reports: mean loss per epoch, wall time and throughput."""

    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    images_per_second: float = 0.0


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; anything else as torch understands it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def augment_batch(x: torch.Tensor, mode: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop (4-pixel zero padding) and, for ``crop_flip``, horizontal flip, on the device."""
    if mode == "none":
        return x
    n, _, h, w = x.shape
    pad = CROP_PADDING
    padded = F.pad(x, (pad, pad, pad, pad))
    offsets = torch.randint(0, 2 * pad + 1, (2, n), device=x.device, generator=generator)
    rows = offsets[0][:, None] + torch.arange(h, device=x.device)[None, :]
    cols = offsets[1][:, None] + torch.arange(w, device=x.device)[None, :]
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if mode == "crop_flip":
        flip = torch.rand(n, device=x.device, generator=generator) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out.contiguous()


def make_optimizer(params: Any, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    if cfg["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])


def fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: dict[str, Any],
    *,
    seed: int,
    augment: str = "none",
    objective: Objective = cross_entropy,
    on_epoch: EpochCallback | None = None,
    epochs: int | None = None,
    trainable: list[nn.Parameter] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``(x, y)`` (already on the model's device) with settings ``cfg``
    (a resolved :class:`bench.scenario.TrainSpec` dict). ``epochs`` overrides ``cfg["epochs"]`` (defenses
    fine-tune for their own budget); ``trainable`` restricts which parameters the optimizer updates.
    An objective with a ``before_batch(indices)`` method gets each batch's training-set indices as a host
    tensor before it is called (qcb finds its triggered rows there without reading the device).
    A NaN or infinite mean epoch loss raises :class:`bench.errors.TrainingDiverged` (checked at the
    epoch's one host sync): a diverged model is a failed job, never a result.
    """
    epochs = int(epochs if epochs is not None else cfg["epochs"])
    device = x.device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    cpu_gen = torch.Generator().manual_seed(seed)
    if cfg.get("channels_last"):
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(trainable if trainable is not None else model.parameters(), cfg)
    steps_per_epoch = math.ceil(len(x) / cfg["batch_size"])
    scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
        if cfg.get("schedule") == "cosine"
        else None
    )
    step_model = torch.compile(model) if cfg.get("compile") else model
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if cfg.get("precision") == "bf16"
        else contextlib.nullcontext()
    )
    before_batch = getattr(objective, "before_batch", None)
    result = TrainResult()
    was_training = model.training
    model.train()
    start = time.perf_counter()
    try:
        for epoch in range(epochs):
            host_order = torch.randperm(len(x), generator=cpu_gen)
            order = host_order.to(device)
            total = torch.zeros((), device=device)
            for begin in range(0, len(x), cfg["batch_size"]):
                idx = order[begin : begin + cfg["batch_size"]]
                if before_batch is not None:
                    before_batch(host_order[begin : begin + cfg["batch_size"]])
                xb = augment_batch(x[idx], augment, generator)
                if cfg.get("channels_last"):
                    xb = xb.contiguous(memory_format=torch.channels_last)
                with autocast:
                    loss = objective(step_model, xb, y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                total += loss.detach().float() * len(idx)
            mean_loss = float(total.item()) / len(x)
            if not math.isfinite(mean_loss):
                raise TrainingDiverged(epoch + 1, mean_loss)
            result.epoch_losses.append(mean_loss)
            if on_epoch is not None:
                on_epoch(epoch + 1, epochs, mean_loss)
    finally:
        model.train(was_training)
        if cfg.get("channels_last"):
            model.to(memory_format=torch.contiguous_format)
    result.seconds = time.perf_counter() - start
    result.images_per_second = epochs * len(x) / max(result.seconds, 1e-9)
    return result

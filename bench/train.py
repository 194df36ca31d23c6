"""The one training loop. Clean, poisoned, QAT and quantization-conditioned training all run here;
they differ only in the data they are given and the objective (a loss function of model and batch).

Performance stance (docs/performance.md): the whole training set is a device tensor, batches are index slices of
it, augmentation happens on the device, and the loop synchronises with the host once per epoch (to
report the loss), never per step.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import os
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import TrainingDiverged
from bench.precision import resolve_channels_last, resolve_precision

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
    #: With ``compile``: frames Dynamo compiled during this run, and how many of them were recompilations
    #: (every compilation but the first of this architecture in this process). None without ``compile``.
    compile_frames: int | None = None
    compile_recompiles: int | None = None


#: Environment variable naming the torch.compile backend (tests use ``eager``); default ``inductor``.
COMPILE_BACKEND_ENV = "PMOE_BENCH_COMPILE_BACKEND"

_COMPILED: dict[str, Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {}


_PER_JOB = itertools.count()


def _call(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def compiled_forward(
    model: nn.Module, backend: str, tag: str = ""
) -> tuple[Callable[[nn.Module, torch.Tensor], torch.Tensor], bool]:
    """A compiled ``f(model, x) = model(x)`` shared by every model of ``model``'s architecture (its
    ``repr``: layers and shapes) and ``tag`` (precision, memory format), and whether it is new.

    Dynamo keeps its compiled versions per code object and gives up compiling a code object after
    ``torch._dynamo.config.recompile_limit`` (8) versions, for the rest of the process. Every model shares
    ``BenchModel.forward``, so plain ``torch.compile(model)`` lets architectures, QAT variants and partial
    batches use up one budget. Here each architecture gets a code object of its own (a copy of
    :func:`_call`'s, renamed) and the model is an argument, not part of the function: a second model of
    the same architecture (the next job) reuses the compiled graph instead of adding a version.

    A model under QAT (``torch.nn.utils.parametrize``) is an exception: parametrize gives every
    parametrized layer a class of its own, which Dynamo guards on, so no compiled graph can serve the
    next job's model. Such a model gets a fresh code object that is not kept (its versions, one per
    quantized precision and batch shape of the job, die with it) and can never use up another's budget.
    """
    from torch.nn.utils import parametrize

    per_job = any(parametrize.is_parametrized(m) for m in model.modules())
    key = hashlib.sha1(f"{backend}|{tag}|{model!r}".encode()).hexdigest()[:16]
    fn = None if per_job else _COMPILED.get(key)
    if fn is not None:
        return fn, False
    name = f"pmoe_bench_forward_{key}" + (f"_job{next(_PER_JOB)}" if per_job else "")
    code = _call.__code__.replace(co_name=name, co_qualname=name)
    fresh = types.FunctionType(code, _call.__globals__, name)
    fn = torch.compile(fresh, backend=backend)
    if not per_job:
        _COMPILED[key] = fn
    return fn, True


class CompiledStep(nn.Module):
    """``model`` behind a compiled forward of its architecture (:func:`compiled_forward`); still an
    ``nn.Module`` holding ``model``, so objectives that walk its modules (qcb's BatchNorm modes) work."""

    def __init__(self, model: nn.Module, fn: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self._fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(self.model, x)


def _frames_compiled() -> int:
    """Frames Dynamo compiled so far in this process (its ``frames/ok`` counter)."""
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])


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


def _weights_finite(model: nn.Module) -> torch.Tensor:
    """A device bool: every floating-point parameter and buffer is finite (no host sync)."""
    checks = [torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()]
    return torch.stack(checks).all() if checks else torch.ones((), dtype=torch.bool)


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
    compile_backend: str | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``(x, y)`` (already on the model's device) with settings ``cfg``
    (a resolved :class:`bench.scenario.TrainSpec` dict). ``epochs`` overrides ``cfg["epochs"]`` (defenses
    fine-tune for their own budget); ``trainable`` restricts which parameters the optimizer updates.
    An objective with a ``before_batch(indices)`` method gets each batch's training-set indices as a host
    tensor before it is called (qcb finds its triggered rows there without reading the device); one with an
    ``after_step()`` method is called after every optimizer step (a learned trigger steps its own optimizer
    there: the loss's backward pass filled its gradients too, see :class:`bench.attacks.base.JointTraining`);
    one with a ``bind_optimizer(optimizer)`` method gets the optimizer before the first step (qcb's repair
    phase runs at its own learning rate).
    With ``cfg["compile"]`` the full batches run through the compiled forward of the model's architecture
    (:func:`compiled_forward`, backend ``compile_backend``, else ``$PMOE_BENCH_COMPILE_BACKEND``, else
    inductor) and the last partial batch through the plain module: one more batch shape would add a
    version (a recompilation) to every job, and dropping the batch would change the data a model sees.
    The result counts the compilations (``compile_frames``, ``compile_recompiles``).
    A model's own loss term (:meth:`bench.models.base.BenchModel.auxiliary_loss`, e.g. V-MoE's
    load-balancing loss, recorded by the step's forwards) is added to the objective's loss of every step,
    whatever the objective (plain, poisoned, QAT, qcb, a learned trigger's), and counts in the epoch losses.
    A NaN or infinite mean epoch loss raises :class:`bench.errors.TrainingDiverged` (checked at the
    epoch's one host sync): a diverged model is a failed job, never a result.
    """
    epochs = int(epochs if epochs is not None else cfg["epochs"])
    device = x.device
    aware = bool(cfg.get("qat_bits")) or bool(getattr(objective, "quantization_aware", False))
    precision = resolve_precision(cfg.get("precision", "fp32"), device, aware)
    channels_last = resolve_channels_last(cfg.get("channels_last", False), device)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    cpu_gen = torch.Generator().manual_seed(seed)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(trainable if trainable is not None else model.parameters(), cfg)
    steps_per_epoch = math.ceil(len(x) / cfg["batch_size"])
    scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
        if cfg.get("schedule") == "cosine"
        else None
    )
    step_model: nn.Module = model
    first_compile = False
    frames_before = 0
    if cfg.get("compile"):
        backend = compile_backend or os.environ.get(COMPILE_BACKEND_ENV) or "inductor"
        tag = f"{precision}|{'cl' if channels_last else 'c'}|{device.type}"
        fn, first_compile = compiled_forward(model, backend, tag)
        step_model = CompiledStep(model, fn)
        frames_before = _frames_compiled()
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if precision == "bf16"
        else contextlib.nullcontext()
    )
    before_batch = getattr(objective, "before_batch", None)
    auxiliary = getattr(model, "auxiliary_loss", None)  # BenchModel.auxiliary_loss: None for most models
    after_step = getattr(objective, "after_step", None)
    if (bind_optimizer := getattr(objective, "bind_optimizer", None)) is not None:
        bind_optimizer(optimizer)
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
                if channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                full = xb.shape[0] == cfg["batch_size"]
                with autocast:
                    if auxiliary is not None:
                        auxiliary()  # drop a term recorded by forwards outside this step
                    loss = objective(step_model if full else model, xb, y[idx])
                    if auxiliary is not None and (extra := auxiliary()) is not None:
                        loss = loss + extra  # the model's own term (an MoE load-balancing loss)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if after_step is not None:
                    after_step()
                if scheduler is not None:
                    scheduler.step()
                total += loss.detach().float() * len(idx)
            if epoch + 1 < epochs:
                mean_loss, finite = float(total.item()) / len(x), True
            else:  # the last step's update is in no loss: its weights are checked in the same host read
                loss_sum, finite_flag = torch.stack([total.float(), _weights_finite(model).float()]).tolist()
                mean_loss, finite = loss_sum / len(x), finite_flag == 1.0
            if not math.isfinite(mean_loss):
                raise TrainingDiverged(epoch + 1, mean_loss)
            if not finite:
                raise TrainingDiverged(epoch + 1, mean_loss, "non-finite weights after the last step")
            result.epoch_losses.append(mean_loss)
            if on_epoch is not None:
                on_epoch(epoch + 1, epochs, mean_loss)
    finally:
        model.train(was_training)
        if channels_last:
            model.to(memory_format=torch.contiguous_format)
    result.seconds = time.perf_counter() - start
    if cfg.get("compile"):
        result.compile_frames = _frames_compiled() - frames_before
        result.compile_recompiles = max(0, result.compile_frames - (1 if first_compile else 0))
    result.images_per_second = epochs * len(x) / max(result.seconds, 1e-9)
    return result

"""What data-inspection defenses share: penultimate-layer features, detection metrics against the
benchmark's truth, and retraining from scratch on the samples a defense keeps.

Used by ``activation-clustering``, ``spectral-signatures`` and ``abl`` (their threat model includes the
poisoned training set, :attr:`bench.defenses.base.Defense.sees`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bench.defenses.base import DefenseContext, Metric
from bench.errors import JobFailed
from bench.models.base import BenchModel
from bench.train import fit


def classifier(model: nn.Module) -> nn.Linear:
    """The model's classifier: its last ``nn.Linear`` (``fc`` for the built-in models)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise JobFailed(f"{type(model).__name__} has no nn.Linear classifier, so it has no penultimate-layer "
                        "features to inspect")
    return linears[-1]


@torch.no_grad()
def penultimate(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """``[N, D]`` float: the classifier's input features (the last hidden layer) of ``x``, eval mode."""
    head = classifier(model)
    chunks: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, inputs, _out: chunks.append(inputs[0].detach().flatten(1)))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(x), batch_size):
            model(x[start : start + batch_size])
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(chunks).float()


def detection_metrics(flagged: torch.Tensor, truth: torch.Tensor, labels: torch.Tensor) -> dict[str, Metric]:
    """Precision, recall and F1 of ``flagged`` (``[N]`` bool) against the truly poisoned samples, counts,
    and the classes (by training label) that hold flagged samples."""
    flagged, truth = flagged.bool().cpu(), truth.bool().cpu()
    hits = int((flagged & truth).sum())
    n_flagged, n_poisoned = int(flagged.sum()), int(truth.sum())
    precision = hits / n_flagged if n_flagged else float("nan")
    recall = hits / n_poisoned if n_poisoned else float("nan")
    f1 = 2 * hits / (n_flagged + n_poisoned) if n_flagged + n_poisoned else float("nan")
    classes = sorted({int(c) for c in labels.cpu()[flagged].tolist()})
    return {"precision": precision, "recall": recall, "f1": f1, "n_flagged": n_flagged, "n_poisoned": n_poisoned,
            "flagged_classes": ",".join(map(str, classes)) or "none"}


def retrain(ctx: DefenseContext, keep: torch.Tensor, epochs: int | None = None) -> BenchModel:
    """A fresh model (initialised as the attacked one was) trained from scratch on the poisoned set's
    samples at ``keep`` with the scenario's train settings and seed (``epochs`` overrides them), under
    QAT when the scenario trains with it, as the attacked model was."""
    if ctx.fresh_model is None:
        raise JobFailed(f"defense '{ctx.defense}' retrains from scratch and its context has no fresh_model")
    from bench.jobs import qat_config  # bench.jobs imports the defenses: import it when a job runs
    from bench.quant import attach_qat

    model = ctx.fresh_model()
    index = torch.nonzero(keep.to(ctx.poisoned_y.device)).flatten()
    handle = attach_qat(model, qat_config(ctx.train_cfg)) if ctx.train_cfg.get("qat_bits") else None
    try:
        fit(model, ctx.poisoned_x[index], ctx.poisoned_y[index], ctx.train_cfg, seed=ctx.seed, augment=ctx.augment,
            on_epoch=ctx.on_epoch, epochs=epochs)
    finally:
        if handle is not None:
            handle.remove()
    return model


def retrain_metrics(keep: torch.Tensor) -> dict[str, Any]:
    """What a retraining stage reports: how many samples it kept and removed."""
    return {"n_kept": int(keep.sum()), "n_removed": int((~keep.bool()).sum())}

"""Evaluation of one model on one data set: predictions in batches, then the metrics of bench.metrics."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from bench import metrics
from bench.analysis.routing import routing_metrics
from bench.attacks.base import Trigger
from bench.attacks.poison import triggered_test_set
from bench.data.base import TensorData


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024, precision: str = "fp32") -> torch.Tensor:
    """Predicted labels for ``x`` (on ``x``'s device); the model's train/eval mode is restored after."""
    was_training = model.training
    model.eval()
    autocast = (
        torch.autocast(device_type=x.device.type, dtype=torch.bfloat16)
        if precision == "bf16"
        else contextlib.nullcontext()
    )
    try:
        out = []
        for begin in range(0, len(x), batch_size):
            with autocast:
                out.append(model(x[begin : begin + batch_size]).argmax(dim=1))
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=x.device)
    finally:
        model.train(was_training)


def evaluate(
    model: nn.Module,
    data: TensorData,
    trigger: Trigger | None = None,
    target: int | None = None,
    batch_size: int = 1024,
    precision: str = "fp32",
    routing: bool = True,
) -> dict[str, Any]:
    """BA on the clean test set, and ASR / RA on its triggered non-target part when a trigger is given;
    for models with routing also the routing metrics of :mod:`bench.analysis.routing` (which expert sees
    the trigger, load balance, routing shift clean vs triggered)."""
    preds = predict(model, data.test_x, batch_size, precision)
    out: dict[str, Any] = {"ba": metrics.accuracy(preds, data.test_y), "n_test": int(len(data.test_y))}
    if trigger is not None and target is not None:
        x_t, y_true = triggered_test_set(data.test_x, data.test_y, trigger, target)
        preds_t = predict(model, x_t, batch_size, precision)
        out["asr"] = metrics.attack_success_rate(preds_t, target)
        out["ra"] = metrics.robust_accuracy(preds_t, y_true)
        out["n_asr"] = int(len(y_true))
        if routing:
            out.update(routing_metrics(model, data.test_x[data.test_y != target], x_t, trigger, batch_size))
    elif routing:
        out.update(routing_metrics(model, data.test_x, batch_size=batch_size))
    return out

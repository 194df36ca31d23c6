"""Evaluation of one model on one data set: one forward pass per input set (clean test set, triggered
test set) yields the predictions *and* the routing, in the evaluation's precision; the metrics of
:mod:`bench.metrics` and :mod:`bench.analysis.routing` are computed from those passes.

Precision rule (see :func:`bench.jobs.run_evaluate`): quantized models and the fp32 reference row are
evaluated in fp32 arithmetic whatever the training precision; ``precision="bf16"`` here is for the
separately labelled bf16-inference metrics only.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bench import metrics
from bench.analysis.routing import RoutingTally, has_routing, patch_touch_mask
from bench.attacks.base import Trigger
from bench.attacks.poison import asr_mask, backdoor_labels, triggered_test_set
from bench.data.base import TensorData


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast for ``precision == "bf16"``, else nothing (fp32 arithmetic)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024, precision: str = "fp32") -> torch.Tensor:
    """Predicted labels for ``x`` (on ``x``'s device); the model's train/eval mode is restored after."""
    return forward_pass(model, x, batch_size, precision, routing=False).preds


@dataclass
class Pass:
    """One forward pass over an input set: predicted labels ``[N]`` and, for models with routing (when
    asked), the selection masks ``[N, E, rows, cols]`` of the same forwards (both on the input's device)."""

    preds: torch.Tensor
    selection: torch.Tensor | None = None


@torch.no_grad()
def forward_pass(
    model: nn.Module, x: torch.Tensor, batch_size: int = 1024, precision: str = "fp32", routing: bool = True
) -> Pass:
    """Predictions and (``routing`` and a model with routing) selection masks of ``x``, in batches, from
    the same forwards (``forward_routing`` returns both); eval mode, the previous mode restored after."""
    use_routing = routing and has_routing(model)
    was_training = model.training
    model.eval()
    preds: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    try:
        for begin in range(0, len(x), batch_size):
            xb = x[begin : begin + batch_size]
            with _autocast(x.device, precision):
                if use_routing:
                    logits, batch_routing = model.forward_routing(xb)  # type: ignore[operator]
                    if batch_routing is None:
                        use_routing = False
                        masks = []
                    else:
                        masks.append(batch_routing.selection_mask())
                else:
                    logits = model(xb)
            preds.append(logits.argmax(dim=1))
    finally:
        model.train(was_training)
    out = torch.cat(preds) if preds else torch.empty(0, dtype=torch.long, device=x.device)
    return Pass(out, torch.cat(masks) if use_routing and masks else None)


def _tally(
    clean: torch.Tensor, triggered: torch.Tensor | None, touch: torch.Tensor | None, chunk: int
) -> dict[str, float]:
    """Routing metrics of paired selections, summed in chunks of ``chunk`` images (on the device)."""
    tally = RoutingTally(int(clean.shape[1]), (int(clean.shape[2]), int(clean.shape[3])), touch)
    for begin in range(0, clean.shape[0], chunk):
        tally.update(clean[begin : begin + chunk],
                     None if triggered is None else triggered[begin : begin + chunk])
    return tally.result()


def evaluate(
    model: nn.Module,
    data: TensorData,
    trigger: Trigger | None = None,
    target: int | None = None,
    batch_size: int = 1024,
    precision: str = "fp32",
    routing: bool = True,
) -> dict[str, Any]:
    """BA on the clean test set and, when a trigger is given, ASR / RA on its triggered ASR set: the
    non-target images for an all-to-one attack (``target`` a label), every image for an all-to-all one
    (``target`` None: the backdoor label is ``(y + 1) mod C``); for models with routing also the routing
    metrics of :mod:`bench.analysis.routing` (which expert sees the trigger, load balance, routing shift
    clean vs triggered).

    Two forward passes at most (clean, triggered), each giving predictions and routing together, in
    ``precision``; the routing metrics pair the clean pass's ASR-set images with the triggered pass.
    """
    clean = forward_pass(model, data.test_x, batch_size, precision, routing)
    out: dict[str, Any] = {"ba": metrics.accuracy(clean.preds, data.test_y), "n_test": int(len(data.test_y))}
    if trigger is not None:
        x_t, y_true = triggered_test_set(data.test_x, data.test_y, trigger, target)
        trig = forward_pass(model, x_t, batch_size, precision, routing)
        wanted = backdoor_labels(y_true, target, int(data.num_classes))
        out["asr"] = metrics.attack_success_rate(trig.preds, wanted)
        out["ra"] = metrics.robust_accuracy(trig.preds, y_true)
        out["n_asr"] = int(len(y_true))
        if clean.selection is not None and trig.selection is not None and len(y_true):
            grid = (int(clean.selection.shape[2]), int(clean.selection.shape[3]))
            touch = patch_touch_mask(trigger, tuple(data.test_x.shape[1:]), grid)
            paired = clean.selection[asr_mask(data.test_y, target)]
            out.update(_tally(paired, trig.selection, touch, batch_size))
    elif clean.selection is not None and len(data.test_y):
        out.update(_tally(clean.selection, None, None, batch_size))
    return out

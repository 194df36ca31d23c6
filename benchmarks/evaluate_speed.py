"""Evaluation speed: the former four-pass evaluation (predictions on clean and triggered images, then
``routing_metrics``' own passes over both) against :func:`bench.evaluate.evaluate` (one pass per input set
giving predictions and routing together). Checks the metrics are identical, prints seconds and speed-up.

    python benchmarks/evaluate_speed.py [--device cpu] [--images 300] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from torch import nn

from bench import metrics
from bench.analysis.routing import routing_metrics
from bench.attacks.badnets import BadNets
from bench.attacks.poison import triggered_test_set
from bench.data.base import TensorData
from bench.evaluate import evaluate, predict
from bench.registry import REGISTRY
from bench.train import resolve_device

TARGET = 0


def four_pass(model: nn.Module, data: TensorData, trigger: BadNets, batch_size: int) -> dict[str, Any]:
    """The evaluation as it was: two prediction passes, then two routing passes."""
    preds = predict(model, data.test_x, batch_size)
    out: dict[str, Any] = {"ba": metrics.accuracy(preds, data.test_y), "n_test": int(len(data.test_y))}
    x_t, y_true = triggered_test_set(data.test_x, data.test_y, trigger, TARGET)
    preds_t = predict(model, x_t, batch_size)
    out.update(asr=metrics.attack_success_rate(preds_t, TARGET), ra=metrics.robust_accuracy(preds_t, y_true),
               n_asr=int(len(y_true)))
    out.update(routing_metrics(model, data.test_x[data.test_y != TARGET], x_t, trigger, batch_size))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Any, device: torch.device, repeats: int) -> tuple[float, Any]:
    """Best wall time of ``repeats`` calls of ``fn`` and its last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        result = fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best, result


def case(label: str, model: nn.Module, data: TensorData, device: torch.device, repeats: int,
         batch_size: int) -> dict[str, Any]:
    """Time both evaluations of ``model`` on ``data``; the metrics must agree."""
    trigger = BadNets(size=2, position="top-left")
    evaluate(model, data, trigger, TARGET, batch_size)  # warm-up
    old_s, old = _time(lambda: four_pass(model, data, trigger, batch_size), device, repeats)
    new_s, new = _time(lambda: evaluate(model, data, trigger, TARGET, batch_size), device, repeats)
    same = old == new
    print(f"{label:34s} {len(data.test_y):5d} images: four-pass {old_s:7.3f} s, two-pass {new_s:7.3f} s, "
          f"speed-up x{old_s / new_s:.2f}, metrics identical: {same}")
    return {"label": label, "old_s": old_s, "new_s": new_s, "speedup": old_s / new_s, "identical": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images", type=int, default=300, help="test images of the pmoe-paper case")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1024)
    args = parser.parse_args()
    device = resolve_device(args.device)
    print(f"device {device}, threads {torch.get_num_threads()}")
    digits = REGISTRY.get("dataset", "digits").create(image_size=16).to(device)
    torch.manual_seed(0)
    small = REGISTRY.get("model", "pmoe").create(input_shape=digits.input_shape, num_classes=10, mean=digits.mean,
                                                 std=digits.std, width=1, experts=4, topk=4).to(device)
    case("quickstart pmoe, digits 16x16", small, digits, device, args.repeats, args.batch_size)
    gen = torch.Generator().manual_seed(0)
    n = args.images
    x = torch.rand(n, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    rand = TensorData("random", x, y, x, y, num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3).to(device)
    paper = REGISTRY.get("model", "pmoe-paper").create(input_shape=(3, 32, 32), num_classes=10, mean=(0.5,) * 3,
                                                       std=(0.25,) * 3).to(device)
    case("pmoe-paper, random 3x32x32", paper, rand, device, args.repeats, args.batch_size)


if __name__ == "__main__":
    main()

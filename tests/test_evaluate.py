"""Evaluation: one forward pass per input set gives the same metrics as the former four-pass computation
(predictions, then routing again on clean and triggered images); the precision rule of run_evaluate."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from bench import metrics
from bench.analysis.routing import routing_metrics
from bench.attacks.badnets import BadNets
from bench.attacks.poison import triggered_test_set
from bench.data.base import TensorData
from bench.evaluate import evaluate, predict
from bench.registry import REGISTRY
from bench.scenario import TrainSpec
from bench.train import fit

TARGET = 0


def four_pass_evaluate(model: nn.Module, data: TensorData, trigger: BadNets | None, target: int | None,
                       batch_size: int) -> dict[str, Any]:
    """The computation evaluate() replaced: predictions, then routing_metrics' own passes."""
    preds = predict(model, data.test_x, batch_size)
    out: dict[str, Any] = {"ba": metrics.accuracy(preds, data.test_y), "n_test": int(len(data.test_y))}
    if trigger is not None and target is not None:
        x_t, y_true = triggered_test_set(data.test_x, data.test_y, trigger, target)
        preds_t = predict(model, x_t, batch_size)
        out.update(asr=metrics.attack_success_rate(preds_t, target), ra=metrics.robust_accuracy(preds_t, y_true),
                   n_asr=int(len(y_true)))
        out.update(routing_metrics(model, data.test_x[data.test_y != target], x_t, trigger, batch_size))
    else:
        out.update(routing_metrics(model, data.test_x, batch_size=batch_size))
    return out


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, TensorData]:
    """A pMoE trained for two epochs on poisoned-free digits at 16x16 (routing that is not uniform)."""
    torch.manual_seed(0)
    data = REGISTRY.get("dataset", "digits").create(image_size=16)
    model = REGISTRY.get("model", "pmoe").create(
        input_shape=data.input_shape, num_classes=10, mean=data.mean, std=data.std, width=1, experts=2, topk=4
    )
    fit(model, data.train_x, data.train_y, TrainSpec(epochs=2, batch_size=128, lr=0.05).model_dump(), seed=0)
    return model, data


@pytest.mark.parametrize("batch_size", [1024, 97])
@pytest.mark.parametrize("attacked", [True, False])
def test_two_pass_evaluation_equals_the_four_pass_one(trained, batch_size: int, attacked: bool) -> None:
    model, data = trained
    trigger = BadNets(size=2, position="top-left") if attacked else None
    target = TARGET if attacked else None
    new = evaluate(model, data, trigger, target, batch_size)
    old = four_pass_evaluate(model, data, trigger, target, batch_size)
    assert new == old  # bit for bit: same forwards, same sums in the same order
    assert "load_cv_mean" in new and ("route_rate_any" in new) == attacked


def test_attacked_evaluation_runs_two_forward_passes(trained) -> None:
    model, data = trained
    calls = []
    handle = model.normalize.register_forward_hook(lambda *_: calls.append(1))  # every forward starts here
    try:
        out = evaluate(model, data, BadNets(size=2, position="top-left"), TARGET, batch_size=4096)
    finally:
        handle.remove()
    assert len(calls) == 2
    assert "route_jaccard_mean" in out and "asr" in out


def test_run_evaluate_is_fp32_for_bf16_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16-trained model's reference row and its quantized rows run in fp32; bf16 inference is labelled."""
    from bench import jobs

    seen: list[tuple[str, bool]] = []

    def fake_evaluate(model, data, trigger, target, batch_size, precision="fp32", routing=True):
        seen.append((precision, routing))
        return {"ba": 0.5, "asr": 0.25, "ra": 0.5}

    class Ctx:
        device = torch.device("cpu")

        class store:  # noqa: N801 - a stand-in for the store's one method used here
            @staticmethod
            def load_state(job_id: str, stage: str | None = None) -> dict[str, torch.Tensor]:
                return model.state_dict()

        @staticmethod
        def dataset(spec: dict[str, Any]) -> TensorData:
            return data

    data = REGISTRY.get("dataset", "digits").create(image_size=8)
    model_spec = {"name": "pmoe", "width": 1, "experts": 2, "topk": 2}
    model = jobs.build_model(model_spec, data)
    monkeypatch.setattr(jobs, "evaluate", fake_evaluate)
    attack = {"name": "badnets", "params": {"size": 2, "position": "top-left"}, "apply": "image", "target": 0}
    spec = {"dataset": {"name": "digits", "image_size": 8}, "model": model_spec, "attack": attack,
            "eval_batch_size": 256, "precision": "bf16", "quant": None}
    out = jobs.run_evaluate(spec, ("dep",), Ctx()).metrics  # type: ignore[arg-type]
    assert seen == [("fp32", True), ("bf16", False)]
    assert out["ba"] == 0.5 and out["ba_bf16"] == 0.5 and out["asr_bf16"] == 0.25
    seen.clear()
    spec["quant"] = {"label": "int8/whole", "bits": 8, "scope": "whole", "granularity": "tensor",
                     "symmetric": False}
    out = jobs.run_evaluate(spec, ("dep",), Ctx()).metrics  # type: ignore[arg-type]
    assert seen == [("fp32", True)] and "ba_bf16" not in out

"""What each kind of job does. A job gets its fully resolved spec and its inputs from the store, never
the scenario; it returns metrics and, for jobs that produce a model, the model's state dict."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from bench.attacks import build_attack_trigger
from bench.attacks.base import Trigger
from bench.attacks.poison import poison_training_set
from bench.data.base import TensorData
from bench.evaluate import evaluate
from bench.models.base import BenchModel
from bench.plan import Job
from bench.registry import REGISTRY
from bench.store import Store
from bench.train import EpochCallback, fit


@dataclass
class JobOutput:
    """A finished job's metrics and, if it produced a model, its weights."""

    metrics: dict[str, Any]
    state: dict[str, torch.Tensor] | None = None


@dataclass
class JobContext:
    """What jobs share within one process: the store, the device, loaded data sets, a progress hook."""

    store: Store
    device: torch.device
    on_epoch: EpochCallback | None = None
    _data: dict[str, TensorData] = field(default_factory=dict)

    def dataset(self, spec: dict[str, Any]) -> TensorData:
        """The data set of ``spec`` on the context's device, loaded once per process."""
        key = json.dumps(spec, sort_keys=True)
        if key not in self._data:
            params = {k: v for k, v in spec.items() if k != "name"}
            data = REGISTRY.get("dataset", spec["name"]).create(**params)
            self._data[key] = data.to(self.device)
        return self._data[key]


def build_model(spec: dict[str, Any], data: TensorData) -> BenchModel:
    """A model for ``data`` from its resolved spec (the data set supplies shape, classes and statistics)."""
    params = {k: v for k, v in spec.items() if k != "name"}
    return REGISTRY.get("model", spec["name"]).create(
        input_shape=data.input_shape, num_classes=data.num_classes, mean=data.mean, std=data.std, **params
    )


def build_trigger(attack: dict[str, Any], model: BenchModel) -> Trigger:
    """The attack's trigger as applied to ``model`` (BadPatches uses the model's routing grid)."""
    return build_attack_trigger(attack["name"], attack["params"], attack["apply"], model.patch_grid)


def run_train(spec: dict[str, Any], ctx: JobContext) -> JobOutput:
    """Train one model (clean, or on a poisoned copy of the training set)."""
    data = ctx.dataset(spec["dataset"])
    torch.manual_seed(spec["seed"])
    model = build_model(spec["model"], data).to(ctx.device)
    x, y = data.train_x, data.train_y
    metrics: dict[str, Any] = {"n_train": int(len(y))}
    attack = spec["attack"]
    if attack is not None:
        trigger = build_trigger(attack, model)
        poisoned = poison_training_set(x, y, trigger, attack["target"], spec["poison_rate"], spec["seed"])
        x, y = poisoned.x, poisoned.y
        metrics["n_poisoned"] = int(len(poisoned.indices))
    augment = data.augment if spec["train"]["augment"] == "auto" else spec["train"]["augment"]
    result = fit(model, x, y, spec["train"], seed=spec["seed"], augment=augment, on_epoch=ctx.on_epoch)
    metrics.update(
        train_seconds=result.seconds,
        images_per_second=result.images_per_second,
        final_loss=result.epoch_losses[-1],
        epoch_losses=result.epoch_losses,
    )
    return JobOutput(metrics, model.state_dict())


def run_evaluate(spec: dict[str, Any], deps: tuple[str, ...], ctx: JobContext) -> JobOutput:
    """Evaluate a stored model: BA, and ASR/RA for its attack."""
    data = ctx.dataset(spec["dataset"])
    model = build_model(spec["model"], data).to(ctx.device)
    model.load_state_dict(ctx.store.load_state(deps[0]))
    attack = spec["attack"]
    trigger = build_trigger(attack, model) if attack is not None else None
    target = attack["target"] if attack is not None else None
    metrics = evaluate(model, data, trigger, target, spec["eval_batch_size"], spec["precision"])
    return JobOutput(metrics)


RUNNERS: dict[str, Callable[[Job, JobContext], JobOutput]] = {
    "train": lambda job, ctx: run_train(job.spec, ctx),
    "evaluate": lambda job, ctx: run_evaluate(job.spec, job.deps, ctx),
}


def run_job(job: Job, ctx: JobContext) -> JobOutput:
    """Dispatch a job to the function of its kind."""
    return RUNNERS[job.kind](job, ctx)

"""What each kind of job does. A job gets its fully resolved spec and its inputs from the store, never
the scenario; it returns metrics and, for jobs that produce a model, the model's state dict."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from bench import applicability
from bench.attacks import build_attack_trigger
from bench.attacks.base import TRIGGER_STAGE, Trigger
from bench.attacks.poison import poison_training_set
from bench.data.base import TensorData
from bench.errors import JobFailed, StoreError
from bench.evaluate import evaluate
from bench.models.base import BenchModel
from bench.plan import Job
from bench.quant import QuantConfig, attach_qat, quantized
from bench.registry import REGISTRY
from bench.store import Store
from bench.train import EpochCallback, cross_entropy, fit

if TYPE_CHECKING:
    from bench.defenses.base import PoisonedData


@dataclass
class JobOutput:
    """A finished job's metrics and, if it produced a model, its weights (``stages``: one model per
    named stage, for defenses)."""

    metrics: dict[str, Any]
    state: dict[str, torch.Tensor] | None = None
    stages: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


@dataclass
class JobContext:
    """What jobs share within one process: the store, the device, loaded data sets, a progress hook."""

    store: Store
    device: torch.device
    on_epoch: EpochCallback | None = None
    #: Called after every training epoch with the model and the train job's spec (searches use it to
    #: report intermediate values; raising from it, e.g. optuna.TrialPruned, stops the job unrecorded).
    model_hook: Callable[[BenchModel, dict[str, Any], int, int], None] | None = None
    _data: DatasetCache = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._data = DatasetCache(self.device)

    def dataset(self, spec: dict[str, Any]) -> TensorData:
        """The data set of ``spec`` on the context's device, loaded once per process."""
        return self._data(spec)


class DatasetCache:
    """Data sets by resolved spec, each loaded once, as tensors on ``device``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._loaded: dict[str, TensorData] = {}

    def __call__(self, spec: dict[str, Any]) -> TensorData:
        key = json.dumps(spec, sort_keys=True)
        if key not in self._loaded:
            params = {k: v for k, v in spec.items() if k != "name"}
            self._loaded[key] = REGISTRY.get("dataset", spec["name"]).create(**params).to(self.device)
        return self._loaded[key]


def build_model(spec: dict[str, Any], data: TensorData) -> BenchModel:
    """A model for ``data`` from its resolved spec (the data set supplies shape, classes and statistics)."""
    params = {k: v for k, v in spec.items() if k != "name"}
    return REGISTRY.get("model", spec["name"]).create(
        input_shape=data.input_shape, num_classes=data.num_classes, mean=data.mean, std=data.std, **params
    )


def build_trigger(attack: dict[str, Any], model: BenchModel) -> Trigger:
    """The attack's trigger as applied to ``model`` (BadPatches: per patch of the attack's ``trigger_grid``,
    else of the model's routing grid)."""
    return build_attack_trigger(attack["name"], attack["params"], attack["apply"], model.patch_grid,
                                attack.get("trigger_grid"))


def run_train(spec: dict[str, Any], ctx: JobContext) -> JobOutput:
    """Train one model: clean, on a poisoned copy of the training set, under QAT, or with the qcb
    objective (which builds its own training data and loss from the clean set)."""
    data = ctx.dataset(spec["dataset"])
    torch.manual_seed(spec["seed"])
    model = build_model(spec["model"], data).to(ctx.device)
    x, y = data.train_x, data.train_y
    metrics: dict[str, Any] = {"n_train": int(len(y))}
    objective, finish, trigger_finish = cross_entropy, _no_op, _no_op
    attack = spec["attack"]
    trigger = None
    if attack is not None:
        trigger = build_trigger(attack, model)
        if attack.get("objective"):
            from bench.attacks.qcb import QCBSpec, prepare_qcb

            qcb = prepare_qcb(
                QCBSpec.model_validate(attack["objective"]), model, x, y, trigger, attack["target"],
                spec["poison_rate"], spec["seed"],
            )
            x, y, objective, finish = qcb.x, qcb.y, qcb.objective, qcb.finish
        elif getattr(trigger, "learned", False):  # a trigger trained with the classifier (its own data and objective)
            joint = trigger.joint_training(
                model, x, y, target=attack["target"], rate=spec["poison_rate"], seed=spec["seed"],
                mode=attack.get("mode", "dirty"), num_classes=data.num_classes, train_cfg=spec["train"],
            )
            x, y, objective, trigger_finish = joint.x, joint.y, joint.objective, joint.finish
            metrics.update(joint.metrics)
        else:
            poisoned = poison_training_set(x, y, trigger, attack["target"], spec["poison_rate"], spec["seed"],
                                           mode=attack.get("mode", "dirty"), num_classes=data.num_classes)
            x, y = poisoned.x, poisoned.y
            metrics["n_poisoned"] = int(len(poisoned.indices))
    if spec["train"].get("qat_bits") and finish is _no_op:
        finish = attach_qat(model, qat_config(spec["train"])).remove
    augment = data.augment if spec["train"]["augment"] == "auto" else spec["train"]["augment"]
    def on_epoch(epoch: int, epochs: int, loss: float) -> None:
        if ctx.on_epoch is not None:
            ctx.on_epoch(epoch, epochs, loss)
        if ctx.model_hook is not None:
            ctx.model_hook(model, spec, epoch, epochs)

    try:
        result = fit(model, x, y, spec["train"], seed=spec["seed"], augment=augment, objective=objective,
                     on_epoch=on_epoch)
    finally:
        finish()
        trigger_finish()
    metrics.update(
        train_seconds=result.seconds,
        images_per_second=result.images_per_second,
        final_loss=result.epoch_losses[-1],
        epoch_losses=result.epoch_losses,
    )
    if result.compile_frames is not None:
        metrics.update(compile_frames=result.compile_frames, compile_recompiles=result.compile_recompiles)
    out = JobOutput(metrics, model.state_dict())
    if getattr(trigger, "learned", False):  # stored beside the model, restored by restore_trigger
        out.stages[TRIGGER_STAGE] = trigger.state_dict()
    return out


def restore_trigger(trigger: Trigger | None, store: Store, source: str) -> None:
    """Give a learned trigger (:attr:`Trigger.learned`) the state its train job stored (the ``trigger``
    stage), found by following the inputs of ``source`` (a train, defend or evaluate job) back to that train
    job; nothing for other triggers."""
    if not getattr(trigger, "learned", False):
        return
    job, seen = source, set()
    while (record := store.get(job)) is not None and record.kind != "train" and record.deps and job not in seen:
        seen.add(job)
        job = record.deps[0]
    if record is not None and record.kind == "train" and not record.spec.get("attack"):
        raise StoreError(f"{store.root}: job {job} trained a clean model, which has no learned trigger to restore")
    trigger.load_state_dict(store.load_state(job, TRIGGER_STAGE))


def run_evaluate(spec: dict[str, Any], deps: tuple[str, ...], ctx: JobContext) -> JobOutput:
    """Evaluate a stored model: BA, and ASR/RA for its attack, with its routing metrics (none for a real
    integer back-end, which runs its own quantized program: :mod:`bench.quant.backends`).

    Precision rule: every evaluation runs in fp32 arithmetic, whatever ``spec["precision"]`` (the training
    precision, part of the job id): a quantized model's integer levels must not be re-rounded by bf16
    autocast, and the fp32 reference row (``quant`` None) must be fp32 for the comparison to mean
    anything. A model trained in bf16 additionally gets its bf16-inference numbers on the reference row,
    labelled ``ba_bf16`` / ``asr_bf16`` / ``ra_bf16``.
    """
    data = ctx.dataset(spec["dataset"])
    model = build_model(spec["model"], data).to(ctx.device)
    model.load_state_dict(ctx.store.load_state(deps[0], spec.get("stage")))
    attack = spec["attack"]
    trigger = build_trigger(attack, model) if attack is not None else None
    restore_trigger(trigger, ctx.store, deps[0])
    target = attack["target"] if attack is not None else None
    quant = spec.get("quant")
    batch = spec["eval_batch_size"]
    classes = {"num_classes": int(data.num_classes)}  # the report's chance-level check reads it
    if quant is None:
        metrics = evaluate(model, data, trigger, target, batch, "fp32")
        if spec.get("precision") == "bf16":
            low = evaluate(model, data, trigger, target, batch, "bf16", routing=False)
            metrics.update({f"{k}_bf16": low[k] for k in ("ba", "asr", "ra") if k in low})
        return JobOutput({**metrics, **classes})
    # planned as n/a when the data set declares its shape; this is the fallback for those that do not
    reason = applicability.quant_not_applicable(quant, applicability.model_capabilities(model), spec["model"]["name"])
    if reason is not None:
        return JobOutput({"not_applicable": reason})
    config = QuantConfig.from_dict({k: v for k, v in quant.items() if k != "label"})
    if config.backend == "fake":
        with quantized(model, config):
            metrics = evaluate(model, data, trigger, target, batch, "fp32")
        return JobOutput({**metrics, **classes})
    # a real integer back-end: its runner (calibrated on clean training images) stands in for the model;
    # it has no forward_routing, so the metrics are BA / ASR / RA without routing metrics
    from bench.quant import backends

    runner = backends.prepare(model, config, backends.calibration_images(data.train_x, config.calibration))
    metrics = evaluate(backends.RunnerModule(runner), data, trigger, target, batch, "fp32")
    return JobOutput({**metrics, **classes, "backend_prepare_seconds": getattr(runner, "prepare_seconds", None)})


def run_defend(spec: dict[str, Any], deps: tuple[str, ...], ctx: JobContext) -> JobOutput:
    """Apply a defense to a stored attacked model (never retraining the attack); keep every stage.

    The defense gets what its threat model (``sees``) names and nothing else: the attacked model's weights
    (``model``; else a fresh model initialised as the attacked one was), the defender's clean share
    (``clean``) and the poisoned training set, rebuilt exactly as the attacked model was trained on it
    (``poisoned``; not applicable to qcb-objective attacks, whose training data is no poisoned set)."""
    from bench.defenses.base import DEFAULT_SEES, DefenseContext, check_sees, sees_label

    data = ctx.dataset(spec["dataset"])
    model = build_model(spec["model"], data).to(ctx.device)
    model.load_state_dict(ctx.store.load_state(deps[0]))
    params = {k: v for k, v in spec["defense"].items() if k != "name"}
    name = spec["defense"]["name"]
    defense = REGISTRY.get("defense", name).create(**params)
    sees = check_sees(name, getattr(defense, "sees", DEFAULT_SEES))
    reason = applicability.defense_not_applicable(spec["defense"], applicability.model_capabilities(model),
                                                  spec["model"]["name"])
    attack = spec["attack"]
    reason = reason or applicability.defense_attack_not_applicable(spec["defense"], attack)
    if reason is not None:  # the run-time fallback of the planner's check (data sets without declared shape)
        return JobOutput({"not_applicable": reason})

    def fresh_model() -> BenchModel:
        torch.manual_seed(spec["seed"])  # as run_train initialises the attacked model
        return build_model(spec["model"], data).to(ctx.device)

    trigger = build_trigger(attack, model) if attack else None
    restore_trigger(trigger, ctx.store, deps[0])
    if "model" not in sees:
        model = fresh_model()
    clean_x, clean_y = defender_data(data, params.get("budget", 0.05) if "clean" in sees else 0.0, spec["seed"])
    augment = data.augment if spec["train"]["augment"] == "auto" else spec["train"]["augment"]
    dctx = DefenseContext(
        clean_x=clean_x, clean_y=clean_y, train_cfg=spec["train"], seed=spec["seed"],
        num_classes=data.num_classes, augment=augment, on_epoch=ctx.on_epoch,
        trigger=trigger, target=attack["target"] if attack else None,
        test_x=data.test_x, test_y=data.test_y, defense=name, sees=sees,
        poisoned=poisoned_training_data(spec, data, trigger) if "poisoned" in sees else None,
        fresh_model=fresh_model,
    )
    out = JobOutput({"n_defender": int(len(clean_y)), "sees": sees_label(sees)})
    for stage in defense.run(model, dctx):
        out.metrics[stage.name] = stage.metrics
        if stage.state is not None:
            out.stages[stage.name] = stage.state
    return out


def poisoned_training_data(spec: dict[str, Any], data: TensorData, trigger: Trigger | None) -> PoisonedData:
    """The training set the attacked model of ``spec`` saw, rebuilt with :func:`run_train`'s call (same
    trigger, target, rate, mode and seed), and the mask of its truly poisoned samples (none for a clean
    model). Not for qcb-objective attacks (their data comes from ``prepare_qcb``). A learned trigger (restored)
    trained on batches it triggered itself: the defender then sees the seeded poisoned indices carrying the trained
    trigger, the set its trained generator would publish (BackdoorBench's habit for input-aware)."""
    from bench.defenses.base import PoisonedData

    x, y, attack = data.train_x, data.train_y, spec["attack"]
    truth = torch.zeros(len(y), dtype=torch.bool, device=y.device)
    if attack is None or trigger is None:
        return PoisonedData(x, y, truth)
    poisoned = poison_training_set(x, y, trigger, attack["target"], spec["poison_rate"], spec["seed"],
                                   mode=attack.get("mode", "dirty"), num_classes=data.num_classes)
    truth[poisoned.indices.to(y.device)] = True
    return PoisonedData(poisoned.x, poisoned.y, truth)


def defender_data(data: TensorData, budget: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The defender's clean data: a ``budget`` fraction of the clean training set, drawn with ``seed``
    (none for budget 0: a defense whose threat model holds no clean data)."""
    n = max(1, round(budget * len(data.train_y))) if budget > 0 else 0
    gen = torch.Generator().manual_seed(10_007 + seed)
    idx = torch.randperm(len(data.train_y), generator=gen)[:n].to(data.train_x.device)
    return data.train_x[idx], data.train_y[idx]


def qat_config(train: dict[str, Any]) -> QuantConfig:
    """The QAT setting of a resolved train spec."""
    return QuantConfig(
        bits=train["qat_bits"], scope=train["qat_scope"], granularity=train["qat_granularity"],
        symmetric=train["qat_symmetric"],
    )


def _no_op() -> None:
    return None


RUNNERS: dict[str, Callable[[Job, JobContext], JobOutput]] = {
    "train": lambda job, ctx: run_train(job.runnable_spec(), ctx),
    "evaluate": lambda job, ctx: run_evaluate(job.spec, job.deps, ctx),
    "defend": lambda job, ctx: run_defend(job.runnable_spec(), job.deps, ctx),
}


def run_job(job: Job, ctx: JobContext) -> JobOutput:
    """Dispatch a job to the function of its kind.

    A job whose input failed or was not applicable inherits that outcome without running. A job that
    fails (:class:`JobFailed`: a diverged loss; or out of memory) returns ``{"failed": reason, ...}``
    metrics: the executor records it like any finished job, so the rest of the matrix still runs and
    a resume does not repeat it (``bench run --retry-failed`` does)."""
    inherited = inherited_outcome(job, ctx.store)
    if inherited is not None:
        return JobOutput(inherited)
    try:
        return RUNNERS[job.kind](job, ctx)
    except JobFailed as exc:
        return JobOutput({"failed": exc.reason, **exc.details})
    except torch.OutOfMemoryError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "out of memory"
        return JobOutput({"failed": f"out of memory on {ctx.device}: {first}"})


def inherited_outcome(job: Job, store: Store) -> dict[str, Any] | None:
    """``{"failed": ...}`` or ``{"not_applicable": ...}`` when an input of ``job`` ended so, else None."""
    for dep in job.deps:
        record = store.get(dep)
        if record is None:
            continue
        if "failed" in record.metrics:
            return {"failed": f"input job {dep} failed: {record.metrics['failed']}", "failed_input": dep}
        if "not_applicable" in record.metrics:
            return {"not_applicable": record.metrics["not_applicable"]}
    return None


def job_status(metrics: dict[str, Any]) -> str:
    """``failed``, ``n/a`` or ``ok``: how a recorded job ended."""
    if "failed" in metrics:
        return "failed"
    if "not_applicable" in metrics:
        return "n/a"
    return "ok"

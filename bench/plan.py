"""From a resolved scenario to a job graph: cells, content-hashed jobs, dedup, clean baselines, cost.

A *cell* is one point of the matrix (dataset x model x attack x poison rate x seed x train setting, and
later quantization config and defense). A *job* is a unit of work with a fully resolved spec; its id is a
hash of its kind, spec and inputs, so two cells that need the same training share one job, a finished
job is never recomputed, and changing one parameter reruns only the jobs whose spec it touches.

Graph: ``train -> evaluate`` and ``train -> defend -> evaluate`` (one evaluation per defense stage that
produces a model, e.g. fine-pruning's "pruned" and "finetuned"), every evaluation at every quantization
config. Every (dataset, model, seed, train setting) also gets a clean training job
(no attack), added by the planner, so CAD can be computed.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import json
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from bench import applicability
from bench.errors import ScenarioError
from bench.precision import hardware_key, quantization_aware, resolve_channels_last, resolve_precision
from bench.registry import REGISTRY
from bench.scenario import SPEED_ONLY_TRAIN_KEYS, ResolvedScenario

JOB_SCHEMA_VERSION = 1

# Train settings that only affect evaluation; kept out of training specs so changing them retrains nothing.
EVAL_ONLY_TRAIN_KEYS = frozenset({"eval_batch_size"})
# Train settings that only affect speed (bench.scenario.SPEED_ONLY_TRAIN_KEYS): never in any job's spec; the
# train and defend jobs carry them as ``Job.settings`` and record them with their environment.
NOT_IN_TRAINING_SPEC = EVAL_ONLY_TRAIN_KEYS | SPEED_ONLY_TRAIN_KEYS

# Training-set sizes of the built-in data sets, for the cost estimate only (no data is loaded to plan).
TRAIN_SIZE_HINT = {"digits": 1437, "mnist": 60000, "fashion-mnist": 60000, "cifar10": 50000, "gtsrb": 39209}


def job_id(
    kind: str, spec: dict[str, Any], deps: tuple[str, ...], memo: dict[int, tuple[Any, str]] | None = None
) -> str:
    """Content hash of a job: same kind, spec and inputs -> same id, whatever scenario asked for it.

    The hashed text is ``json.dumps({"deps", "kind", "spec", "v"}, sort_keys=True)``; ``memo`` caches the
    serialisation of component dicts shared by many jobs (keyed by object id, valid while they live), so
    planning a matrix of 100k jobs serialises each component once.
    """
    return _hashed(kind, job_spec_text(spec, memo), deps)


def job_spec_text(spec: dict[str, Any], memo: dict[int, tuple[Any, str]] | None = None) -> str:
    """The spec's sorted ``"key": value`` JSON pairs, without the braces."""
    return ", ".join(f"{_STR(k)}: {_canonical(spec[k], memo)}" for k in sorted(spec))


def _hashed(kind: str, spec_text: str, deps: tuple[str, ...]) -> str:
    """The job id of a spec already serialised (its sorted ``"key": value`` pairs, without braces)."""
    deps_text = ", ".join(_STR(d) for d in deps)
    payload = f'{{"deps": [{deps_text}], "kind": {_STR(kind)}, "spec": {{{spec_text}}}, "v": {JOB_SCHEMA_VERSION}}}'
    return f"{kind[:2]}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


_STR = json.encoder.encode_basestring_ascii  # what json.dumps does with a str, in C


def _canonical(value: Any, memo: dict[int, tuple[Any, str]] | None) -> str:
    """``json.dumps(value, sort_keys=True)``, with fast paths for scalars and memoised containers."""
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    kind = type(value)
    if kind is str:
        return _STR(value)
    if kind is int:
        return int.__repr__(value)
    if kind is float:
        return json.dumps(value)
    if memo is None or not isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, default=str)
    hit = memo.get(id(value))
    if hit is None or hit[0] is not value:
        # the memo holds the value itself, so its id cannot be reused by another object while the memo lives
        hit = memo[id(value)] = (value, json.dumps(value, sort_keys=True, default=str))
    return hit[1]


@dataclass(frozen=True)
class Job:
    """A unit of work: ``kind`` selects the function, ``spec`` is everything it needs that can change its
    result (the id hashes it); ``settings`` how fast to compute it (``channels_last``, ``compile``: not hashed,
    merged into ``spec["train"]`` when the job runs)."""

    id: str
    kind: str
    spec: dict[str, Any]
    deps: tuple[str, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict, compare=False)

    def runnable_spec(self) -> dict[str, Any]:
        """The spec a runner reads: ``spec`` with ``settings`` merged into its ``train`` (when it has one)."""
        if not self.settings or "train" not in self.spec:
            return self.spec
        return {**self.spec, "train": {**self.spec["train"], **self.settings}}


@dataclass(slots=True)
class Cell:
    """One point of the matrix and the jobs that answer it."""

    dataset: dict[str, Any]
    model: dict[str, Any]
    attack: dict[str, Any] | None
    poison_rate: float | None
    seed: int
    train: dict[str, Any]
    train_job: str
    eval_job: str
    clean_eval_job: str
    quant: dict[str, Any] | None = None
    defense: dict[str, Any] | None = None
    base_eval_job: str | None = None  # the same attacked model before the defense (for DER)
    #: why this cell cannot run (planned without a job: its own job ids are empty), None when it can
    not_applicable: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A shallow dict (component specs are shared, not copied: cells of a large matrix are many)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class Plan:
    """Jobs in dependency order (every job after its inputs) and the cells they answer."""

    name: str
    jobs: list[Job] = field(default_factory=list)
    cells: list[Cell] = field(default_factory=list)
    #: one entry per defend job (dataset, model, attack, rate, seed, defense, job id): detection metrics
    defenses: list[dict[str, Any]] = field(default_factory=list)
    #: the hardware the ``auto`` settings were resolved for (:func:`bench.precision.hardware_key`)
    hardware: str = ""

    def by_id(self) -> dict[str, Job]:
        return {job.id: job for job in self.jobs}

    def pending(self, done: set[str]) -> list[Job]:
        return [job for job in self.jobs if job.id not in done]

    def summary(self, done: set[str]) -> dict[str, Any]:
        """Counts for ``bench plan``: cells, jobs by kind, which are done, and a rough cost."""
        kinds: dict[str, dict[str, int]] = {}
        for job in self.jobs:
            k = kinds.setdefault(job.kind, {"total": 0, "done": 0})
            k["total"] += 1
            k["done"] += job.id in done
        pending_images = sum(train_images(job.spec) for job in self.jobs if job.kind == "train" and job.id not in done)
        reasons = Counter(c.not_applicable for c in self.cells if c.not_applicable)
        reasons.update(d["not_applicable"] for d in self.defenses if d.get("not_applicable")
                       and not defense_stages(d["defense"]["name"]))  # detection-only: no cell shows it
        return {
            "scenario": self.name,
            "cells": len(self.cells),
            "not_applicable": sum(reasons.values()),
            "not_applicable_reasons": dict(reasons.most_common()),
            "jobs": kinds,
            "pending_jobs": sum(1 for job in self.jobs if job.id not in done),
            "pending_training_images": pending_images,
        }


def train_images(spec: dict[str, Any]) -> int:
    """Images a training job pushes through the model (epochs x training-set size), for cost estimates."""
    dataset = spec["dataset"]
    size = TRAIN_SIZE_HINT.get(dataset["name"], 50000)
    if dataset.get("train_limit"):
        size = min(size, int(dataset["train_limit"]))
    return int(spec["train"]["epochs"]) * size


def build(resolved: ResolvedScenario, device: torch.device | None = None) -> Plan:
    """Expand the scenario's matrix into cells and deduplicated jobs, after checking every combination
    that can be checked without data (:mod:`bench.applicability`): mistakes raise :class:`ScenarioError`
    naming the file and field, combinations that cannot run become not-applicable cells without jobs.

    ``device``: where the jobs will run, for ``precision: auto`` and ``channels_last: auto``
    (:mod:`bench.precision`); None = the scenario's ``device`` on this machine."""
    if device is None:
        device = planning_device(resolved.scenario.device)
    try:
        geometries = _geometries(resolved)
    except ScenarioError as exc:
        raise ScenarioError(f"{resolved.source}: {exc}") from None
    # A big matrix creates ~10^5 cells and jobs and no reference cycles: the cyclic collector's passes over
    # them would be a third of the time, so it waits until the plan is built.
    enabled = gc.isenabled()
    gc.disable()
    try:
        plan = _build(resolved, geometries, device)
        plan.hardware = hardware_key(device)
        return plan
    finally:
        if enabled:
            gc.enable()


@dataclass
class _PairChecks:
    """What applies to one data set x model: n/a reasons per attack, quant config and defense (None = runs)."""

    attacks: list[str | None]
    quant: list[str | None]
    defenses: list[str | None]
    capabilities: frozenset[str] | None = None  # None: the data set declares no shape (checked at run time)


def _geometries(resolved: ResolvedScenario) -> dict[tuple[int, int], _PairChecks]:
    """Check every data set x model x attack / quant config / defense; n/a reasons per pair."""
    origins = resolved.origins
    out: dict[tuple[int, int], _PairChecks] = {}
    for di, dataset in enumerate(resolved.datasets):
        for mi, model in enumerate(resolved.models):
            where = f"models[{origin_of(origins, 'models', mi)}]"
            geo = applicability.geometry(dataset, model, where)
            if geo is None:  # a data set that declares no shape: checked when it is loaded
                out[(di, mi)] = _PairChecks([None] * len(resolved.attacks), [None] * len(resolved.quant),
                                            [None] * len(resolved.defenses))
                continue
            attacks = []
            d_where = f"datasets[{origin_of(origins, 'datasets', di)}]"
            on = f" (on {where} '{model['name']}' with {d_where} '{dataset['name']}')"
            for ai, attack in enumerate(resolved.attacks):
                a_where = f"attacks[{origin_of(origins, 'attacks', ai)}]"
                if attack["target"] is not None:  # None: an all-to-all attack, which has no target
                    applicability.check_target(attack, geo, dataset["name"], a_where)
                attacks.append(applicability.attack_not_applicable(attack, geo, model["name"], a_where, on))
            caps = geo.capabilities
            quant = [applicability.quant_not_applicable(q, caps, model["name"]) for q in resolved.quant]
            defenses = [applicability.defense_not_applicable(d, caps, model["name"]) for d in resolved.defenses]
            out[(di, mi)] = _PairChecks(attacks, quant, defenses, geo.capabilities)
    return out


def origin_of(origins: dict[str, list[int]], field: str, index: int) -> int:
    """The index in the scenario file of the entry the ``index``-th resolved component of ``field`` came from."""
    found = origins.get(field)
    return found[index] if found and index < len(found) else index


def planning_device(requested: str) -> torch.device:
    """The device a scenario's ``device`` names on this machine (``auto``: CUDA when present, else CPU);
    a name torch does not know plans as CPU (the run itself reports it)."""
    from bench.train import resolve_device

    try:
        return resolve_device(requested)
    except RuntimeError:
        return torch.device("cpu")


def _training(train: dict[str, Any], attack: dict[str, Any] | None, device: torch.device
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """A train setting as one training job's spec (``precision`` resolved, evaluation-only and speed-only
    keys out) and its speed settings (``channels_last`` resolved, ``compile``)."""
    fit = {k: v for k, v in train.items() if k not in NOT_IN_TRAINING_SPEC}
    fit["precision"] = resolve_precision(train["precision"], device, quantization_aware(train, attack))
    settings = {"channels_last": resolve_channels_last(train["channels_last"], device),
                "compile": bool(train["compile"])}
    return fit, settings


def _build(resolved: ResolvedScenario, checks: dict[tuple[int, int], _PairChecks], device: torch.device) -> Plan:
    plan = Plan(resolved.name)
    jobs: dict[str, Job] = {}
    memo: dict[int, tuple[Any, str]] = {}

    def add(kind: str, spec: dict[str, Any], deps: tuple[str, ...] = (),
            settings: dict[str, Any] | None = None) -> str:
        jid = job_id(kind, spec, deps, memo)
        jobs.setdefault(jid, Job(jid, kind, spec, deps, settings or {}))
        return jid

    quant_texts = [_canonical(None if q["label"] == "fp32" else q, memo) for q in resolved.quant]
    evals: dict[tuple[Any, ...], list[str]] = {}

    def evaluations(source: str, attack: dict[str, Any] | None, stage: str | None, dataset: dict[str, Any],
                    model: dict[str, Any], train: dict[str, Any], quant_na: list[str | None]) -> list[str]:
        """The evaluation job of ``source`` (a trained or defended model) at every quant config, in order
        ("" where the config is not applicable to the model).

        A big matrix has ~100k of them; those of one model share their hashed text up to the spec's "quant"
        key (keys sort), so each one hashes only its quant config and stage (the ids job_id gives)."""
        key = (source, stage, train["eval_batch_size"], train["precision"])
        if key in evals:
            return evals[key]
        head_spec = _eval_spec(dataset, model, attack, train, resolved.quant[0])
        assert max(k for k in head_spec if k != "quant") < "quant" < "stage", "the id shortcut needs these keys"
        head = job_spec_text({k: v for k, v in head_spec.items() if k < "quant"}, memo)
        prefix = hashlib.sha256(f'{{"deps": [{_STR(source)}], "kind": "evaluate", "spec": {{{head}'.encode())
        tail = (f', "stage": {_STR(stage)}' if stage is not None else "") + f'}}, "v": {JOB_SCHEMA_VERSION}}}'
        ids = []
        for quant, quant_text, na in zip(resolved.quant, quant_texts, quant_na, strict=True):
            if na is not None:
                ids.append("")
                continue
            digest = prefix.copy()
            digest.update(f', "quant": {quant_text}{tail}'.encode())
            jid = f"ev-{digest.hexdigest()[:16]}"
            if jid not in jobs:
                spec = _eval_spec(dataset, model, attack, train, quant)
                if stage is not None:
                    spec["stage"] = stage
                jobs[jid] = Job(jid, "evaluate", spec, (source,))
            ids.append(jid)
        evals[key] = ids
        return ids

    scenario = resolved.scenario
    attacks: list[tuple[dict[str, Any] | None, float | None]] = [(None, None)]
    attacks += [(attack, rate) for attack in resolved.attacks for rate in scenario.poison_rates]
    stages = {d["name"]: defense_stages(d["name"]) for d in resolved.defenses}
    attack_index = {id(a): i for i, a in enumerate(resolved.attacks)}
    defended_jobs: set[str] = set()
    # per train setting: its training spec and speed settings for plain and quantization-aware training
    # (which resolve precision: auto differently), built once so the planner's memo serialises each once
    trainings = {}
    for scenario_train in resolved.train:
        (fit, settings), (qa_fit, qa_settings) = (_training(scenario_train, None, device),
                                                  _training(scenario_train, {"objective": True}, device))
        shown = {**scenario_train, "precision": fit["precision"], "channels_last": settings["channels_last"]}
        trainings[id(scenario_train)] = (fit, settings, shown, qa_fit, qa_settings,
                                         {**shown, "precision": qa_fit["precision"]})
    for (di, dataset), (mi, model), scenario_train, seed in itertools.product(
        enumerate(resolved.datasets), enumerate(resolved.models), resolved.train, scenario.seeds
    ):
        pair = checks[(di, mi)]
        fit, settings, train, qa_fit, qa_settings, qa_train = trainings[id(scenario_train)]
        train_na = applicability.train_not_applicable(fit, pair.capabilities, model["name"])
        if train_na is not None:  # e.g. QAT of the experts of a dense model: nothing of this setting runs
            for attack, rate in attacks:
                _not_applicable_cells(plan, resolved, stages, dataset, model, attack, rate, seed, train,
                                      [""] * len(resolved.quant), train_na)
            continue
        base = {"dataset": dataset, "model": model, "train": fit, "seed": seed}
        clean_train = add("train", {**base, "attack": None, "poison_rate": None}, settings=settings)
        clean_evals = evaluations(clean_train, None, None, dataset, model, train, pair.quant)
        qa_base = {**base, "train": qa_fit}
        for attack, rate in attacks:
            attack_na = None if attack is None else pair.attacks[attack_index[id(attack)]]
            if attack_na is not None:  # planned as n/a: no training, no evaluation, no defense
                _not_applicable_cells(plan, resolved, stages, dataset, model, attack, rate, seed, train,
                                      clean_evals, attack_na)
                continue
            aware = attack is not None and quantization_aware(fit, attack)
            job_base, job_train, job_settings = (qa_base, qa_train, qa_settings) if aware else (base, train, settings)
            train_job = (
                clean_train if attack is None
                else add("train", {**job_base, "attack": attack, "poison_rate": rate}, settings=job_settings)
            )
            trained_evals = evaluations(train_job, attack, None, dataset, model, job_train, pair.quant)
            for quant, own, clean, na in zip(resolved.quant, trained_evals, clean_evals, pair.quant, strict=True):
                plan.cells.append(Cell(dataset, model, attack, rate, seed, train, train_job if na is None else "",
                                       own, clean, quant, not_applicable=na))
            if attack is None and not scenario.defend_clean:
                continue
            for defense, model_na in zip(resolved.defenses, pair.defenses, strict=True):
                defense_na = model_na or applicability.defense_attack_not_applicable(defense, attack)
                entry = {"dataset": dataset, "model": model, "attack": attack, "poison_rate": rate, "seed": seed,
                         "train": train, "defense": defense, "job": ""}
                if defense_na is None:
                    defend_job = add("defend", {**job_base, "attack": attack, "poison_rate": rate, "defense": defense},
                                     (train_job,), job_settings)
                    if defend_job not in defended_jobs:  # train grids over evaluation-only keys share it
                        defended_jobs.add(defend_job)
                        plan.defenses.append({**entry, "job": defend_job})
                else:  # listed so the detection table can show it n/a (a detection-only defense has no cell)
                    plan.defenses.append({**entry, "not_applicable": defense_na})
                for stage in stages[defense["name"]]:
                    staged = {**defense, "stage": stage}
                    if defense_na is not None:
                        for quant, clean, before in zip(resolved.quant, clean_evals, trained_evals, strict=True):
                            plan.cells.append(Cell(dataset, model, attack, rate, seed, train, "", "", clean, quant,
                                                   staged, before, not_applicable=defense_na))
                        continue
                    defended = evaluations(defend_job, attack, stage, dataset, model, job_train, pair.quant)
                    for quant, own, clean, before, na in zip(
                        resolved.quant, defended, clean_evals, trained_evals, pair.quant, strict=True
                    ):
                        plan.cells.append(Cell(dataset, model, attack, rate, seed, train,
                                               train_job if na is None else "", own, clean, quant, staged, before,
                                               not_applicable=na))
    order = {"train": 0, "defend": 1, "evaluate": 2}
    plan.jobs = sorted(jobs.values(), key=lambda j: order.get(j.kind, 9))
    return plan


def _not_applicable_cells(plan: Plan, resolved: ResolvedScenario, stages: dict[str, tuple[str, ...]],
                          dataset: dict[str, Any], model: dict[str, Any], attack: dict[str, Any],
                          rate: float | None, seed: int, train: dict[str, Any], clean_evals: list[str],
                          reason: str) -> None:
    """The cells of an attack that cannot apply to the model: every quant config and defense stage, n/a."""
    for quant, clean in zip(resolved.quant, clean_evals, strict=True):
        plan.cells.append(Cell(dataset, model, attack, rate, seed, train, "", "", clean, quant,
                               not_applicable=reason))
        for defense in resolved.defenses:
            for stage in stages[defense["name"]]:
                plan.cells.append(Cell(dataset, model, attack, rate, seed, train, "", "", clean, quant,
                                       {**defense, "stage": stage}, "", not_applicable=reason))


def defense_stages(name: str) -> tuple[str, ...]:
    """The stages of a defense that produce a model to evaluate (declared by the defense class)."""
    return tuple(getattr(REGISTRY.get("defense", name).factory, "stages", ()))


def _eval_spec(
    dataset: dict[str, Any],
    model: dict[str, Any],
    attack: dict[str, Any] | None,
    train: dict[str, Any],
    quant: dict[str, Any],
) -> dict[str, Any]:
    return {
        "dataset": dataset,
        "model": model,
        "attack": attack,
        "quant": None if quant["label"] == "fp32" else quant,
        "eval_batch_size": train["eval_batch_size"],
        "precision": train["precision"],
    }

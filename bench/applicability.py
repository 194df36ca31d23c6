"""What can run, decided before anything runs: checks and not-applicable cells from declarations only.

The planner asks this module, for every data set x model of a scenario, what the pair looks like (the data
set's declared input shape and classes, the model's patch grid and parameter groups, read from a model
built on the CPU without data), then for every attack, quantization config and defense whether it
applies. Two outcomes besides "fine":

* a **mistake** (an attack target that is not a class, a ``topk`` larger than the patch grid, a trigger
  bigger than the image or turning it into a constant): :class:`ScenarioError`, naming the file and the
  field path (``models[0].topk``), so ``bench plan`` refuses what ``bench run`` would refuse;
* **not applicable** (BadPatches on a model without a patch grid, a routing defense or a gate/experts
  quantization scope on a dense model): the cell is planned as ``n/a`` with a one-line reason and no job.

Components declare what they need as data: a defense class's ``requires`` (a set of model capabilities,
see :data:`CAPABILITIES`), a trigger class's ``requires``; plugins get the same treatment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from bench.data.info import DatasetInfo, declared_info
from bench.errors import BenchError, ScenarioError
from bench.registry import REGISTRY

#: Model capabilities a component may require: ``routing`` (a patch grid and ``forward_routing``),
#: ``gate`` / ``experts`` (non-empty parameter groups), ``prunable`` (layers fine-pruning can prune).
CAPABILITIES = ("routing", "gate", "experts", "prunable")


@dataclass(frozen=True)
class Geometry:
    """A model on a data set, as far as planning needs it."""

    info: DatasetInfo
    patch_grid: tuple[int, int] | None
    capabilities: frozenset[str]


def geometry(dataset: dict[str, Any], model: dict[str, Any], where: str) -> Geometry | None:
    """The geometry of ``model`` on ``dataset`` (None when the data set declares no info: checked at run
    time instead); a model that cannot be built for this input is a mistake named by ``where``."""
    params = {k: v for k, v in dataset.items() if k != "name"}
    info = declared_info(REGISTRY.get("dataset", dataset["name"]).factory, params)
    if info is None:
        return None
    channels = info.input_shape[0]
    try:
        with torch.random.fork_rng(devices=[]):  # building initialises weights: keep the caller's RNG as it was
            built = REGISTRY.get("model", model["name"]).create(
                input_shape=info.input_shape, num_classes=info.num_classes, mean=(0.5,) * channels,
                std=(0.25,) * channels, **{k: v for k, v in model.items() if k != "name"},
            )
    except BenchError as exc:
        raise ScenarioError(_model_message(str(exc), model, dataset, info, where)) from None
    grid = tuple(int(g) for g in built.patch_grid) if built.patch_grid is not None else None
    return Geometry(info, grid, model_capabilities(built))  # type: ignore[arg-type]


def model_capabilities(model: Any) -> frozenset[str]:
    """What a built model offers, of :data:`CAPABILITIES` (the planner's and the jobs' one definition)."""
    groups = model.parameter_groups()
    capabilities = {name for name in ("gate", "experts") if groups.get(name)}
    if model.patch_grid is not None:
        capabilities.add("routing")
    if _prunable(model):
        capabilities.add("prunable")
    return frozenset(capabilities)


def _prunable(model: Any) -> bool:
    for method in ("prunable_layers", "prunable_convs"):
        found = getattr(model, method, None)
        if callable(found):
            return bool(found())
    return False


def _model_message(msg: str, model: dict[str, Any], dataset: dict[str, Any], info: DatasetInfo, where: str) -> str:
    """``models[0].topk: must be in [1, 16] ... (on datasets[0] 'digits', 1x16x16)``: the field path when the
    model's message starts with one of its parameters, else the model's path."""
    shape = "x".join(map(str, info.input_shape))
    on = f" (with dataset '{dataset['name']}', input {shape})"
    field = re.match(r"([A-Za-z_][A-Za-z0-9_]*): ", msg)
    if field and field.group(1) in model:
        return f"{where}.{msg}{on}"
    return f"{where} ('{model['name']}'){on}: {msg}"


def check_target(attack: dict[str, Any], geo: Geometry, dataset_name: str, where: str) -> None:
    """An attack's target must be a class of the data set."""
    classes = geo.info.num_classes
    if attack["target"] >= classes:
        raise ScenarioError(f"{where}.target: {attack['target']} is not a class of dataset '{dataset_name}' "
                            f"(valid: 0..{classes - 1})")


def train_not_applicable(train: dict[str, Any], capabilities: frozenset[str] | None, model_name: str) -> str | None:
    """Why a train setting cannot apply to this model (QAT of a scope the model does not have)."""
    scope = train.get("qat_scope", "whole")
    if capabilities is None or not train.get("qat_bits") or scope == "whole" or scope in capabilities:
        return None
    return f"train.qat_scope '{scope}' needs a model with {scope} parameters ('{model_name}' has none)"


def attack_not_applicable(attack: dict[str, Any], geo: Geometry, model_name: str, where: str,
                          on: str = "") -> str | None:
    """Why ``attack`` cannot apply to this model (an n/a cell), None when it can; a degenerate or oversized
    trigger is a mistake (:class:`ScenarioError`)."""
    if attack["apply"] == "badpatches" and attack.get("trigger_grid") is None and geo.patch_grid is None:
        return (f"badpatches applies the trigger per patch of the routing grid, and model '{model_name}' has "
                "none (set trigger_grid to use fixed patches)")
    objective = attack.get("objective") or {}
    scope = objective.get("scope", "whole")
    if scope != "whole" and scope not in geo.capabilities:
        return f"the qcb objective's scope '{scope}' needs a model with {scope} parameters ('{model_name}' has none)"
    for need in sorted(_requires(REGISTRY.get("trigger", attack["name"]).factory)):
        if need not in geo.capabilities:
            return f"trigger '{attack['name']}' needs a model with {need} ('{model_name}' has none)"
    declared = getattr(REGISTRY.get("trigger", attack["name"]).factory, "attack_not_applicable", None)
    reason = declared(attack) if callable(declared) else None  # the trigger's own word (Trigger contract)
    if reason is not None:
        return reason
    problem = _trigger_problem(attack, geo)
    if problem is not None:
        raise ScenarioError(f"{where}: {problem}{on}")
    return None


def _trigger_problem(attack: dict[str, Any], geo: Geometry) -> str | None:
    try:
        from bench.attacks.checks import trigger_problem
    except ImportError:  # pragma: no cover - the checks module ships with the package
        return None
    return trigger_problem(attack, geo.info.input_shape, geo.patch_grid)


def quant_not_applicable(quant: dict[str, Any], capabilities: frozenset[str], model_name: str) -> str | None:
    """Why a PTQ config cannot apply: a gate or experts scope on a model without such parameters, or a
    real integer back-end asked for what it cannot run (:func:`bench.quant.backends.not_applicable`)."""
    scope = quant.get("scope", "whole")
    if quant.get("label") == "fp32":
        return None
    if scope != "whole" and scope not in capabilities:
        return f"quantization scope '{scope}' needs a model with {scope} parameters ('{model_name}' has none)"
    return _backend_not_applicable(quant)


def _backend_not_applicable(quant: dict[str, Any]) -> str | None:
    if quant.get("backend", "fake") == "fake":
        return None
    from bench.quant import QuantConfig
    from bench.quant.backends import not_applicable

    return not_applicable(QuantConfig.from_dict({k: v for k, v in quant.items() if k != "label"}))


def defense_not_applicable(defense: dict[str, Any], capabilities: frozenset[str], model_name: str) -> str | None:
    """Why a defense cannot apply to this model, from its declared requirements and, for a defense that
    quantizes (EFRAP), its ``scope`` parameter as quantization scopes read it."""
    for need in sorted(_requires(REGISTRY.get("defense", defense["name"]).factory)):
        if need not in capabilities:
            return f"defense '{defense['name']}' needs a model with {need} ('{model_name}' has none)"
    scope = defense.get("scope")
    if scope in ("gate", "experts") and scope not in capabilities:
        return (f"defense '{defense['name']}' with scope '{scope}' needs a model with {scope} parameters "
                f"('{model_name}' has none)")
    return None


def defense_attack_not_applicable(defense: dict[str, Any], attack: dict[str, Any] | None) -> str | None:
    """Why a defense cannot apply to the model of one attack: a defense that sees the poisoned training set
    (data inspection, training-time) has none to see when a qcb objective trained the model (it trains on
    clean data with its own loss); the same rule as :func:`bench.jobs.run_defend`'s."""
    sees = getattr(REGISTRY.get("defense", defense["name"]).factory, "sees", frozenset())
    if "poisoned" in sees and attack is not None and attack.get("objective"):
        return (f"defense '{defense['name']}' inspects or trains on the poisoned training set, and a qcb-objective "
                "attack trains on clean data with its own loss (prepare_qcb), not on a poisoned set")
    return None


def _requires(factory: Any) -> frozenset[str]:
    """A component's declared needs: ``requires`` (a set of :data:`CAPABILITIES`), or the older
    ``needs_routing = True``."""
    needs = set(getattr(factory, "requires", ()) or ())
    if getattr(factory, "needs_routing", False):
        needs.add("routing")
    return frozenset(needs)

"""Smoke runs: every kind of cell of a scenario, end to end, at toy scale (``bench run S --smoke``).

A GPU-sized scenario cannot run in CI, but every piece of it can: the same data sets (read from their
real on-disk formats), models, triggers, objectives, defenses and quantization configs, on a few hundred
images for one epoch. A smoke run is its own study (``<name>-smoke``: its own store and report) built in
two steps:

1. :func:`smoke_scenario` scales the scenario file down: the first seed, the highest poison rate, one
   epoch (enough for each phase of a qcb objective), at most :data:`TRAIN_IMAGES` training and
   :data:`TEST_IMAGES` test images per data set, one value of each kind from every grid (numbers
   collapse to the first; categories such as ``apply`` or a defense's criterion keep every value), each
   component's declared ``smoke`` parameters (e.g. Neural Cleanse's optimisation steps), and every
   ``epochs`` parameter at 1.
2. :func:`smoke_plan` keeps a covering subset of the planned cells: every model x train setting x attack
   (trigger, apply, objective) trained and evaluated at fp32 once, every data set x model at least once
   (its clean model comes along for CAD); each quantization config once per model for a clean, a poisoned
   and a qcb-trained model (the dormancy table's cells); each defense once per
   model, and each of its stages at fp32 and at one quantization config; every not-applicable cell (they
   cost nothing).
"""

from __future__ import annotations

import copy
import json
from typing import Any

from bench.errors import UnknownComponentError
from bench.plan import Cell, Plan
from bench.registry import REGISTRY
from bench.scenario import GRID_KEY

#: Training / test images per data set in a smoke run (data sets with ``train_limit`` / ``test_limit``).
TRAIN_IMAGES = 64
TEST_IMAGES = 16
SUFFIX = "-smoke"


def smoke_scenario(raw: dict[str, Any], data_root: str | None = None) -> dict[str, Any]:
    """The scenario file ``raw`` (a parsed YAML dict, not yet validated) at toy scale; ``data_root``
    replaces every data set's ``root`` (where the smoke test writes its small on-disk data sets)."""
    out = copy.deepcopy(raw)
    if isinstance(out.get("name"), str):
        out["name"] = out["name"] + SUFFIX
    if isinstance(out.get("seeds"), list) and out["seeds"]:
        out["seeds"] = out["seeds"][:1]
    rates = out.get("poison_rates")
    if isinstance(rates, list) and rates and all(isinstance(r, int | float) for r in rates):
        out["poison_rates"] = [max(rates)]
    if isinstance(out.get("report"), dict):
        # one seed in a smoke run; claims are about the real scale, a toy run can neither meet nor refute them
        out["report"] = {k: v for k, v in out["report"].items() if k not in ("min_seeds", "claims")}
    train = out.get("train") if isinstance(out.get("train"), dict) else {}
    train = _collapse(train)
    train["epochs"] = max([1, *(_objective_epochs(a) for a in _entries(out, "attacks"))])
    out["train"] = train
    for field, kind in (("models", "model"), ("datasets", "dataset"), ("defenses", "defense")):
        if field in out:
            out[field] = [_smoke_component(kind, entry) for entry in _entries(out, field)]
    if "attacks" in out:
        out["attacks"] = [_smoke_attack(entry) for entry in _entries(out, "attacks")]
    return with_data_root(out, data_root) if data_root is not None else out


def with_data_root(raw: dict[str, Any], data_root: str) -> dict[str, Any]:
    """``raw`` with every data set that has a ``root`` parameter reading from ``data_root``."""
    out = copy.deepcopy(raw)
    datasets = []
    for entry in _entries(out, "datasets"):
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            try:
                params = {p.name for p in REGISTRY.get("dataset", entry["name"]).params}
            except UnknownComponentError:  # validation reports it, with suggestions
                params = set()
            if "root" in params:
                entry = {**entry, "root": data_root}
        datasets.append(entry)
    if datasets:
        out["datasets"] = datasets
    return out


def _entries(raw: dict[str, Any], field: str) -> list[Any]:
    value = raw.get(field)
    return value if isinstance(value, list) else []


def _collapse(entry: dict[str, Any]) -> dict[str, Any]:
    """Every grid reduced to one value per kind: the first number, every distinct category."""
    out = dict(entry)
    for key, value in entry.items():
        if isinstance(value, dict) and set(value) == {GRID_KEY} and isinstance(value[GRID_KEY], list):
            kept: dict[str, Any] = {}
            for item in value[GRID_KEY]:
                kept.setdefault(_kind(item), item)
            values = list(kept.values())
            out[key] = values[0] if len(values) == 1 else {GRID_KEY: values}
    return out


def _kind(value: Any) -> str:
    """Values of one kind stand for each other in a smoke run (4 for 8 bits); categories do not."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, int | float):
        return "number"
    return json.dumps(value, sort_keys=True, default=str)


def _smoke_component(kind: str, entry: Any) -> Any:
    """One model / data set / defense entry at toy scale (unknown names are left for validation)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        return entry
    out = _collapse(entry)
    try:
        component = REGISTRY.get(kind, out["name"])
    except UnknownComponentError:  # validation reports it, with suggestions
        return out
    params = {p.name for p in component.params}
    if "train_limit" in params:
        out["train_limit"] = min(TRAIN_IMAGES, out.get("train_limit") or TRAIN_IMAGES)
    if "test_limit" in params:
        out["test_limit"] = min(TEST_IMAGES, out.get("test_limit") or TEST_IMAGES)
    if "epochs" in params:
        out["epochs"] = 1
    for key, value in (getattr(component.factory, "smoke", None) or {}).items():
        if key in params:
            out[key] = value
    return out


def _smoke_attack(entry: Any) -> Any:
    if not isinstance(entry, dict):
        return entry
    out = _smoke_component("trigger", entry)
    objective = out.get("objective")
    if isinstance(objective, dict):
        objective = _collapse(objective)
        if isinstance(objective.get("warmup_epochs"), int) and objective["warmup_epochs"] > 0:
            objective["warmup_epochs"] = 1
        if isinstance(objective.get("repair_from_epoch"), int):
            objective["repair_from_epoch"] = int(objective.get("warmup_epochs") or 0) + 1
        out["objective"] = objective
    return out


def _objective_epochs(entry: Any) -> int:
    """Epochs a smoke qcb objective needs so each of its phases (warm-up, attack, repair) runs once."""
    objective = entry.get("objective") if isinstance(entry, dict) else None
    if not isinstance(objective, dict):
        return 1
    warmup = 1 if isinstance(objective.get("warmup_epochs"), int) and objective["warmup_epochs"] > 0 else 0
    repair = 1 if isinstance(objective.get("repair_from_epoch"), int) else 0
    return warmup + 1 + repair


def smoke_plan(plan: Plan) -> Plan:
    """A covering subset of ``plan``'s cells (see the module doc) and exactly the jobs they need."""
    kept: list[Cell] = []
    seen: set[tuple[Any, ...]] = set()
    for cell in plan.cells:
        keys = _cover_keys(cell)
        if keys is None or not keys <= seen:
            kept.append(cell)
            seen |= keys or set()
    jobs = plan.by_id()
    needed: set[str] = set()
    stack = [jid for c in kept if not c.not_applicable  # an n/a cell needs no job (its others are elsewhere)
             for jid in (c.eval_job, c.clean_eval_job, c.base_eval_job) if jid]
    detections: set[str] = set()  # detection-only defenses (no stage to evaluate): one run per model too
    for entry in plan.defenses:
        if not entry["job"]:
            continue
        key = json.dumps([entry["model"], entry["defense"]], sort_keys=True)
        if key not in detections:
            detections.add(key)
            stack.append(entry["job"])
    while stack:
        jid = stack.pop()
        if jid in needed or jid not in jobs:
            continue
        needed.add(jid)
        stack.extend(jobs[jid].deps)
    out = Plan(plan.name, [job for job in plan.jobs if job.id in needed], kept, hardware=plan.hardware)
    out.defenses = [d for d in plan.defenses if d["job"] in needed or d.get("not_applicable")]
    return out


def _cover_keys(cell: Cell) -> set[tuple[Any, ...]] | None:
    """None for cells every smoke run keeps (n/a ones); else the kinds of cell it stands for: a cell is kept
    when one of them is not covered yet."""
    if cell.not_applicable:
        return None
    model = json.dumps(cell.model, sort_keys=True)
    if cell.defense is not None:
        return {("defense", model, json.dumps(cell.defense, sort_keys=True), _quant_label(cell) != "fp32")}
    if _quant_label(cell) != "fp32":  # clean, plainly poisoned and qcb models each at every config
        kind = "clean" if cell.attack is None else (cell.attack.get("objective") or {}).get("name", "poisoned")
        return {("quant", model, _quant_label(cell), kind)}
    attack = json.dumps([cell.attack, cell.train], sort_keys=True, default=str)
    return {("train", model, attack), ("dataset", json.dumps(cell.dataset, sort_keys=True), model)}


def _quant_label(cell: Cell) -> str:
    return str((cell.quant or {}).get("label", "fp32"))


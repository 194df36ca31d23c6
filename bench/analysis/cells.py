"""Which stored models an analysis looks at: a run's cells grouped into one attack setting each
(data set, model, attack, poison rate, seed) with its clean, backdoored and defended models, and how to
rebuild each model from the store.

Only full-precision cells count: a quantized evaluation reuses its model, so it adds no model to draw.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from bench.data.base import TensorData
from bench.errors import BenchError, StoreError
from bench.jobs import build_model
from bench.models.base import BenchModel
from bench.store import Store


@dataclass(frozen=True)
class ModelRef:
    """One model of a group: its label, the evaluation job that scored it and, where known, the job that
    stored its weights (``None`` for a defense stage, found through its evaluation's input)."""

    label: str
    eval_job: str
    train_job: str | None = None


@dataclass
class Group:
    """One attack setting and the models to compare on it (``attack`` None: a clean-only run)."""

    dataset: dict[str, Any]
    model: dict[str, Any]
    attack: dict[str, Any] | None
    poison_rate: float | None
    seed: int
    models: list[ModelRef] = field(default_factory=list)
    #: Added to :attr:`stem` when two groups of a run would otherwise share it.
    suffix: str = ""

    @property
    def title(self) -> str:
        if self.attack is None:
            what = "clean"
        else:
            a = self.attack
            what = f"{a['name']} ({a['apply']}) @ {self.poison_rate:g}, target {a['target']}"
        return f"{self.dataset['name']} / {self.model['name']}: {what}, seed {self.seed}"

    @property
    def stem(self) -> str:
        """A file-name stem naming the setting, e.g. ``digits-pmoe-badnets-image-r0.1-s0``."""
        what = "clean" if self.attack is None else (
            f"{self.attack['name']}-{self.attack['apply']}-r{self.poison_rate:g}"
        )
        return f"{self.dataset['name']}-{self.model['name']}-{what}-s{self.seed}{self.suffix}"


def is_full_precision(cell: dict[str, Any]) -> bool:
    quant = cell.get("quant")
    return quant is None or quant.get("label") == "fp32"


def select_groups(
    cells: Sequence[dict[str, Any]],
    *,
    dataset: str | None = None,
    model: str | None = None,
    attack: str | None = None,
    apply: str | None = None,
    rate: float | None = None,
    seed: int | None = None,
) -> list[Group]:
    """Groups of the full-precision ``cells`` matching every given filter, in the cells' order.

    A run without attacks gives one clean group per (data set, model, training, seed). A filter that
    matches nothing raises a :class:`BenchError` naming the option and the values the run holds.
    """
    cells = [c for c in cells if is_full_precision(c)]
    attacked = [c for c in cells if c["attack"] is not None]
    wanted = attacked if attacked or attack is not None or apply is not None or rate is not None else cells
    checks = [
        ("--dataset", dataset, lambda c: c["dataset"]["name"]),
        ("--model", model, lambda c: c["model"]["name"]),
        ("--attack", attack, lambda c: c["attack"]["name"] if c["attack"] else None),
        ("--apply", apply, lambda c: c["attack"]["apply"] if c["attack"] else None),
        ("--rate", rate, lambda c: c["poison_rate"]),
        ("--seed", seed, lambda c: c["seed"]),
    ]
    for option, value, get in checks:
        if value is None:
            continue
        kept = [c for c in wanted if _same(get(c), value)]
        if not kept:
            have = sorted({str(get(c)) for c in wanted if get(c) is not None}) or ["none"]
            raise BenchError(f"{option}: no stored model matches {value!r} (this run has: {', '.join(have)})")
        wanted = kept
    clean_train = {c["eval_job"]: c["train_job"] for c in cells if c["attack"] is None}
    groups: dict[str, Group] = {}
    defended: dict[str, list[dict[str, Any]]] = {}
    for cell in wanted:
        key = json.dumps([cell[k] for k in ("dataset", "model", "train", "seed", "attack", "poison_rate")],
                         sort_keys=True)
        group = groups.get(key)
        if group is None:
            group = groups[key] = Group(cell["dataset"], cell["model"], cell["attack"], cell["poison_rate"],
                                        cell["seed"])
            clean = cell["clean_eval_job"]
            group.models.append(ModelRef("clean", clean, clean_train.get(clean)))
            defended[key] = []
        if cell["attack"] is None:
            continue
        if cell.get("defense") is not None:
            defended[key].append(cell)
        elif all(m.eval_job != cell["eval_job"] for m in group.models):
            group.models.append(ModelRef("backdoored", cell["eval_job"], cell["train_job"]))
    for key, group in groups.items():
        group.models += _defense_refs(defended[key])
    _disambiguate(list(groups.items()))
    return list(groups.values())


def load_model(store: Store, ref: ModelRef, spec: dict[str, Any], data: TensorData,
               device: torch.device) -> BenchModel:
    """Rebuild ``ref``'s model (``spec``: the model spec) with its stored weights, in eval mode."""
    if ref.train_job is not None and store.get(ref.train_job) is not None:
        state = store.load_state(ref.train_job)
    else:
        record = store.get(ref.eval_job)
        if record is None:
            raise StoreError(f"{store.root}: model '{ref.label}' is not evaluated yet (job {ref.eval_job}); "
                             "finish the run with `bench run SCENARIO` first")
        state = store.load_state(record.deps[0], record.spec.get("stage"))
    model = build_model(spec, data).to(device)
    model.load_state_dict(state)
    return model.eval()


def _defense_refs(cells: list[dict[str, Any]]) -> list[ModelRef]:
    """One model per defense stage, labelled ``name stage`` plus the parameters that vary between the
    group's entries of that defense (a grid over ``rate``, say)."""
    varying: dict[str, set[str]] = {}
    by_name: dict[str, list[dict[str, Any]]] = {}
    for cell in cells:
        by_name.setdefault(cell["defense"]["name"], []).append(cell["defense"])
    for name, entries in by_name.items():
        keys = {k for d in entries for k in d if k not in ("name", "stage")}
        varying[name] = {k for k in keys if len({json.dumps(d.get(k), sort_keys=True) for d in entries}) > 1}
    refs: list[ModelRef] = []
    for cell in cells:
        d = cell["defense"]
        params = ", ".join(f"{k}={d[k]}" for k in sorted(varying[d["name"]]) if k in d)
        label = f"{d['name']} {d['stage']}" + (f" [{params}]" if params else "")
        if all(r.eval_job != cell["eval_job"] for r in refs):
            refs.append(ModelRef(label, cell["eval_job"]))
    return refs


def _disambiguate(groups: list[tuple[str, Group]]) -> None:
    """Settings whose stems collide (they differ in parameters the stem leaves out) get a short hash of
    their full setting appended."""
    seen: dict[str, int] = {}
    for _, group in groups:
        seen[group.stem] = seen.get(group.stem, 0) + 1
    for key, group in groups:
        if seen[group.stem] > 1:
            group.suffix = "-" + hashlib.sha256(key.encode()).hexdigest()[:6]


def _same(have: Any, want: Any) -> bool:
    if isinstance(want, float) and isinstance(have, (int, float)):
        return math.isclose(float(have), want, rel_tol=1e-9, abs_tol=1e-12)
    return have == want

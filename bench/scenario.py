"""Scenario files: the typed schema, loading with file-and-field errors, and grid expansion.

A scenario is one YAML file describing a whole study. Any component or training parameter may be a
declared grid, ``{grid: [a, b, c]}``, which expands into one concrete component per value (the
cartesian product when several parameters of one entry are grids). Everything is validated here, before
any work starts: the schema (pydantic, ``extra="forbid"``), then every concrete component against its
registered parameter schema, so a typo fails at load time and not in the middle of a run.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bench.errors import BenchError, ComponentParamsError, ScenarioError, UnknownComponentError
from bench.registry import REGISTRY

GRID_KEY = "grid"
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainSpec(_Strict):
    """How every model of the scenario is trained. Defaults follow the BadPatches paper (SGD, lr 0.1,
    batch 128, no decay). The pMoE reference script uses Keras' plain SGD (momentum 0, no weight decay);
    we default to the PyTorch CIFAR habit of momentum 0.9 and weight decay 5e-4, which the small
    quickstart model needs to reach 97-99% on digits in 8 epochs (80-85% with momentum 0). Set
    ``momentum: 0, weight_decay: 0`` to match the reference script exactly."""

    epochs: int = Field(8, ge=1)
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    augment: Literal["auto", "none", "crop", "crop_flip"] = "auto"
    #: ``auto``: bf16 autocast where the hardware computes bf16 natively, fp32 elsewhere and for
    #: quantization-aware training (:mod:`bench.precision`); resolved when the run is planned.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    #: speed-only (not in the job's identity): ``auto`` = on for CPU and CUDA.
    channels_last: bool | Literal["auto"] = "auto"
    compile: bool = False  # speed-only (not in the job's identity)
    eval_batch_size: int = Field(1024, ge=1)
    qat_bits: int | None = Field(None, ge=2, le=16)
    qat_scope: Literal["gate", "experts", "whole"] = "whole"
    qat_granularity: Literal["tensor", "channel"] = "tensor"
    qat_symmetric: bool = False

    @field_validator("channels_last", mode="before")
    @classmethod
    def _channels_last_choice(cls, value: Any) -> Any:
        """One message for the union (not one per member): the three values it takes."""
        if value is True or value is False or value == "auto":
            return value
        raise ValueError("must be true, false or auto")

    @model_validator(mode="after")
    def _qat_settings_only_with_qat(self) -> TrainSpec:
        """Without QAT the other qat_* fields mean nothing: reset them, so a grid such as
        ``qat_bits: {grid: [null, 4]}, qat_scope: {grid: [whole, experts]}`` trains the fp32 model once."""
        if self.qat_bits is None:
            self.qat_scope, self.qat_granularity, self.qat_symmetric = "whole", "tensor", False
        return self


class QuantizationSpec(_Strict):
    """The PTQ axis: every trained (and defended) model is evaluated at every combination, no retraining.

    ``bits`` takes integers 2..16 or ``fp32``; fp32 is always evaluated (it is the reference). ``backends``
    picks who computes the quantized numbers: ``fake`` (Eq. 2, the default) and/or real integer back-ends
    (``torch-x86``, ``onnxruntime``, ``torchao``: the ``deploy`` extra), each calibrated on ``calibration``
    clean training images (a fixed draw); see :mod:`bench.quant.backends`."""

    bits: list[int | Literal["fp32"]] = Field(default_factory=lambda: ["fp32"], min_length=1)
    scopes: list[Literal["gate", "experts", "whole"]] = Field(default_factory=lambda: ["whole"], min_length=1)
    granularity: list[Literal["tensor", "channel"]] = Field(default_factory=lambda: ["tensor"], min_length=1)
    symmetric: list[bool] = Field(default_factory=lambda: [False], min_length=1)
    activations: bool = False
    backends: list[Literal["fake", "torch-x86", "onnxruntime", "torchao"]] = Field(
        default_factory=lambda: ["fake"], min_length=1)
    calibration: int = Field(256, ge=1)

    @field_validator("backends")
    @classmethod
    def _backends_installed(cls, backends: list[str]) -> list[str]:
        """A real back-end whose packages are missing fails here, before planning, with the install command."""
        from bench.quant.backends import INSTALL_HINT, missing_packages

        if len(set(backends)) != len(backends):
            raise ValueError(f"each back-end once, got {backends}")
        for i, name in enumerate(backends):
            missing = missing_packages(name)
            if missing:
                raise ValueError(f"[{i}] '{name}' needs {', '.join(missing)}, not installed; install the deploy "
                                 f"extra: {INSTALL_HINT}")
        return backends

    def configs(self) -> list[dict[str, Any]]:
        """Every quantization config as a dict (with its label); fp32 first and only once; the fake configs
        in their usual order, then each real back-end's (duplicates, after a back-end's fixed settings, once)."""
        from bench.quant import QuantConfig

        out: dict[str, dict[str, Any]] = {"fp32": {**QuantConfig().to_dict(), "label": "fp32"}}
        for backend, bits, scope, gran, sym in itertools.product(
            self.backends, self.bits, self.scopes, self.granularity, self.symmetric
        ):
            extra = {} if backend == "fake" else {"backend": backend, "calibration": self.calibration}
            cfg = QuantConfig(bits=None if bits == "fp32" else bits, scope=scope, granularity=gran, symmetric=sym,
                              activations=self.activations, **extra)
            out.setdefault(cfg.label, {**cfg.to_dict(), "label": cfg.label})
        return list(out.values())


class ComponentEntry(BaseModel):
    """A component by registered name plus its parameters (checked against the registry later)."""

    model_config = ConfigDict(extra="allow")
    name: str


class AttackEntry(ComponentEntry):
    """A trigger-based poisoning attack: the trigger's name and parameters, plus how it is applied.

    ``apply: image`` stamps the trigger on the whole image; ``apply: badpatches`` applies it to every
    patch of a grid: the model's routing grid, or ``trigger_grid`` (``4`` = 4x4 patches, or ``[rows, cols]``;
    the BadPatches paper's text splits a 32x32 image into 16 patches of 8x8). ``target`` is the all-to-one
    target label (default 0). ``mode`` is how training images are poisoned (:mod:`bench.attacks.poison`):
    ``dirty`` (default: dirty-label all-to-one), ``clean-label`` (only target-class images, labels kept) or
    ``all-to-all`` (label y -> (y + 1) mod C; no ``target``). A dirty attack's resolved dict has no
    ``mode`` key, so the job ids of attacks written before modes existed stay the same.
    """

    target: int | dict[str, Any] | None = None
    mode: str | dict[str, Any] = "dirty"
    apply: Literal["image", "badpatches"] | dict[str, Any] = "image"
    trigger_grid: int | list[int] | dict[str, Any] | None = None
    objective: dict[str, Any] | None = None


class ReferenceValue(_Strict):
    """A published number for one cell, in percent as papers print them (matched on dataset, trigger
    name, apply mode and poison rate; ``model`` and the ``*params`` / ``train`` fields narrow the match; a
    row matching several cells is refused at plan time, naming the fields to add)."""

    dataset: str
    attack: str
    apply: Literal["image", "badpatches"] = "image"
    poison_rate: float = Field(gt=0, le=1)
    model: str | None = None
    #: narrow the match when several cells share the fields above: trigger parameters (with ``target`` and a
    #: nested ``objective``; ``objective: null`` = cells without one), model, data set and train parameters
    params: dict[str, Any] | None = None
    model_params: dict[str, Any] | None = None
    dataset_params: dict[str, Any] | None = None
    train: dict[str, Any] | None = None
    asr: float | None = None
    ba: float | None = None
    cad: float | None = None


class Reference(_Strict):
    """Published values the report shows beside ours (e.g. the BadPatches paper's Tables 1-2)."""

    source: str
    values: list[ReferenceValue] = Field(default_factory=list)


class Claim(_Strict):
    """A statement about the results that the report checks on every seed (``report.claims``, see
    :mod:`bench.claims`): ``metric`` of the rows picked by ``attack`` / ``poison_rate`` / ``model`` /
    ``dataset`` / ``defense`` at each evaluation in ``at`` (the report's PTQ labels: fp32, int4/whole, ...)
    is at most ``at_most`` and at least ``at_least`` (fractions: 0.02 = 2%). ``ba_drop`` is the clean model's
    fp32 BA (same data set, model, training and seed) minus the row's BA."""

    text: str = Field(min_length=1)
    metric: Literal["ba", "asr", "ra", "cad", "ba_drop"]
    attack: str | None = None
    poison_rate: float | None = None
    model: str | None = None
    dataset: str | None = None
    defense: str = "-"
    at: list[str] = Field(default_factory=lambda: ["fp32"], min_length=1)
    at_most: float | None = None
    at_least: float | None = None

    @model_validator(mode="after")
    def _bounded(self) -> Claim:
        if self.at_most is None and self.at_least is None:
            raise ValueError(f"claim {self.text!r}: give at_most or at_least (fractions, e.g. at_most: 0.02 for 2%)")
        if self.at_most is not None and self.at_least is not None and self.at_least > self.at_most:
            raise ValueError(f"claim {self.text!r}: at_least {self.at_least} is above at_most {self.at_most}")
        bounds = [b for b in (self.at_most, self.at_least) if b is not None]
        if self.metric in ("ba", "asr", "ra") and any(not 0 <= b <= 1 for b in bounds):
            raise ValueError(f"claim {self.text!r}: {self.metric} bounds are fractions in 0..1 (0.02 = 2%), "
                             f"got {bounds}")
        if len(set(self.at)) != len(self.at):
            raise ValueError(f"claim {self.text!r}: at lists an evaluation twice: {self.at}")
        return self


class ReportSpec(_Strict):
    """How the report aggregates: ``min_seeds`` = seeds a leaderboard entry needs (default: every seed of
    the scenario), the same seeds for its ASR and its CAD; ``claims`` = statements checked seed by seed."""

    min_seeds: int | None = Field(None, ge=1)
    claims: list[Claim] = Field(default_factory=list)


class Scenario(_Strict):
    """The whole study. See README for every field."""

    name: str
    description: str = ""
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    device: str = "auto"
    train: dict[str, Any] = Field(default_factory=dict)
    models: list[ComponentEntry] = Field(min_length=1)
    datasets: list[ComponentEntry] = Field(min_length=1)
    attacks: list[AttackEntry] = Field(default_factory=list)
    poison_rates: list[float] = Field(default_factory=list)
    quantization: QuantizationSpec = Field(default_factory=QuantizationSpec)
    defenses: list[ComponentEntry] = Field(default_factory=list)
    #: Also apply every defense to the clean models: a detector's false alarms (does Neural Cleanse, STRIP or
    #: the quantization audit flag a model that has no backdoor?) and a repair's cost on a clean model.
    defend_clean: bool = False
    reference: Reference | None = None
    report: ReportSpec = Field(default_factory=ReportSpec)
    plugins: list[str] = Field(default_factory=list)
    search: dict[str, Any] | None = None  # read by `bench search` (bench.search.spec); `bench run` ignores it

    @field_validator("name")
    @classmethod
    def _plain_folder_name(cls, name: str) -> str:
        """The store is ``runs/<name>``: a plain folder name (letters, digits, ``_ - .``, not starting with a
        dot), so ``.``, ``..``, hidden names and paths can never point a store, or ``--fresh``, elsewhere."""
        if not NAME_PATTERN.fullmatch(name):
            raise ValueError(
                "must be a plain folder name: letters, digits, '_', '-' and '.', not starting with '.' "
                "(at most 128 characters), e.g. my_study"
            )
        return name

    @field_validator("poison_rates")
    @classmethod
    def _rates_in_range(cls, rates: list[float]) -> list[float]:
        for i, r in enumerate(rates):
            if not 0 < r <= 1:
                raise ValueError(f"[{i}] must be in (0, 1] (a fraction of the training set), got {r}")
        return rates

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct, got {seeds}")
        return seeds

    @model_validator(mode="after")
    def _min_seeds_reachable(self) -> Scenario:
        wanted = self.report.min_seeds
        if wanted is not None and wanted > len(self.seeds):
            raise ValueError(f"report.min_seeds: {wanted} seeds required but the scenario has {len(self.seeds)} "
                             f"({self.seeds}); no leaderboard entry could ever be judged")
        return self

    @model_validator(mode="after")
    def _attacks_need_rates(self) -> Scenario:
        if self.attacks and not self.poison_rates:
            raise ValueError("attacks are declared but poison_rates is empty; add e.g. poison_rates: [0.05]")
        return self


class ResolvedScenario(BaseModel):
    """A validated scenario with every grid expanded into concrete, default-filled components."""

    model_config = ConfigDict(frozen=False)
    scenario: Scenario
    source: str
    train: list[dict[str, Any]]
    models: list[dict[str, Any]]
    datasets: list[dict[str, Any]]
    attacks: list[dict[str, Any]]
    quant: list[dict[str, Any]]
    defenses: list[dict[str, Any]] = Field(default_factory=list)
    plugin_files: list[str] = Field(default_factory=list)  # absolute paths of the plugin files it loaded
    #: for models / datasets / attacks / defenses: the scenario entry each resolved component came from
    #: (its index in the file's list), so plan-time messages can name ``models[1].topk``
    origins: dict[str, list[int]] = Field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.scenario.name


def expand_grid(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """Every concrete dict from ``entry`` where each ``{grid: [...]}`` value takes each of its values.

    >>> expand_grid({"a": {"grid": [1, 2]}, "b": 3})
    [{'a': 1, 'b': 3}, {'a': 2, 'b': 3}]
    """
    keys = [k for k, v in entry.items() if _is_grid(v)]
    if not keys:
        return [copy.deepcopy(entry)]
    out = []
    for values in itertools.product(*(entry[k][GRID_KEY] for k in keys)):
        concrete = copy.deepcopy(entry)
        concrete.update(dict(zip(keys, values, strict=True)))
        out.append(concrete)
    return out


def _is_grid(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {GRID_KEY}


def _check_grids(entry: dict[str, Any], where: str) -> None:
    for key, value in entry.items():
        if isinstance(value, dict) and GRID_KEY in value:
            if set(value) != {GRID_KEY}:
                extra = sorted(set(value) - {GRID_KEY})
                raise ScenarioError(
                    f"{where}.{key}: a grid is written {{grid: [v1, v2, ...]}}; unexpected keys {extra}"
                )
            if not isinstance(value[GRID_KEY], list) or not value[GRID_KEY]:
                raise ScenarioError(f"{where}.{key}.grid: must be a non-empty list of values, got {value[GRID_KEY]!r}")


def format_loc(loc: tuple[Any, ...]) -> str:
    """pydantic location -> ``attacks[1].size``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _validation_message(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        path = format_loc(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            lines.append(f"{path}: unknown field")
        elif err["type"] == "missing":
            lines.append(f"{path}: required field is missing")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict | list) else f", got {got!r}"
            lines.append(f"{path}: {msg}{shown}" if path else f"{msg}{shown}")  # model-level checks name their field
    return "; ".join(lines)


def read_yaml(path: Path) -> dict[str, Any]:
    """Parse a YAML file safely; syntax errors name the file, line and column."""
    if not path.is_file():
        raise ScenarioError(f"{path}: scenario file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ScenarioError(f"{path}{where}: YAML syntax error: {problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{path}: cannot read the scenario: {exc}") from None
    if not isinstance(data, dict):
        raise ScenarioError(
            f"{path}: a scenario is a YAML mapping (name:, models:, datasets:, ...), got {type(data).__name__}"
        )
    return data


def load(path: str | Path, extra_plugins: list[str] | None = None) -> ResolvedScenario:
    """Read, validate and expand a scenario file. Every error names the file and the field."""
    path = Path(path)
    raw = read_yaml(path)
    return resolve(raw, source=str(path), base_dir=path.parent, extra_plugins=extra_plugins)


def resolve(
    raw: dict[str, Any],
    source: str = "<scenario>",
    base_dir: Path | None = None,
    extra_plugins: list[str] | None = None,
) -> ResolvedScenario:
    """Validate a scenario given as a dict (``source`` names it in errors) and expand its grids."""
    try:
        scenario = Scenario.model_validate(raw)
    except ValidationError as exc:
        raise ScenarioError(f"{source}: {_validation_message(exc)}") from None
    try:
        from bench.plugins import load_plugins

        plugin_files = load_plugins([*scenario.plugins, *(extra_plugins or [])], base_dir=base_dir, source=source)
        train = _resolve_train(scenario.train)
        models, model_origins = _resolve_components("model", "models", scenario.models)
        datasets, dataset_origins = _resolve_components("dataset", "datasets", scenario.datasets)
        attacks, attack_origins = _resolve_attacks(scenario.attacks)
        defenses, defense_origins = _resolve_components("defense", "defenses", scenario.defenses)
    except (ComponentParamsError, UnknownComponentError, ScenarioError) as exc:
        raise ScenarioError(f"{source}: {exc}") from None
    except BenchError:
        raise
    return ResolvedScenario(
        scenario=scenario, source=source, train=train, models=models, datasets=datasets, attacks=attacks,
        quant=scenario.quantization.configs(), defenses=defenses, plugin_files=[str(p) for p in plugin_files],
        origins={"models": model_origins, "datasets": dataset_origins, "attacks": attack_origins,
                 "defenses": defense_origins},
    )


#: Train settings that change how fast a job runs, never what it computes: not in a job's identity, so
#: changing them retrains nothing (they are recorded with each job's environment instead).
SPEED_ONLY_TRAIN_KEYS = frozenset({"channels_last", "compile"})


def _resolve_train(train: dict[str, Any]) -> list[dict[str, Any]]:
    _check_grids(train, "train")
    for key in sorted(SPEED_ONLY_TRAIN_KEYS):
        if isinstance(train.get(key), dict):
            raise ScenarioError(f"train.{key}: a speed-only setting (not part of a job's identity, it cannot "
                                f"change a result) takes one value, not a grid; time two runs to compare speeds")
    out = []
    for concrete in expand_grid(train):
        try:
            out.append(TrainSpec.model_validate(concrete).model_dump())
        except ValidationError as exc:
            raise ScenarioError(_prefix(exc, "train")) from None
    return _unique(out)


def _prefix(exc: ValidationError, where: str) -> str:
    parts = []
    for part in _validation_message(exc).split("; "):
        parts.append(f"{where}.{part}")
    return "; ".join(parts)


def _resolve_components(
    kind: str, field: str, entries: list[ComponentEntry]
) -> tuple[list[dict[str, Any]], list[int]]:
    """Concrete components (grids expanded, defaults filled, duplicates dropped) and the entry index of each."""
    out: list[tuple[dict[str, Any], int]] = []
    for i, entry in enumerate(entries):
        where = f"{field}[{i}]"
        params = entry.model_dump(exclude={"name"})
        _check_grids(params, where)
        comp = _get_component(kind, entry.name, f"{where}.name")
        for concrete in expand_grid(params):
            out.append(({"name": comp.name, **comp.validate(concrete, where)}, i))
    return _unique_with_origin(out)


def _unique_with_origin(items: list[tuple[dict[str, Any], int]]) -> tuple[list[dict[str, Any]], list[int]]:
    seen: set[str] = set()
    unique, origins = [], []
    for item, origin in items:
        key = json.dumps(item, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            unique.append(item)
            origins.append(origin)
    return unique, origins


def _resolve_attacks(entries: list[AttackEntry]) -> tuple[list[dict[str, Any]], list[int]]:
    out: list[tuple[dict[str, Any], int]] = []
    for i, entry in enumerate(entries):
        where = f"attacks[{i}]"
        params = entry.model_dump(exclude={"name", "objective"})
        _check_grids(params, where)
        comp = _get_component("trigger", entry.name, f"{where}.name")
        objectives = _resolve_objective(entry.objective, f"{where}.objective")
        for concrete, objective in itertools.product(expand_grid(params), objectives):
            target, apply = concrete.pop("target"), concrete.pop("apply")
            mode = _poison_mode(concrete.pop("mode"), target, objective, where)
            modes = getattr(comp.factory, "poison_modes", None)  # a trigger may accept only some modes
            if modes is not None and mode not in modes:
                raise ScenarioError(f"{where}.mode: trigger '{comp.name}' poisons in mode {', '.join(modes)} only "
                                    f"(set mode: {modes[0]}), got {mode!r}")
            target = 0 if target is None and mode != "all-to-all" else target
            trigger_grid = _trigger_grid(concrete.pop("trigger_grid"), apply, f"{where}.trigger_grid")
            if mode != "all-to-all" and (not isinstance(target, int) or isinstance(target, bool) or target < 0):
                raise ScenarioError(f"{where}.target: must be a class label >= 0, got {target!r}")
            if apply not in ("image", "badpatches"):
                raise ScenarioError(f"{where}.apply: must be 'image' or 'badpatches', got {apply!r}")
            params_v = comp.validate(concrete, where)
            attack = {"name": comp.name, "target": target, "apply": apply, "params": params_v}
            if trigger_grid is not None:  # absent when unset, so older job ids stay valid
                attack["trigger_grid"] = trigger_grid
            if objective is not None:
                attack["objective"] = objective
            if mode != "dirty":  # absent for dirty, so older job ids stay valid
                attack["mode"] = mode
            out.append((attack, i))
    return _unique_with_origin(out)


def _poison_mode(mode: Any, target: Any, objective: dict[str, Any] | None, where: str) -> str:
    """The attack's poisoning ``mode``, checked: a known mode, no ``target`` with all-to-all, and only
    ``dirty`` with a training objective (qcb poisons dirty-label all-to-one)."""
    from bench.attacks.poison import POISON_MODES

    if mode not in POISON_MODES:
        raise ScenarioError(f"{where}.mode: must be one of {', '.join(POISON_MODES)} (dirty-label all-to-one, "
                            f"target-class images with their labels kept, label y -> (y + 1) mod C), got {mode!r}")
    if mode == "all-to-all" and target is not None:
        raise ScenarioError(f"{where}.target: unused with mode all-to-all (each poisoned image is relabelled "
                            f"y -> (y + 1) mod C, there is no single target); remove target, got {target!r}")
    if mode != "dirty" and objective is not None:
        raise ScenarioError(f"{where}.mode: the qcb objective poisons dirty-label all-to-one, so it takes mode "
                            f"dirty only; remove mode or the objective, got mode {mode!r}")
    return str(mode)


def _trigger_grid(value: Any, apply: Any, where: str) -> list[int] | None:
    """``trigger_grid`` as ``[rows, cols]`` (an int n means n x n); only meaningful under badpatches."""
    if value is None:
        return None
    if apply != "badpatches":
        raise ScenarioError(f"{where}: only used with apply: badpatches (the grid the trigger is applied per "
                            f"patch of), got apply {apply!r}")
    grid = [value, value] if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(grid, list) or len(grid) != 2
            or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)):
        raise ScenarioError(f"{where}: must be a number of patches per side (e.g. 4) or [rows, cols] of "
                            f"integers >= 1, got {value!r}")
    return [int(g) for g in grid]


def _resolve_objective(objective: dict[str, Any] | None, where: str) -> list[dict[str, Any] | None]:
    """The attack's training objective: None (plain poisoning) or a validated ``qcb`` block per grid point."""
    if objective is None:
        return [None]
    if objective.get("name") != "qcb":
        raise ScenarioError(f"{where}.name: the only training objective is 'qcb', got {objective.get('name')!r}")
    from bench.attacks.qcb import QCBSpec

    _check_grids(objective, where)
    out: list[dict[str, Any] | None] = []
    for concrete in expand_grid(objective):
        try:
            out.append(QCBSpec.model_validate(concrete).model_dump())
        except ValidationError as exc:
            raise ScenarioError(_prefix(exc, where)) from None
    return out


def _get_component(kind: str, name: str, where: str) -> Any:
    try:
        return REGISTRY.get(kind, name)
    except UnknownComponentError as exc:
        raise ScenarioError(f"{where}: {exc}") from None


def _unique(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: set[str] = set()
    out = []
    for item in items:
        key = json.dumps(item, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out

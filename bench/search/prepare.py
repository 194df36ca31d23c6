"""From a scenario file with a ``search:`` block to a checked search: parameters, target, variants.

Everything is checked before the first trial: the block's schema, the scenario without it, that it has
exactly one cell (searches compare trials, not matrices), every parameter path, and every range end (or
choice) against the scenario's own validation, so a range that reaches an invalid value fails now with
the parameter's path, not in trial 17.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from bench import scenario as scenarios
from bench.errors import BenchError, ScenarioError
from bench.registry import REGISTRY
from bench.search.paths import Key, format_path, parse_path, resolve_path, set_path
from bench.search.spec import ParamSpec, SearchSpec, parse_search


@dataclass(frozen=True)
class SearchParam:
    """A searched parameter: its Optuna name (the path as written, normalised), where it lands in the
    scenario (``keys``, with ``strength`` resolved), and its range."""

    name: str
    keys: tuple[Key, ...]
    spec: ParamSpec

    @property
    def target(self) -> str:
        return format_path(self.keys)

    def suggest(self, trial: optuna.Trial) -> Any:
        """Draw this parameter's value for ``trial``."""
        s = self.spec
        if s.type == "categorical":
            return trial.suggest_categorical(self.name, s.choices)  # type: ignore[arg-type]
        if s.type == "int":
            step = int(s.step) if s.step is not None else 1
            return trial.suggest_int(self.name, int(s.low), int(s.high), step=step, log=s.log)  # type: ignore[arg-type]
        return trial.suggest_float(self.name, s.low, s.high, step=s.step, log=s.log)  # type: ignore[arg-type]

    def ends(self) -> list[tuple[str, Any]]:
        """The values that bound this parameter, by field: both range ends, or every choice."""
        s = self.spec
        if s.type == "categorical":
            return [(f"choices[{j}]", c) for j, c in enumerate(s.choices or [])]
        cast = int if s.type == "int" else float
        return [("low", cast(s.low)), ("high", cast(s.high))]

    def accepts(self, value: Any) -> bool:
        s = self.spec
        if s.type == "categorical":
            return value in (s.choices or [])
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if s.type == "int" and value != int(value):
            return False
        return s.low <= value <= s.high  # type: ignore[operator]

    def describe(self) -> str:
        s = self.spec
        if s.type == "categorical":
            return f"one of {s.choices}"
        scale = ", log" if s.log else ""
        step = f", step {s.step:g}" if s.step is not None else ""
        return f"{s.type} in [{s.low:g}, {s.high:g}]{scale}{step}"


@dataclass
class PreparedSearch:
    """A checked search: the scenario as written, its single-cell base, the block, the parameters."""

    source: str
    base_dir: Path
    raw: dict[str, Any]
    base: dict[str, Any]
    spec: SearchSpec
    params: list[SearchParam]
    target: str | None
    resolved: scenarios.ResolvedScenario
    plugins: list[str]
    asleep: tuple[str, ...] = ()  # search.asleep_quant, checked against the scenario's evaluations

    @property
    def name(self) -> str:
        return str(self.raw["name"])

    def variant_raw(self, values: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
        """A copy of ``base`` (default: the single-cell base) with each parameter's value set."""
        raw = copy.deepcopy(self.base if base is None else base)
        for param in self.params:
            if param.name in values:
                set_path(raw, param.keys, values[param.name])
        return raw

    def variant(self, values: dict[str, Any], where: str) -> scenarios.ResolvedScenario:
        """The resolved single-cell scenario of one trial."""
        resolved = scenarios.resolve(
            self.variant_raw(values), source=f"{self.source} ({where})", base_dir=self.base_dir,
            extra_plugins=self.plugins,
        )
        check_single_cell(resolved, f"{self.source} ({where})")
        return resolved


def prepare_search(path: str | Path, plugins: list[str] | None = None,
                   overrides: list[str] | None = None) -> PreparedSearch:
    """Read a scenario file with a ``search:`` block and check all of it (no data is loaded);
    ``overrides``: ``--set key=value`` texts applied before validation (:mod:`bench.overrides`)."""
    from bench.overrides import apply_overrides, describe

    path = Path(path)
    source = f"{path}{describe(overrides or [])}"
    raw = apply_overrides(scenarios.read_yaml(path), overrides or [])
    if "search" not in raw:
        raise ScenarioError(
            f"{source}: search: this scenario has no search block; add one, e.g. "
            "search: {objective: asr, params: [{path: attacks.0.strength, low: 0.1, high: 1.0}]} "
            "(see scenarios/qcb_search.yaml)"
        )
    spec = parse_search(raw["search"], source)
    base = {k: v for k, v in raw.items() if k != "search"}
    seeds = base.get("seeds")
    if isinstance(seeds, list) and len(seeds) > 1:
        base["seeds"] = seeds[:1]  # one cell per trial: the first seed (best.yaml keeps them all)
    resolved = scenarios.resolve(base, source=source, base_dir=path.parent, extra_plugins=plugins)
    check_single_cell(resolved, source)
    params = _params(spec, base, source)
    target = _target(spec, resolved, source)
    prepared = PreparedSearch(
        source, path.parent, raw, base, spec, params, target, resolved, list(plugins or []),
        _asleep(spec, resolved, source, target),
    )
    _check_ends(prepared)
    _check_enqueue(prepared)
    return prepared


def check_single_cell(resolved: scenarios.ResolvedScenario, source: str) -> None:
    """A search trial trains one attacked model: one of each axis, no defenses."""
    scenario = resolved.scenario
    axes = {
        "datasets": resolved.datasets, "models": resolved.models, "train": resolved.train,
        "attacks": resolved.attacks, "poison_rates": scenario.poison_rates,
    }
    for field, values in axes.items():
        if len(values) != 1:
            raise ScenarioError(
                f"{source}: {field}: a search trains one cell per trial (one dataset, model, train "
                f"setting, attack and poison rate; the first seed), got {len(values)}; keep one "
                "(no grids) and search over the value instead"
            )
    if resolved.defenses:
        raise ScenarioError(
            f"{source}: defenses: a search does not run defenses; remove them here and add them to the "
            "best.yaml it writes"
        )


def _params(spec: SearchSpec, base: dict[str, Any], source: str) -> list[SearchParam]:
    out: list[SearchParam] = []
    seen: dict[tuple[Key, ...], int] = {}
    for i, p in enumerate(spec.params):
        where = f"{source}: search.params[{i}].path"
        keys = resolve_path(base, p.path, where)
        if keys in seen:
            raise ScenarioError(
                f"{where}: '{p.path}' sets {format_path(keys)}, as search.params[{seen[keys]}] already does"
            )
        seen[keys] = i
        out.append(SearchParam(format_path(parse_path(p.path)), keys, p))
    return out


def _asleep(
    spec: SearchSpec, resolved: scenarios.ResolvedScenario, source: str, target: str | None
) -> tuple[str, ...]:
    """``search.asleep_quant``: quantized evaluations of the scenario other than the target."""
    quantized = [q["label"] for q in resolved.quant if q["label"] != "fp32"]
    if spec.asleep_quant and spec.objective != "dormant":
        raise ScenarioError(f"{source}: search.asleep_quant: only objective: dormant has it, not {spec.objective}")
    for i, label in enumerate(spec.asleep_quant):
        if label not in quantized:
            raise ScenarioError(
                f"{source}: search.asleep_quant[{i}]: '{label}' is not among the scenario's quantized "
                f"evaluations ({', '.join(quantized) or 'none: quantization.bits has only fp32'})"
            )
        if label == target:
            raise ScenarioError(
                f"{source}: search.asleep_quant[{i}]: '{label}' is the target, where the backdoor must wake"
            )
    return tuple(spec.asleep_quant)


def _target(spec: SearchSpec, resolved: scenarios.ResolvedScenario, source: str) -> str | None:
    """The quantization config whose ASR is "ASR at target bits" (``dormant`` and ``multi``)."""
    labels = [q["label"] for q in resolved.quant]
    quantized = [label for label in labels if label != "fp32"]
    if spec.target_quant is not None:
        if spec.target_quant not in quantized:
            raise ScenarioError(
                f"{source}: search.target_quant: '{spec.target_quant}' is not among the scenario's quantized "
                f"evaluations ({', '.join(quantized) or 'none: quantization.bits has only fp32'})"
            )
        return spec.target_quant
    if spec.objective == "asr":
        return None
    objective = resolved.attacks[0].get("objective")
    if objective:
        from bench.attacks.qcb import QCBSpec

        label = QCBSpec.model_validate(objective).quant_config.label
        if label not in quantized:
            raise ScenarioError(
                f"{source}: quantization: the qcb objective wakes at {label}, which the scenario does not "
                f"evaluate (it evaluates {', '.join(labels)}); add its bits and scope to quantization"
            )
        return label
    if not quantized:
        raise ScenarioError(
            f"{source}: search.objective: '{spec.objective}' needs an ASR at a quantized bit-width; add "
            "quantization: {bits: [fp32, 4]} (and search.target_quant if there are several)"
        )
    return quantized[0]


def _check_ends(prepared: PreparedSearch) -> None:
    for i, param in enumerate(prepared.params):
        for field, value in param.ends():
            try:
                resolved = prepared.variant({param.name: value}, f"search.params[{i}] = {value!r}")
                attack = resolved.attacks[0]
                REGISTRY.get("trigger", attack["name"]).create(**attack["params"])
            except BenchError as exc:
                raise ScenarioError(
                    f"{prepared.source}: search.params[{i}].{field}: {param.target} = {value!r} is not a "
                    f"valid scenario value: {_strip_source(str(exc), prepared.source)}"
                ) from None


def _strip_source(message: str, source: str) -> str:
    head, sep, rest = message.partition("): ")
    return rest if sep and head.startswith(source) else message


def _check_enqueue(prepared: PreparedSearch) -> None:
    by_name = {p.name: p for p in prepared.params} | {p.target: p for p in prepared.params}
    for i, point in enumerate(prepared.spec.enqueue):
        for key, value in point.items():
            where = f"{prepared.source}: search.enqueue[{i}].{key}"
            try:
                param = by_name.get(format_path(parse_path(str(key))))
            except ValueError:
                param = None
            if param is None:
                known = ", ".join(p.name for p in prepared.params)
                raise ScenarioError(f"{where}: not a searched parameter (searched: {known})")
            if not param.accepts(value):
                raise ScenarioError(f"{where}: {value!r} is outside the range ({param.describe()})")


def enqueued_points(prepared: PreparedSearch) -> list[dict[str, Any]]:
    """The block's ``enqueue`` points keyed by Optuna parameter name."""
    by_name = {p.name: p for p in prepared.params} | {p.target: p for p in prepared.params}
    return [
        {by_name[format_path(parse_path(str(k)))].name: v for k, v in point.items()}
        for point in prepared.spec.enqueue
    ]

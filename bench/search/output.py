"""What a search leaves behind: the best trial (or Pareto front), ``best.yaml`` and a markdown report.

``runs/<name>/best.yaml`` is the scenario as written with the best parameters filled in and the
``search:`` block removed, so ``bench run runs/<name>/best.yaml`` runs it as is: into the same store,
where the searched cell's jobs are already done (nothing retrains for the searched seed), and over every
seed the scenario lists. For ``multi`` the front's member with the largest dormancy gap minus BA drop is
written; the report lists the whole front.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState
from tabulate import tabulate

from bench.search.objectives import TrialMetrics, dormancy_score
from bench.search.paths import set_path
from bench.search.prepare import PreparedSearch


@dataclass
class Best:
    """The answer so far: ``front`` (the best trial, or the Pareto front) and the one ``best.yaml`` holds."""

    front: list[FrozenTrial]
    chosen: FrozenTrial | None


def trial_metrics(trial: FrozenTrial) -> TrialMetrics | None:
    m = trial.user_attrs.get("metrics")
    if not m:
        return None
    return TrialMetrics(m["ba"], m["asr"], m["ba_clean"], m.get("asr_q"), m.get("ba_q"), m.get("asr_asleep"),
                        m.get("ba_asleep"))


def feasible(trial: FrozenTrial) -> bool:
    return all(v <= 0 for v in trial.constraints.values())


def best_of(study: optuna.Study) -> Best:
    """The feasible best trial (one objective) or the Pareto front (``multi``); empty while none qualifies."""
    if len(study.directions) == 1:
        try:
            best = study.best_trial
        except ValueError:  # no complete trial, or none feasible
            return Best([], None)
        return Best([best], best)
    front = sorted(study.best_trials, key=lambda t: t.number)
    scored = [(dormancy_score(m), t) for t in front if (m := trial_metrics(t)) is not None]
    chosen = max(scored, key=lambda s: (s[0], -s[1].number))[1] if scored else None
    return Best(front, chosen)


def best_scenario(prepared: PreparedSearch, trial: FrozenTrial, out_dir: Path) -> dict[str, Any]:
    """The scenario as written, ``trial``'s parameters set, no ``search:``; plugin paths made relative to
    ``out_dir`` (where best.yaml lives)."""
    raw = {k: v for k, v in prepared.raw.items() if k != "search"}
    raw = prepared.variant_raw({}, base=raw)
    by_name = {p.name: p for p in prepared.params}
    for name, value in trial.params.items():
        if name in by_name:
            set_path(raw, by_name[name].keys, value)
    if raw.get("plugins"):
        raw["plugins"] = [_rebase(p, prepared.base_dir, out_dir) for p in raw["plugins"]]
    return raw


def _rebase(plugin: str, base_dir: Path, out_dir: Path) -> str:
    path = Path(plugin)
    if path.is_absolute() or not (base_dir / path).exists():
        return plugin
    return os.path.relpath((base_dir / path).resolve(), out_dir.resolve())


def write_best_yaml(prepared: PreparedSearch, trial: FrozenTrial, study_name: str, path: Path) -> Path:
    """Write ``best.yaml`` atomically, with a header naming the trial it came from."""
    scenario = best_scenario(prepared, trial, path.parent)
    values = ", ".join(f"{v:.4g}" for v in trial.values or [])
    header = (
        f"# Written by `bench search {prepared.source}`: trial {trial.number} of study '{study_name}' "
        f"(value {values}).\n# Run it with: bench run {path}\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(header + yaml.safe_dump(scenario, sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)
    return path


# -- report -------------------------------------------------------------------------------------------
def _pct(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value * 100:.1f}"


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def objective_line(prepared: PreparedSearch) -> str:
    """The objective in words, with its constraints."""
    s, t = prepared.spec, prepared.target
    if s.objective == "dormant":
        asleep = "".join(f", {label} ASR" for label in prepared.asleep)
        where = "fp32" if s.epsilon_at == "fp32" else ", ".join(["fp32", str(t), *prepared.asleep])
        return (f"dormant: maximise ASR@{t} subject to fp32 ASR{asleep} <= {s.tau * 100:g}% and BA drop "
                f"(at {where}) <= {s.epsilon * 100:g} points (Optuna constraints; the best trial is the best "
                f"feasible one)")
    if s.objective == "multi":
        return f"multi: maximise ASR@{t}, minimise fp32 ASR, minimise BA drop (Pareto front)"
    return f"asr: maximise fp32 ASR subject to BA drop <= {s.epsilon * 100:g} points (Optuna constraint)"


def _worst_shown(prepared: PreparedSearch) -> bool:
    """Whether the tables carry the worst BA drop over every evaluation (``epsilon_at: all``)."""
    return prepared.spec.epsilon_at == "all"


def _trial_row(prepared: PreparedSearch, trial: FrozenTrial) -> list[Any]:
    m = trial_metrics(trial)
    params = [_num(trial.params.get(p.name, "-")) for p in prepared.params]
    at = [] if prepared.target is None else [_pct(m.asr_q) if m else "-"]
    worst_blank = ["-"] if _worst_shown(prepared) else []
    if m is None:
        last = max(trial.intermediate_values) if trial.intermediate_values else None
        note = f"stopped at epoch {last} ({trial.intermediate_values[last]:.3f})" if last is not None else ""
        if "invalid" in trial.user_attrs:
            note = "invalid combination of values"
        return [trial.number, trial.state.name.lower(), *params, *at, "-", "-", "-", *worst_blank, "-", note]
    flag = "yes" if feasible(trial) else "no"
    ran = trial.user_attrs.get("ran_jobs", "-")
    worst = [_pct(m.worst_ba_drop)] if worst_blank else []
    return [trial.number, trial.state.name.lower(), *params, *at, _pct(m.asr), _pct(m.ba), _pct(m.ba_drop),
            *worst, flag, f"{ran} jobs run"]


def to_markdown(prepared: PreparedSearch, study: optuna.Study, storage: str, best: Best,
                best_yaml: Path | None) -> str:
    """The search report: setup, the best trial or Pareto front, every trial."""
    s = prepared.spec
    trials = study.get_trials(deepcopy=False)
    states = {state: sum(t.state == state for t in trials) for state in TrialState}
    pruning = s.pruning
    pruner = "none" if pruning.name == "none" else (
        f"median (after {pruning.startup_trials} trials, {pruning.warmup_epochs} warm-up epochs)")
    lines = [
        f"# Search: {prepared.name}", "",
        f"- scenario: `{prepared.source}`; study `{study.study_name}` in `{storage}`",
        f"- objective: {objective_line(prepared)}",
        f"- sampler: {s.sampler} (seed {s.seed}, one derived seed per trial); pruner: {pruner}; "
        f"intermediate values on {s.probe_size} test images per epoch",
        f"- trials: {states[TrialState.COMPLETE]} complete, {states[TrialState.PRUNED]} pruned, "
        f"{states[TrialState.FAIL]} failed, {states[TrialState.RUNNING]} running or abandoned, "
        f"{states[TrialState.WAITING]} waiting",
        "",
        tabulate([[p.name, p.target, p.describe()] for p in prepared.params],
                 headers=["searched", "sets", "range"], tablefmt="github"),
        "",
    ]
    title = "Pareto front" if s.objective == "multi" else "Best trial"
    lines += [f"## {title}", ""]
    if not best.front:
        why = "no feasible trial yet (every finished trial violates a constraint)" if any(
            t.state == TrialState.COMPLETE for t in trials) else "no finished trial yet"
        lines += [f"None: {why}.", ""]
    else:
        at = [f"ASR@{prepared.target}"] if prepared.target else []
        worst = ["worst BA drop"] if _worst_shown(prepared) else []
        headers = ["#", *[p.name for p in prepared.params], *at, "ASR fp32", "BA", "BA clean", "BA drop",
                   *([f"BA@{prepared.target}"] if prepared.target else []), *worst]
        rows = []
        for t in best.front:
            m = trial_metrics(t)
            if m is None:
                continue
            rows.append([t.number, *[_num(t.params.get(p.name)) for p in prepared.params],
                         *([_pct(m.asr_q)] if prepared.target else []), _pct(m.asr), _pct(m.ba),
                         _pct(m.ba_clean), _pct(m.ba_drop), *([_pct(m.ba_q)] if prepared.target else []),
                         *([_pct(m.worst_ba_drop)] if worst else [])])
        lines += [tabulate(rows, headers=headers, tablefmt="github"), "",
                  "Rates in percent; BA drop in points against the clean baseline's fp32 BA (same model, data, "
                  "seed)" + ("; worst BA drop: from the lowest BA over fp32 and the quantized evaluations the "
                             "search names." if worst else "."),
                  ""]
        if best_yaml is not None and best.chosen is not None:
            lines += [f"`{best_yaml}` holds trial {best.chosen.number}: `bench run {best_yaml}`.", ""]
    at = [f"ASR@{prepared.target}"] if prepared.target else []
    worst = ["worst BA drop"] if _worst_shown(prepared) else []
    headers = ["#", "state", *[p.name for p in prepared.params], *at, "ASR fp32", "BA", "BA drop", *worst,
               "feasible", "note"]
    lines += ["## All trials", "", tabulate([_trial_row(prepared, t) for t in trials], headers=headers,
                                            tablefmt="github"), ""]
    return "\n".join(lines)

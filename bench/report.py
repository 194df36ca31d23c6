"""Leaderboards from stored results: pure functions from (cells, job records) to tables.

Per dataset x model (x train setting), a table laid out like Table 1 of the BadPatches paper: rows are
attack x poison rate, columns ASR, BA, CAD (and RA), each as mean ± std over seeds with n. Then a ranked
leaderboard under the headline rule stated in the report.

Every number is traceable to its runs: a row keeps one :class:`SeedRun` per seed (its job ids, its
values, or why it has none: pending, failed, not applicable, a clean baseline that is missing or at
chance), every mean carries the seeds it averages, and a line whose columns average different seeds says
so. Failed and not-applicable cells show as such, never as a number, and enter no mean.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from bench import __version__
from bench import document as doc
from bench.document import Block
from bench.document import md_text as _md_text
from bench.errors import ScenarioError
from bench.metrics import Summary, defense_effectiveness_rating, seed_list, summarize_seeds
from bench.store import JobRecord
from bench.transfer import transfer_blocks

HEADLINE_ASR = 0.90
HEADLINE_CAD = 0.02
#: Slack of every headline comparison: stored rates are float32 (450/500 is stored as 0.89999998), so a
#: mean within this of a bound is on the bound.
RULE_TOLERANCE = 1e-6
#: A clean model whose BA is at most chance (1 / classes) plus this is no baseline: no CAD against it.
CHANCE_MARGIN = 0.02
HEADLINE_RULE = (
    f"an attack's score is the lowest poison rate at which its mean ASR reaches {HEADLINE_ASR:.0%} "
    f"with mean CAD at most {HEADLINE_CAD * 100:.0f} points, both means over the same seeds and at least as "
    f"many as required; compared within {RULE_TOLERANCE:g} (stored rates are float32: 450/500 is 0.89999998); "
    "lower is better, ties broken by higher ASR; equal scores share a rank (dense ranking), ranks count within "
    "one table (data set, model, training, quantization, defense)"
)

OK, PENDING, FAILED, NOT_APPLICABLE = "ok", "pending", "failed", "n/a"
#: The per-seed values a row summarises (routed = ``route_rate_any``, jaccard = ``route_jaccard_mean``).
METRICS = ("ba", "asr", "ra", "cad", "der", "routed", "jaccard")
METRIC_NAMES = {"ba": "BA", "asr": "ASR", "ra": "RA", "cad": "CAD", "der": "DER", "routed": "trigger routed",
                "jaccard": "routing Jaccard"}
ALL_PATCHES = "all patches"
#: How the line plots' bands are drawn (:data:`bench.plots.base.BAND_RULE`), said in their captions.
PLOT_BAND = ("bands: min-max over the seeds where a point has 2, mean ± sample std where it has 3 or more, "
             "none for 1")
ALL_PATCHES_NOTE = (f"{ALL_PATCHES}: the trigger touches every patch, so some expert keeps a touched patch on "
                    "every image (trigger routed = 1 by construction, not a finding); the routing Jaccard "
                    "says how much the trigger moves the routing.")


# -- one seed: its jobs, its values, or why it has none ------------------------------------------------


@dataclass
class SeedRun:
    """One seed of a row: the jobs behind it, the values it contributes, or why it has none.

    ``status``: ok, pending (no stored record yet), failed (``metrics["failed"]``) or n/a (the job's
    ``metrics["not_applicable"]``, or a cell planned as not applicable). ``gaps``: metric -> (short, detail)
    why an ok seed has no value for it (a CAD without a usable clean baseline). ``notes``: (short, detail)
    remarks on the seed itself (a clean model at chance). ``train_job``: the cell's train job (its stored
    per-epoch losses feed the training curves, :mod:`bench.plots.training_curves`)."""

    seed: int
    eval_job: str = ""
    clean_eval_job: str = ""
    base_eval_job: str | None = None
    status: str = OK
    reason: str = ""
    failed_epoch: int | None = None
    values: dict[str, float] = field(default_factory=dict)
    gaps: dict[str, tuple[str, str]] = field(default_factory=dict)
    notes: list[tuple[str, str]] = field(default_factory=list)
    touch_share: float | None = None
    train_job: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: job ids, status, reason and the values (NaN as null)."""
        return {
            "seed": self.seed, "eval_job": self.eval_job, "clean_eval_job": self.clean_eval_job,
            "base_eval_job": self.base_eval_job, "status": self.status, "reason": self.reason or None,
            "failed_epoch": self.failed_epoch, "values": {k: _json_float(v) for k, v in self.values.items()},
            "gaps": {k: detail for k, (_, detail) in self.gaps.items()},
            "notes": [detail for _, detail in self.notes],
        }


def _json_float(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value


def _number(value: Any) -> float | None:
    """``value`` as a float when it is a real number (not a bool), else None."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def job_outcome(record: JobRecord | None) -> tuple[str, str, int | None]:
    """How a job ended, as (status, reason, failed epoch): pending without a stored record."""
    if record is None:
        return PENDING, "not run yet", None
    metrics = record.metrics
    if "failed" in metrics:
        epoch = _number(metrics.get("failed_epoch"))
        return FAILED, str(metrics["failed"]), None if epoch is None else int(epoch)
    if "not_applicable" in metrics:
        return NOT_APPLICABLE, str(metrics["not_applicable"]), None
    return OK, "", None


def at_chance(metrics: dict[str, Any]) -> str | None:
    """Why a model is no better than guessing (BA <= 1 / classes + :data:`CHANCE_MARGIN`), or None; the
    check needs the record's ``num_classes`` and is skipped without it."""
    classes, ba = _number(metrics.get("num_classes")), _number(metrics.get("ba"))
    if classes is None or classes < 2 or ba is None or math.isnan(ba):
        return None
    chance = 1.0 / classes
    if ba > chance + CHANCE_MARGIN + RULE_TOLERANCE:
        return None
    return (f"BA {ba * 100:.1f}% is at chance ({chance * 100:.1f}% for {classes:g} classes, "
            f"+ {CHANCE_MARGIN * 100:g} points)")


def seed_run(cell: dict[str, Any], records: dict[str, JobRecord]) -> SeedRun:
    """What one cell (one seed) contributes: its values, or its status and why."""
    run = SeedRun(int(cell["seed"]), cell.get("eval_job") or "", cell.get("clean_eval_job") or "",
                  cell.get("base_eval_job") or None, train_job=cell.get("train_job") or "")
    if cell.get("not_applicable"):
        run.status, run.reason = NOT_APPLICABLE, str(cell["not_applicable"])
        return run
    record = records.get(run.eval_job)
    run.status, run.reason, run.failed_epoch = job_outcome(record)
    if record is None or run.status != OK:
        return run
    metrics = record.metrics
    for name, key in (("ba", "ba"), ("asr", "asr"), ("ra", "ra"), ("routed", "route_rate_any"),
                      ("jaccard", "route_jaccard_mean")):
        value = _number(metrics.get(key))
        if value is not None:
            run.values[name] = value
    run.touch_share = _number(metrics.get("route_trigger_patch_share"))
    if cell.get("attack") is None:
        chance = at_chance(metrics)
        if chance:
            run.notes.append(("at chance", f"clean model {run.eval_job}: {chance}; no CAD is computed against it"))
    else:
        _add_cad(run, records.get(run.clean_eval_job))
    if run.base_eval_job:
        _add_der(run, records.get(run.base_eval_job))
    return run


def _add_cad(run: SeedRun, clean: JobRecord | None) -> None:
    """CAD of an attacked seed against its clean baseline, or the gap saying why there is none."""
    status, reason, _ = job_outcome(clean)
    job = run.clean_eval_job or "(none planned)"
    if clean is None or status != OK:
        detail = f"clean baseline {job} {status}" + (f": {reason}" if status != PENDING else "")
        run.gaps["cad"] = (f"clean baseline {status}", detail)
        return
    chance = at_chance(clean.metrics)
    ba = _number(clean.metrics.get("ba"))
    if chance:
        run.gaps["cad"] = ("clean baseline at chance", f"clean baseline {job}: {chance}")
    elif ba is not None and "ba" in run.values:
        run.values["cad"] = ba - run.values["ba"]


def _add_der(run: SeedRun, before: JobRecord | None) -> None:
    """DER of a defended seed against the same model before the defense, or the gap saying why not."""
    status, reason, _ = job_outcome(before)
    if before is None or status != OK:
        detail = f"model before the defense {run.base_eval_job} {status}" + (f": {reason}" if status != PENDING else "")
        run.gaps["der"] = (f"model before the defense {status}", detail)
        return
    asr, ba = _number(before.metrics.get("asr")), _number(before.metrics.get("ba"))
    if "asr" in run.values and "ba" in run.values and asr is not None and ba is not None:
        run.values["der"] = defense_effectiveness_rating(asr, run.values["asr"], ba, run.values["ba"])


# -- rows: cells that differ only by seed -------------------------------------------------------------


@dataclass
class Row:
    """One aggregated line: the cells of one setting that differ only by seed, one :class:`SeedRun` each.

    Every summary (``ba``, ``asr``, ...) averages the ok seeds that have that value and names them
    (``Summary.seeds``); ``specs`` holds the setting's raw specs (to match published values)."""

    dataset: str
    model: str
    train: str
    attack: str
    poison_rate: float | None
    quant: str
    defense: str
    runs: list[SeedRun] = field(default_factory=list)
    specs: dict[str, Any] = field(default_factory=dict)
    summaries: dict[str, Summary] = field(init=False)

    def __post_init__(self) -> None:
        self.runs.sort(key=lambda r: r.seed)
        self.summaries = {m: summarize_seeds((r.seed, r.values.get(m)) for r in self.runs if r.status == OK)
                          for m in METRICS}

    ba = property(lambda self: self.summaries["ba"])
    asr = property(lambda self: self.summaries["asr"])
    ra = property(lambda self: self.summaries["ra"])
    cad = property(lambda self: self.summaries["cad"])
    der = property(lambda self: self.summaries["der"])
    routed = property(lambda self: self.summaries["routed"])
    jaccard = property(lambda self: self.summaries["jaccard"])

    @property
    def seeds(self) -> int:
        """How many seeds the plan has for this setting (with or without a result)."""
        return len(self.runs)

    @property
    def missing(self) -> int:
        """Seeds still pending (no stored record)."""
        return sum(r.status == PENDING for r in self.runs)

    @property
    def key(self) -> dict[str, Any]:
        """Raw names of the setting (dataset, model, trigger, apply)."""
        attack = self.specs.get("attack")
        return {"dataset": (self.specs.get("dataset") or {}).get("name"),
                "model": (self.specs.get("model") or {}).get("name"),
                "attack": attack["name"] if attack else None, "apply": attack.get("apply") if attack else None}

    @property
    def status(self) -> str:
        """ok when some seed has a result; else n/a (every seed), failed (some seed) or pending."""
        statuses = {r.status for r in self.runs}
        if OK in statuses or not statuses:
            return OK
        if statuses == {NOT_APPLICABLE}:
            return NOT_APPLICABLE
        return FAILED if FAILED in statuses else PENDING

    @property
    def seeds_differ(self) -> bool:
        """Whether the columns with a value average different seeds (e.g. BA over 0, 1 and CAD over 0)."""
        return len({s.seeds for s in self.summaries.values() if s.n}) > 1

    @property
    def routed_all_patches(self) -> bool:
        """Whether "trigger routed" is 1 by construction: the trigger touches every patch on every seed
        (``route_trigger_patch_share`` = 1; older records: BadPatches on the model's own grid)."""
        runs = [r for r in self.runs if r.status == OK and "routed" in r.values]
        attack = self.specs.get("attack") or {}
        legacy = attack.get("apply") == "badpatches" and "trigger_grid" not in attack
        return bool(runs) and all(legacy if r.touch_share is None else r.touch_share >= 1 - 1e-9 for r in runs)

    def with_status(self, status: str) -> list[SeedRun]:
        return [r for r in self.runs if r.status == status]

    def to_dict(self) -> dict[str, Any]:
        """JSON / CSV-ready: labels, status, every summary with its n and seeds, and the runs behind it."""
        out: dict[str, Any] = {
            "dataset": self.dataset, "model": self.model, "train": self.train, "attack": self.attack,
            "poison_rate": self.poison_rate, "quant": self.quant, "defense": self.defense, "status": self.status,
            "seeds": self.seeds, "planned_seeds": [r.seed for r in self.runs], "missing": self.missing,
            "columns_differ": self.seeds_differ,
        }
        for name in METRICS:
            s = self.summaries[name]
            out[f"{name}_mean"] = _json_float(s.mean)
            out[f"{name}_std"] = _json_float(s.std)
            out[f"{name}_n"] = s.n
            out[f"{name}_seeds"] = list(s.seeds)
        out["routed_tautological"] = self.routed_all_patches
        out["failed"] = [{"seed": r.seed, "job": r.eval_job, "reason": r.reason, "failed_epoch": r.failed_epoch}
                         for r in self.with_status(FAILED)]
        out["not_applicable"] = [{"seed": r.seed, "job": r.eval_job or None, "reason": r.reason}
                                 for r in self.with_status(NOT_APPLICABLE)]
        out["notes"] = row_notes(self)
        out["runs"] = [r.to_dict() for r in self.runs]
        return out


def _flat(spec: dict[str, Any]) -> dict[str, Any]:
    """A component spec as one flat dict: trigger params inline, nested blocks as dotted keys."""
    out: dict[str, Any] = {}
    for key, value in spec.items():
        if key == "params" and isinstance(value, dict):
            out.update(_flat(value))
        elif isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in _flat(value).items()})
        else:
            out[key] = value
    return out


def component_label(spec: dict[str, Any] | None, varying: set[str]) -> str:
    """``name`` plus the parameters that vary between the scenario's components of that kind."""
    if spec is None:
        return "clean"
    flat = _flat(spec)
    name = spec["name"] + ("+qcb" if spec.get("objective") else "") + (f" [{spec['mode']}]" if spec.get("mode") else "")
    extras = [f"{k.removeprefix('objective.')}={flat[k]}" for k in sorted(varying)
              if k in flat and k not in ("name", "objective.name", "mode")]
    return name + (f" ({', '.join(extras)})" if extras else "")


def varying_keys(specs: list[dict[str, Any] | None]) -> set[str]:
    """Parameter names whose value differs between two ``specs`` of the same name (worth showing)."""
    by_name: dict[str, list[dict[str, Any]]] = defaultdict(list)
    seen: set[int] = set()
    for spec in specs:
        if spec is not None and id(spec) not in seen:  # a plan's cells share their specs: flatten each once
            seen.add(id(spec))
            by_name[str(spec.get("name", ""))].append(_flat(spec))
    out = set()
    for flats in by_name.values():
        for k in {k for f in flats for k in f}:
            # an objective's fields are compared among the specs that have an objective: the name's "+qcb"
            # already tells a plain attack from one with an objective
            among = [f for f in flats if "objective.name" in f] if k.startswith("objective.") else flats
            if len({_hashable(f.get(k)) for f in among}) > 1:
                out.add(k)
    if any(f.get("apply") == "badpatches" for flats in by_name.values() for f in flats):
        out.add("apply")
    return out


def _hashable(value: Any) -> Any:
    """A set member standing for ``value``: scalars by type and value (1, 1.0 and True differ, as in JSON),
    anything else by its sorted JSON."""
    if isinstance(value, float) and math.isnan(value):
        return ("float", "nan")  # NaN != NaN: one stand-in for all of them
    if value is None or isinstance(value, str | int | float | bool):
        return (type(value).__name__, value)
    return json.dumps(value, sort_keys=True, default=str)


def setting_labels(entries: list[dict[str, Any]]) -> dict[str, set[str]]:
    """Per kind (dataset, model, train, attack, defense), the parameters that vary between ``entries``
    (plan cells or defend entries): what a label must show so that two settings never print alike."""
    labels = {kind: varying_keys([e.get(kind) or ({} if kind == "train" else None) for e in entries])
              for kind in ("dataset", "model", "train", "attack")}
    labels["defense"] = varying_keys([
        {k: v for k, v in e["defense"].items() if k != "stage"} for e in entries if e.get("defense")
    ])
    return labels


def aggregate(cells: list[dict[str, Any]], records: dict[str, JobRecord]) -> list[Row]:
    """Group cells over seeds into rows (per-seed CAD against the clean model of the same seed, DER against
    the same model before the defense); failed and not-applicable seeds enter no mean."""
    labels = setting_labels(cells)
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for cell in cells:
        key = (
            component_label(cell["dataset"], labels["dataset"]),
            component_label(cell["model"], labels["model"]),
            _train_label(cell.get("train") or {}, labels["train"]),
            component_label(cell["attack"], labels["attack"]),
            cell["poison_rate"],
            _quant_label(cell.get("quant")),
            _defense_label(cell.get("defense"), labels["defense"]),
        )
        groups[key].append(cell)
    rows = []
    for key, members in groups.items():
        first = members[0]
        specs = {k: first.get(k) for k in ("dataset", "model", "attack", "train", "quant", "defense")}
        rows.append(Row(*key, runs=[seed_run(c, records) for c in members], specs=specs))
    # a defense's stages keep the plan's order (pruned before finetuned): the sort is stable, the key omits them
    rows.sort(key=lambda r: (r.dataset, r.model, natural(r.train), natural(r.quant),
                             natural(r.defense.rsplit(" / ", 1)[0]), r.attack != "clean", natural(r.attack),
                             r.poison_rate or 0.0))
    return rows


def natural(label: str) -> tuple[str | float, ...]:
    """Sort key that orders the numbers inside a label by value ("epochs=5" before "epochs=20")."""
    parts = re.split(r"(\d+(?:\.\d+)?)", label)
    return tuple(float(p) if i % 2 else p for i, p in enumerate(parts))


def _defense_label(defense: dict[str, Any] | None, varying: set[str]) -> str:
    if not defense:
        return "-"
    spec = {k: v for k, v in defense.items() if k != "stage"}
    label = component_label(spec, varying)
    return f"{label} / {defense['stage']}" if "stage" in defense else label


def _train_label(train: dict[str, Any], varying: set[str]) -> str:
    extras = [f"{k}={train[k]}" for k in sorted(varying) if k in train]
    return ", ".join(extras) if extras else "-"


def _quant_label(quant: dict[str, Any] | None) -> str:
    if not quant:
        return "fp32"
    return str(quant.get("label", "fp32"))


# -- what a line says beside its numbers ---------------------------------------------------------------


class Footnotes:
    """Numbered notes under one table: long reasons (a failure's message, job ids) stay out of its cells."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def ref(self, text: str) -> str:
        """The marker of ``text`` (``[2]``), numbering it on first use."""
        if text not in self.texts:
            self.texts.append(text)
        return f"[{self.texts.index(text) + 1}]"

    def blocks(self) -> list[Block]:
        """The notes as one block (nothing when there are none)."""
        return doc.notes(self.texts)


def _detail(short: str, detail: str, foot: Footnotes | None, inline: str | None = None) -> str:
    """``short`` with its ``detail`` as a footnote marker, or inline in parentheses (``inline``, when the
    detail repeats ``short``, is what goes in them)."""
    return f"{short} {foot.ref(detail)}" if foot is not None else f"{short} ({inline or detail})"


def row_notes(row: Row, foot: Footnotes | None = None) -> list[str]:
    """Why a line has fewer numbers than seeds: failed, n/a and pending seeds, per-metric gaps (a CAD
    without a usable clean baseline), clean models at chance, columns over different seeds. With ``foot``
    the details go to its footnotes, else inline."""
    notes = []
    for status in (FAILED, NOT_APPLICABLE):
        by_reason: dict[tuple[str, int | None], list[SeedRun]] = defaultdict(list)
        for r in row.with_status(status):
            by_reason[(r.reason, r.failed_epoch)].append(r)
        for (reason, epoch), runs in by_reason.items():
            jobs = ", ".join(r.eval_job for r in runs if r.eval_job) or "planned as not applicable"
            short = f"{status}: {seed_list(r.seed for r in runs)}"
            why = reason + (f" (epoch {epoch})" if epoch is not None else "")
            notes.append(_detail(short, f"{short} ({jobs}): {why}", foot, inline=f"{jobs}: {why}"))
    pending = row.with_status(PENDING)
    if pending:
        notes.append(f"pending: {seed_list(r.seed for r in pending)}")
    gaps: dict[tuple[str, str], list[SeedRun]] = defaultdict(list)
    for r in row.with_status(OK):
        for metric, (short, _) in r.gaps.items():
            gaps[(metric, short)].append(r)
    for (metric, short), runs in gaps.items():
        detail = "; ".join(f"seed {r.seed}: {r.gaps[metric][1]}" for r in runs)
        notes.append(_detail(f"no {METRIC_NAMES[metric]} for {seed_list(r.seed for r in runs)}: {short}", detail,
                             foot))
    remarks: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for r in row.with_status(OK):
        for short, detail in r.notes:
            remarks[short].append((r.seed, detail))
    for short, items in remarks.items():
        detail = "; ".join(f"seed {seed}: {d}" for seed, d in items)
        notes.append(_detail(f"{short}: {seed_list(seed for seed, _ in items)}", detail, foot))
    if row.seeds_differ:
        notes.append("columns average different seeds")
    return notes


def cell_text(row: Row | None, metric: str, scale: float = 100.0, digits: int = 1) -> str:
    """One metric of a line as a table shows it: mean ± std (n), with the seeds named when the line's
    columns average different seeds; "failed" / "n/a" for a line without results, "-" for none."""
    if row is None:
        return "-"
    s = row.summaries[metric]
    if metric == "routed" and row.routed_all_patches:
        return ALL_PATCHES
    if s.n:
        return s.fmt(scale, digits, show_seeds=row.seeds_differ)
    return {FAILED: "failed", NOT_APPLICABLE: "n/a"}.get(row.status, "-")


# -- the headline leaderboard ---------------------------------------------------------------------------


def reaches(value: float, bound: float) -> bool:
    """``value >= bound`` within :data:`RULE_TOLERANCE` (a float32 0.89999998 reaches 0.9)."""
    return value >= bound - RULE_TOLERANCE


def at_most(value: float, bound: float) -> bool:
    """``value <= bound`` within :data:`RULE_TOLERANCE` (a CAD of exactly 2 points is at most 2)."""
    return value <= bound + RULE_TOLERANCE


def required_seeds(scenario: dict[str, Any] | None, cells: Iterable[dict[str, Any]] = ()) -> int:
    """Seeds a leaderboard entry needs: the scenario's ``report.min_seeds``, else every seed of the
    scenario (``seeds``), else every seed among ``cells``."""
    scenario = scenario or {}
    setting = (scenario.get("report") or {}).get("min_seeds")
    if setting:
        return int(setting)
    if scenario.get("seeds"):
        return len(set(scenario["seeds"]))
    return max(1, len({int(c["seed"]) for c in cells}))


def _all_seeds(rows: list[Row]) -> int:
    return max(1, len({r.seed for row in rows for r in row.runs}))


def judge(row: Row, required: int) -> tuple[bool | None, str]:
    """Whether ``row`` meets the headline rule; None (and why) when it cannot be judged: no ASR or CAD,
    ASR and CAD over different seeds, or fewer seeds than ``required``."""
    asr, cad = row.asr, row.cad
    for metric, s in (("asr", asr), ("cad", cad)):
        if not s.n:
            return None, f"no {METRIC_NAMES[metric]} ({_why_none(row, metric)})"
    if asr.seeds != cad.seeds:
        return None, f"ASR over {seed_list(asr.seeds)}, CAD over {seed_list(cad.seeds)}"
    if asr.n < required:
        return None, f"n={asr.n} of {required} seeds required"
    return reaches(asr.mean, HEADLINE_ASR) and at_most(cad.mean, HEADLINE_CAD), ""


def _why_none(row: Row, metric: str) -> str:
    """Why a row has no value for ``metric``: its status, or its seeds' gaps for it."""
    if row.status != OK:
        return row.status
    gaps = [f"seed {r.seed}: {r.gaps[metric][0]}" for r in row.with_status(OK) if metric in r.gaps]
    return "; ".join(gaps) or "none stored"


def leaderboard(rows: list[Row], min_seeds: int | None = None) -> list[dict[str, Any]]:
    """Attacks scored under :data:`HEADLINE_RULE`, ranked within each (dataset, model, train, quant,
    defense) group; ``min_seeds`` defaults to every seed the rows have."""
    required = min_seeds or _all_seeds(rows)
    by_attack: dict[tuple[Any, ...], list[Row]] = defaultdict(list)
    for row in rows:
        if row.attack != "clean" and row.poison_rate is not None:
            by_attack[(row.dataset, row.model, row.train, row.quant, row.defense, row.attack)].append(row)
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for key, members in by_attack.items():
        members.sort(key=lambda r: r.poison_rate or 0.0)
        groups[key[:5]].append(_entry(key, members, required))
    out = []
    for group in sorted(groups, key=lambda g: tuple(natural(str(part)) for part in g)):
        out += _ranked(groups[group])
    return out


def _entry(key: tuple[Any, ...], members: list[Row], required: int) -> dict[str, Any]:
    """One attack's leaderboard entry: its lowest qualifying rate and the rates that could not be judged."""
    dataset, model, train, quant, defense, attack = key
    hit, judged, skipped = None, 0, []
    for row in members:
        verdict, why = judge(row, required)
        if verdict is None:
            skipped.append({"poison_rate": row.poison_rate, "reason": why})
            continue
        judged += 1
        if verdict:
            hit = row
            break
    best = max((r for r in members if r.asr.n), key=lambda r: r.asr.mean, default=None)
    statuses = {r.status for r in members}
    if hit is not None:
        status = "reached"
    elif statuses == {NOT_APPLICABLE}:
        status = NOT_APPLICABLE
    elif statuses == {FAILED}:
        status = FAILED
    else:
        status = "not reached" if judged else "not judged"
    return {
        "dataset": dataset, "model": model, "train": train, "quant": quant, "defense": defense, "attack": attack,
        "rank": None, "status": status,
        "score_rate": hit.poison_rate if hit else None,
        "asr_at_score": hit.asr.mean if hit else None,
        "cad_at_score": hit.cad.mean if hit else None,
        "n": hit.asr.n if hit else None, "seeds": list(hit.asr.seeds) if hit else None,
        "required_seeds": required,
        "best_asr": best.asr.mean if best else None, "best_asr_rate": best.poison_rate if best else None,
        "best_asr_n": best.asr.n if best else None, "best_asr_seeds": list(best.asr.seeds) if best else None,
        "not_judged": skipped,
    }


def _score(entry: dict[str, Any]) -> tuple[float, float]:
    """Lower is better: the rate, then the ASR there (rounded, so float32 noise makes no rank)."""
    return (round(entry["score_rate"], 12), -round(entry["asr_at_score"], 6))


def _ranked(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Dense ranks for the entries that reached the rule (equal scores, equal rank); the others after,
    unranked: not reached (best ASR first), not judged, failed, n/a."""
    reached = sorted((e for e in entries if e["status"] == "reached"), key=lambda e: (_score(e), natural(e["attack"])))
    rank, last = 0, None
    for entry in reached:
        if _score(entry) != last:
            rank, last = rank + 1, _score(entry)
        entry["rank"] = rank
    order = {"not reached": 0, "not judged": 1, FAILED: 2, NOT_APPLICABLE: 3}
    rest = sorted((e for e in entries if e["status"] != "reached"),
                  key=lambda e: (order[e["status"]], -(e["best_asr"] or 0.0), natural(e["attack"])))
    return reached + rest


def _group_title(dataset: str, model: str, train: str, quant: str = "fp32", defense: str = "-") -> str:
    title = f"{dataset} · {model}"
    for name, value, default in (("train", train, "-"), ("quantization", quant, "fp32"), ("defense", defense, "-")):
        if value != default:
            title += f" · {name}: {value}"
    return title


def leaderboard_section(rows: list[Row], required: int) -> list[Block]:
    """The leaderboard: one table per group (fp32, no defense), ranks within it, n shown."""
    board = leaderboard([r for r in rows if r.quant == "fp32" and r.defense == "-"], required)
    if not board:
        return []
    lines = [doc.heading(2, "Leaderboard"), doc.paragraph(f"Headline rule: {HEADLINE_RULE}."),
             doc.paragraph(f"Seeds required: {required} (scenario setting `report: {{min_seeds: N}}`; default: "
                           "every seed of the scenario). n: the seeds both means are over. ASR and CAD in %.")]
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
    for e in board:
        groups[(e["dataset"], e["model"], e["train"], e["quant"], e["defense"])].append(e)
    for group, entries in groups.items():
        table = []
        for e in entries:
            notes = [f"{_pct(s['poison_rate'])} not judged: {s['reason']}" for s in e["not_judged"]]
            best = "-" if e["best_asr"] is None else (
                f"{e['best_asr'] * 100:.1f} at {_pct(e['best_asr_rate'])} (n={e['best_asr_n']})")
            table.append([
                "-" if e["rank"] is None else e["rank"], e["attack"],
                _pct(e["score_rate"]) if e["score_rate"] is not None else e["status"],
                "-" if e["asr_at_score"] is None else f"{e['asr_at_score'] * 100:.1f}",
                "-" if e["cad_at_score"] is None else f"{e['cad_at_score'] * 100:.1f}",
                "-" if e["n"] is None else e["n"], best, _md_text("; ".join(notes)),
            ])
        headers = ["rank", "attack", "lowest rate", "ASR there", "CAD there", "n", "best ASR", "note"]
        if not any(t[-1] for t in table):
            headers, table = headers[:-1], [t[:-1] for t in table]
        lines += [doc.heading(3, _group_title(*group)), doc.table(table, headers)]
    return lines


def provenance(records: dict[str, JobRecord]) -> list[dict[str, Any]]:
    """Which code computed the stored jobs behind a report: one entry per (package version, git commit),
    most jobs first. A commit ending in ``+dirty`` ran from a checkout with uncommitted changes."""
    counts = Counter((r.version, r.git_commit) for r in records.values())
    return [{"version": v, "git_commit": c, "jobs": n} for (v, c), n in counts.most_common()]


def provenance_line(entries: list[dict[str, Any]]) -> str | None:
    """One sentence on the code behind the results, a warning when it was not one clean commit."""
    if not entries:
        return None
    if len(entries) == 1 and not entries[0]["git_commit"].endswith("+dirty"):
        e = entries[0]
        return f"All {e['jobs']} stored jobs behind these results ran on commit {e['git_commit'][:12]} " \
               f"(pmoe-bench {e['version']})."
    parts = ", ".join(f"{e['git_commit'][:12]}{'+dirty' if e['git_commit'].endswith('+dirty') else ''} "
                      f"(pmoe-bench {e['version']}, {e['jobs']} job{'s' if e['jobs'] != 1 else ''})"
                      for e in entries)
    return (f"**Provenance: the stored jobs behind these results ran on {len(entries)} code state"
            f"{'s' if len(entries) != 1 else ''}: {parts}.** A job is reused while its spec is unchanged, "
            "even if the code that computed it has changed since (or had uncommitted changes, +dirty); "
            "`bench run --fresh` recomputes every job with the current code.")


def _pct(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:g}%"


def _required(rows: list[Row], meta: dict[str, Any]) -> int:
    """Seeds the leaderboard needs: ``meta["min_seeds"]`` (see :func:`required_seeds`) or every seed."""
    return int(meta.get("min_seeds") or _all_seeds(rows))


def to_markdown(rows: list[Row], meta: dict[str, Any], pictures: list[str] | None = None,
                routing_pictures: list[str] | None = None, transfer_pictures: list[str] | None = None,
                der_pictures: list[str] | None = None, plots: dict[str, list[str]] | None = None) -> str:
    """The report as markdown: header, one Table-1-style table per group, the ranked leaderboard."""
    return "\n".join(doc.markdown_lines(report_blocks(rows, meta, pictures, routing_pictures, transfer_pictures,
                                                        der_pictures, plots)))


def report_blocks(rows: list[Row], meta: dict[str, Any], pictures: list[str] | None = None,
                  routing_pictures: list[str] | None = None, transfer_pictures: list[str] | None = None,
                  der_pictures: list[str] | None = None, plots: dict[str, list[str]] | None = None) -> list[Block]:
    """The report's sections as blocks (:mod:`bench.document`), rendered as markdown or HTML: header, one
    Table-1-style table per group, the ranked leaderboard, defenses, quantization, transfer, pictures.

    ``plots``: the line plots by kind (:func:`bench.plots.draw_plots`: ``asr``, ``dormancy``, ``training``),
    each placed in its section with a caption; none without them."""
    plots = plots or {}
    lines = [doc.heading(1, f"pmoe-bench report: {meta.get('scenario', '?')}")]
    lines.append(doc.paragraph(
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} by pmoe-bench {meta.get('version', __version__)} "
        f"(commit {meta.get('git_commit', 'unknown')}), device {meta.get('device', '?')}. "
        "Values are percentages, mean ± sample std over seeds (n = seeds with a result; the seeds are named "
        "where a line's columns average different ones). Failed and not-applicable cells show as such and "
        "enter no mean. "
        "BA: clean test accuracy. ASR: triggered non-target test images classified as the target (an "
        "all-to-all attack: every triggered test image, counted when classified as (y + 1) mod C). "
        "CAD: BA of the clean model (same model, data, seed) minus BA of the attacked one, never against a "
        "clean model at chance. "
        "RA: triggered non-target images still classified correctly. Trigger routed: triggered images on "
        "which some expert's top-k keeps a patch the trigger touched. Routing Jaccard: mean overlap of each "
        "expert's kept patches, clean vs the same image triggered (1 = unchanged)."
    ))
    origin = provenance_line(meta.get("provenance") or [])
    if origin:
        lines.append(doc.paragraph(origin))
    if meta.get("hardware_warning"):
        lines.append(doc.paragraph(f"**{meta['hardware_warning']}**"))
    groups: dict[tuple[str, ...], list[Row]] = defaultdict(list)
    for row in rows:
        if row.quant == "fp32" and row.defense == "-":  # quantized and defended results: own tables below
            groups[(row.dataset, row.model, row.train, row.quant, row.defense)].append(row)
    for group, members in groups.items():
        lines += [doc.heading(2, _group_title(*group))] + main_table(members)
    lines += leaderboard_section(rows, _required(rows, meta))
    if plots.get("asr"):
        lines += [doc.heading(2, "ASR and BA vs poison rate"),
                  doc.paragraph(f"Per data set and model, one line per attack: mean ASR and BA (%) over seeds at each "
                                f"poison rate (the tables' numbers), the clean model's BA dashed; {PLOT_BAND}.")]
        lines += doc.images(plots["asr"])
    lines += defense_tables(rows)
    lines += doc.images(der_pictures)
    lines += detection_table(meta.get("detections", []))
    lines += quantization_tables(rows)
    if plots.get("dormancy"):
        lines.append(doc.paragraph(f"The Dormancy table as pictures: BA and ASR (%) of each attacked model at fp32 and "
                                   f"each bit-width, one line per scope/variant (line style: back-end); {PLOT_BAND}."))
        lines += doc.images(plots["dormancy"])
    lines += transfer_blocks(rows, transfer_pictures)
    lines += reference_table(rows, meta.get("reference"))
    lines += claim_blocks(meta.get("claims", []))
    if plots.get("training"):
        lines += [doc.heading(2, "Training curves"),
                  doc.paragraph(f"Mean training loss of each epoch as the train jobs stored it, one panel per attack, "
                                f"one line per poison rate, the clean model dashed; {PLOT_BAND}.")]
        lines += doc.images(plots["training"])
    if pictures:
        lines += [doc.heading(2, "Triggers"),
                  doc.paragraph("Clean test images beside each attack's triggered version, over the model's "
                                "patch grid; the lower rows show |x' - x| scaled to its maximum.")]
        lines += doc.images(pictures)
    if routing_pictures:
        lines += [doc.heading(2, "Routing pictures"),
                  doc.paragraph("Drawn by `bench analyze`: which patches each expert keeps on clean and triggered "
                                "images (clean, backdoored and defended models), how often each patch is kept over "
                                "the test set, and the pixel values of the kept patches."),
                  doc.links(routing_pictures)]
    return lines


def main_table(members: list[Row]) -> list[Block]:
    """One Table-1-style table: attack x poison rate -> ASR, BA, CAD, RA (and routing), notes below."""
    foot = Footnotes()
    show_routing = any(r.routed.n or r.jaccard.n for r in members)
    table = []
    for r in members:
        line = [r.attack, _pct(r.poison_rate)] + [cell_text(r, m) for m in ("asr", "ba", "cad", "ra")]
        if show_routing:
            line += [cell_text(r, "routed"), cell_text(r, "jaccard", scale=1, digits=2)]
        table.append(line + ["; ".join(row_notes(r, foot))])
    headers = ["attack", "poison rate", "ASR", "BA", "CAD", "RA"]
    if show_routing:
        headers += ["trigger routed", "routing Jaccard"]
    headers.append("note")
    if not any(t[-1] for t in table):
        headers, table = headers[:-1], [t[:-1] for t in table]
    out = [doc.table(table, headers)]
    if show_routing and any(r.routed_all_patches for r in members):
        out.append(doc.paragraph(ALL_PATCHES_NOTE))
    return out + foot.blocks()


# -- defenses --------------------------------------------------------------------------------------------


def threat_model(name: str) -> str | None:
    """What defense ``name`` sees (its ``sees``: ``model + clean``, ``poisoned``...), None when unknown."""
    from bench.defenses.base import DEFAULT_SEES, sees_label
    from bench.errors import BenchError
    from bench.registry import REGISTRY

    try:
        return sees_label(frozenset(getattr(REGISTRY.get("defense", name).factory, "sees", DEFAULT_SEES)))
    except BenchError:
        return None


def threat_legend(sees: dict[str, str | None]) -> list[Block]:
    """One line naming each defense's threat model (what it sees), or nothing."""
    known = {name: label for name, label in sees.items() if label}
    if not known:
        return []
    return [doc.paragraph("Threat models (what each defense sees; model: the attacked model's weights, clean: the "
                          "defender's clean share, poisoned: the attacker's poisoned training set): "
                          + "; ".join(f"{name}: {label}" for name, label in sorted(known.items())) + ".")]


def defense_tables(rows: list[Row]) -> list[Block]:
    """Defenses as the BadPatches paper's Table 3 (BA and ASR before the defense and after each stage,
    per attack and poison rate), then a leaderboard of defenses ranked by mean DER, per attack (fp32)."""
    defended = [r for r in rows if r.defense != "-" and r.quant == "fp32"]
    if not defended:
        return []
    lines = [doc.heading(2, "Defenses"),
             doc.paragraph("BA and ASR (%) before the defense and after each stage; DER (BackdoorBench) = "
                           "[max(0, ASR drop) - max(0, BA drop) + 1] / 2 per seed against the same model before the "
                           "defense, 1 is best, 0.5 means no effect.")]
    lines += threat_legend({n: threat_model(n) for n in sorted({r.specs["defense"]["name"] for r in defended
                                                                if r.specs.get("defense")})})
    before = {(r.dataset, r.model, r.train, r.attack, r.poison_rate): r
              for r in rows if r.defense == "-" and r.quant == "fp32"}
    groups: dict[tuple[Any, ...], list[Row]] = defaultdict(list)
    for r in defended:
        groups[(r.dataset, r.model, r.train, r.attack, r.poison_rate)].append(r)
    for key, members in groups.items():
        dataset, model, train, attack, rate = key
        what = f"{attack} at {_pct(rate)}" if rate is not None else f"{attack} model (no attack)"
        lines.append(doc.heading(3, f"{_group_title(dataset, model, train)} · {what}"))
        foot = Footnotes()
        ref = before.get(key)
        table = [["before defense", cell_text(ref, "ba"), cell_text(ref, "asr"), "-",
                  "; ".join(row_notes(ref, foot)) if ref else "not in this plan"]]
        table += [[r.defense, cell_text(r, "ba"), cell_text(r, "asr"), cell_text(r, "der", scale=1, digits=3),
                   "; ".join(row_notes(r, foot))] for r in members]
        headers = ["stage", "BA", "ASR", "DER", "note"]
        if not any(t[-1] for t in table):
            headers, table = headers[:-1], [t[:-1] for t in table]
        lines += [doc.table(table, headers)] + foot.blocks()
    ranked = sorted([r for r in defended if r.attack != "clean"],  # DER needs a backdoor to remove
                    key=lambda r: (r.dataset, r.model, natural(r.train), r.attack,
                                             -(r.der.mean if r.der.n else -1)))
    show_train = any(r.train != "-" for r in ranked)
    table = [[r.dataset, r.model] + ([r.train] if show_train else []) + [
        r.attack, _pct(r.poison_rate), r.defense, cell_text(r, "der", scale=1, digits=3), cell_text(r, "asr"),
        cell_text(r, "ba")] for r in ranked]
    headers = ["dataset", "model"] + (["train"] if show_train else []) + [
        "attack", "poison rate", "defense / stage", "DER", "ASR", "BA"]
    lines += [doc.heading(3, "Defense leaderboard (by DER)"), doc.table(table, headers)]
    return lines


#: Metric names that hold a label (a class), not a quantity: shown as counts, never averaged.
LABEL_NAME = re.compile(r"(^|_)(class|label|target)$")
#: Label values longer than this (per-class lists) are listed in the JSON report only.
LONG_LABEL = 40


def _is_label(name: str, values: list[Any]) -> bool:
    """Whether a defense metric is categorical: a label-like name, or any text or boolean value."""
    return bool(LABEL_NAME.search(name)) or any(isinstance(v, str | bool) for v in values)


def _label_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def detections(defenses: list[dict[str, Any]], records: dict[str, JobRecord]) -> list[dict[str, Any]]:
    """What each defense measured on its own terms (Neural Cleanse's flagged class and anomaly index,
    STRIP's FRR / FAR / AUROC), one entry per setting (every varying dataset, model, train, attack,
    poison rate and defense parameter) and stage: quantities as mean ± std over the seeds that have them
    (NaN left out), labels such as the flagged class as the seeds that gave each value."""
    labels = setting_labels(defenses)
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for d in defenses:
        key = (component_label(d["dataset"], labels["dataset"]), component_label(d["model"], labels["model"]),
               _train_label(d.get("train") or {}, labels["train"]), component_label(d["attack"], labels["attack"]),
               d["poison_rate"], component_label(d["defense"], labels["defense"]))
        groups[key].append(d)
    out = []
    for key, members in groups.items():
        runs = sorted((_defend_run(d, records) for d in members), key=lambda r: r[0].seed)
        stages: list[str] = []
        for _, metrics in runs:
            stages += [k for k, v in metrics.items() if isinstance(v, dict) and k not in stages]
        sees = threat_model(members[0]["defense"]["name"])
        out += [{**_detection_entry(key, stage, runs), "sees": sees} for stage in stages or ["-"]]
    return out


def _defend_run(d: dict[str, Any], records: dict[str, JobRecord]) -> tuple[SeedRun, dict[str, Any]]:
    """One seed of a defense setting: its defend job's status and stored metrics."""
    run = SeedRun(int(d["seed"]), d.get("job") or "")
    if d.get("not_applicable"):
        run.status, run.reason = NOT_APPLICABLE, str(d["not_applicable"])
        return run, {}
    record = records.get(run.eval_job)
    run.status, run.reason, run.failed_epoch = job_outcome(record)
    return run, (record.metrics if record is not None and run.status == OK else {})


def _detection_entry(key: tuple[Any, ...], stage: str, runs: list[tuple[SeedRun, dict[str, Any]]]) -> dict[str, Any]:
    dataset, model, train, attack, rate, defense = key
    values: dict[str, list[tuple[int, Any]]] = defaultdict(list)
    seeds = []
    for run, metrics in runs:
        stage_metrics = metrics.get(stage)
        if run.status != OK or not isinstance(stage_metrics, dict):
            continue
        seeds.append(run.seed)
        for name, value in stage_metrics.items():
            values[name].append((run.seed, value))
    numeric: dict[str, dict[str, Any]] = {}
    categorical: dict[str, dict[str, list[int]]] = {}
    for name in sorted(values):
        pairs = values[name]
        if _is_label(name, [v for _, v in pairs]):
            counts: dict[str, list[int]] = defaultdict(list)
            for seed, value in pairs:
                counts[_label_text(value)].append(seed)
            categorical[name] = dict(sorted(counts.items(), key=lambda kv: (-len(kv[1]), kv[1])))
        elif all(_number(v) is not None for _, v in pairs):
            s = summarize_seeds((seed, _number(v)) for seed, v in pairs)
            numeric[name] = {"mean": _json_float(s.mean), "std": _json_float(s.std), "n": s.n, "seeds": list(s.seeds)}
    statuses = {run.status for run, _ in runs}
    return {
        "dataset": dataset, "model": model, "train": train, "attack": attack, "poison_rate": rate,
        "defense": defense, "stage": stage,
        "status": OK if seeds else (NOT_APPLICABLE if statuses == {NOT_APPLICABLE} else
                                    FAILED if FAILED in statuses else PENDING),
        "planned_seeds": [run.seed for run, _ in runs], "seeds": seeds, "n": len(seeds),
        "metrics": numeric, "labels": categorical,
        "runs": [{"seed": run.seed, "job": run.eval_job or None, "status": run.status, "reason": run.reason or None,
                  "failed_epoch": run.failed_epoch} for run, _ in runs],
    }


def _detection_text(entry: dict[str, Any]) -> str:
    """An entry's metrics in one cell: quantities as mean ± std, labels as value ×count (seeds)."""
    parts = []
    for name, s in entry["metrics"].items():
        if not s["n"]:
            parts.append(f"{name}=- (n=0)")
            continue
        text = f"{name}={s['mean']:.3g}" + (f" ± {s['std']:.2g}" if s["n"] > 1 else "")
        if s["seeds"] != entry["seeds"]:
            text += f" (n={s['n']}: {seed_list(s['seeds'])})"
        parts.append(text)
    for name, counts in entry["labels"].items():
        if any(len(value) > LONG_LABEL for value in counts):
            parts.append(f"{name}: per seed in the JSON report")
            continue
        shown = ", ".join(f"{value} ×{len(seeds)} ({seed_list(seeds)})" for value, seeds in counts.items())
        parts.append(f"{name}: {shown}")
    return _md_text(", ".join(parts))


def detection_table(entries: list[dict[str, Any]]) -> list[Block]:
    """Detection results, one line per defense setting, attacked model and stage."""
    if not entries:
        return []
    foot = Footnotes()
    show_train = any(e.get("train", "-") != "-" for e in entries)
    table = []
    for e in entries:
        notes = []
        for status in (FAILED, NOT_APPLICABLE):
            runs = [r for r in e["runs"] if r["status"] == status]
            by_reason: dict[str, list[dict[str, Any]]] = defaultdict(list)
            for r in runs:
                by_reason[r["reason"] or ""].append(r)
            for reason, group in by_reason.items():
                jobs = ", ".join(r["job"] for r in group if r["job"]) or "planned as not applicable"
                seeds = seed_list(r["seed"] for r in group)
                notes.append(f"{status}: {seeds} {foot.ref(f'{status}: {seeds} ({jobs}): {reason}')}")
        pending = [r["seed"] for r in e["runs"] if r["status"] == PENDING]
        if pending:
            notes.append(f"pending: {seed_list(pending)}")
        shown = _detection_text(e) if e["n"] else {FAILED: "failed", NOT_APPLICABLE: "n/a"}.get(e["status"], "-")
        table.append([e["dataset"], e["model"]] + ([e.get("train", "-")] if show_train else []) + [
            e["attack"], _pct(e["poison_rate"]), e["defense"], e["stage"], e["n"], shown, "; ".join(notes)])
    headers = ["dataset", "model"] + (["train"] if show_train else []) + [
        "attack", "poison rate", "defense", "stage", "n", "metrics", "note"]
    if not any(t[-1] for t in table):
        headers, table = headers[:-1], [t[:-1] for t in table]
    return [doc.heading(2, "Defense metrics"),
            doc.paragraph("What each defense measured on its own terms (detection: flagged class, anomaly index; "
                          "STRIP: false rejection / acceptance, AUROC): quantities as mean ± std over the n seeds "
                          "(NaN values left out, their n shown), labels such as the flagged class as value ×count "
                          "(seeds), never averaged."),
            *threat_legend({e["defense"].split(" (")[0]: e.get("sees") for e in entries}),
            doc.table(table, headers)] + foot.blocks()


# -- published values ----------------------------------------------------------------------------------

#: Reference-row fields that narrow a match, and the cell part each one is matched against (flat keys:
#: trigger parameters inline, ``target`` and ``objective.*`` under ``params``).
REFERENCE_FIELDS = {"dataset_params": "dataset", "model_params": "model", "params": "attack", "train": "train"}


def _same(a: Any, b: Any) -> bool:
    """Equal, numbers within float rounding (a reference's 0.1 is the cell's 0.1)."""
    x, y = _number(a), _number(b)
    if x is not None and y is not None:
        return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def reference_matches(ref: dict[str, Any], specs: dict[str, Any], poison_rate: float | None) -> bool:
    """Whether the reference row ``ref`` names the cell setting ``specs`` (dataset, model, attack, train
    dicts) at ``poison_rate``: dataset, trigger name, apply, poison rate, ``model`` when given, and every
    field of its ``dataset_params``, ``model_params``, ``params`` and ``train`` blocks (a field set to null
    names the cells without it, e.g. ``params: {objective: null}``)."""
    attack = specs.get("attack")
    if not attack or poison_rate is None or not _same(poison_rate, ref["poison_rate"]):
        return False
    if (specs["dataset"]["name"] != ref["dataset"] or attack["name"] != ref["attack"]
            or attack.get("apply", "image") != (ref.get("apply") or "image")):
        return False
    if ref.get("model") not in (None, specs["model"]["name"]):
        return False
    for ref_field, part in REFERENCE_FIELDS.items():
        flat = _flat(specs.get(part) or {})
        for k, v in _flat(ref.get(ref_field) or {}).items():
            if v is None:
                if flat.get(k) is not None or any(x.startswith(f"{k}.") for x in flat):
                    return False
            elif k not in flat or not _same(flat[k], v):
                return False
    return True


def reference_differences(settings: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """The reference-row fields (``model``, ``model_params.experts``, ``train.lr`` ...) whose values differ
    between ``settings`` (cell specs): what a reference row must add to name one of them. Parameters are
    compared between components of the same name; a block some settings lack (a ``qcb`` objective) is one
    field, ``params.objective``, set or null."""
    out: dict[str, list[Any]] = {}
    names = sorted({json.dumps(s["model"]["name"]) for s in settings})
    if len(names) > 1:
        out["model"] = [json.loads(n) for n in names]
    for ref_field, part in REFERENCE_FIELDS.items():
        by_name: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for s in settings:
            spec = s.get(part) or {}
            by_name[str(spec.get("name", ""))].append(_flat(spec))
        for flats in by_name.values():
            for k, values in _differing(flats).items():
                out.setdefault(f"{ref_field}.{k}", values)
    return out


def _differing(flats: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Flat keys whose values differ between ``flats``; a dotted block absent from some as the block."""
    out: dict[str, list[Any]] = {}
    for k in sorted({k for f in flats for k in f} - {"name", "apply"}):
        block = k.split(".", 1)[0]
        if "." in k and any(not any(x.startswith(f"{block}.") for x in f) for f in flats):
            out.setdefault(block, ["set", None])
            continue
        seen = sorted({json.dumps(f.get(k), sort_keys=True, default=str) for f in flats})
        if len(seen) > 1:
            out[k] = [json.loads(v) for v in seen]
    return out


def _reference_candidates(cells: list[dict[str, Any]]) -> list[tuple[dict[str, Any], float]]:
    """The distinct attacked settings a reference row may name (fp32, no defense, seed left out)."""
    seen: dict[str, tuple[dict[str, Any], float]] = {}
    by_id: set[tuple[int, ...]] = set()
    for cell in cells:
        if (not cell.get("attack") or cell.get("defense") or cell.get("not_applicable")
                or _quant_label(cell.get("quant")) != "fp32" or cell.get("poison_rate") is None):
            continue
        specs = {k: cell.get(k) for k in ("dataset", "model", "attack", "train")}
        ids = (*(id(v) for v in specs.values()), hash(cell["poison_rate"]))
        if ids in by_id:  # a plan's cells share their component dicts: most repeats end here
            continue
        by_id.add(ids)
        text = json.dumps([specs, cell["poison_rate"]], sort_keys=True, default=str)
        seen.setdefault(text, (specs, float(cell["poison_rate"])))
    return list(seen.values())


#: Fields a reference error lists before "and N more".
MAX_FIELDS = 6


def check_reference(reference: dict[str, Any] | None, cells: list[dict[str, Any]], source: str) -> None:
    """Refuse a reference row that matches several cells of the plan (it would compare one of them at
    random): a :class:`ScenarioError` naming the file, the row (``reference.values[3]``) and the fields to
    add to it. A row that matches no cell is allowed (the report says so)."""
    if not reference or not reference.get("values"):
        return
    candidates = _reference_candidates(cells)
    for i, ref in enumerate(reference["values"]):
        matches = [specs for specs, rate in candidates if reference_matches(ref, specs, rate)]
        if len(matches) < 2:
            continue
        differ = reference_differences(matches)
        shown = [f"{k} ({' / '.join(json.dumps(v, default=str) for v in vals)})" for k, vals in differ.items()]
        more = len(shown) - MAX_FIELDS
        fields = ", ".join(shown[:MAX_FIELDS]) + (f" and {more} more" if more > 0 else "")
        raise ScenarioError(
            f"{source}: reference.values[{i}]: matches {len(matches)} cells of this scenario (dataset "
            f"{ref['dataset']}, attack {ref['attack']}, apply {ref.get('apply') or 'image'}, poison rate "
            f"{ref['poison_rate']}), which differ in {fields}; add "
            f"{' and '.join(sorted({k.split('.', 1)[0] for k in differ}))} to this reference row "
            f"(e.g. {_example(differ, matches)}) so that it names one cell"
        )


def _example(differ: dict[str, list[Any]], matches: list[dict[str, Any]]) -> str:
    """A reference-row snippet naming one of ``matches`` (``model_params: {experts: 2}``), taken from the
    match with the fewest parameters (a block it lacks is written null)."""
    cell = min(matches, key=lambda m: sum(len(_flat(m.get(part) or {})) for part in REFERENCE_FIELDS.values()))
    blocks: dict[str, list[str]] = defaultdict(list)
    for key in differ:
        ref_field, _, name = key.partition(".")
        if ref_field == "model":
            blocks["model"].append(json.dumps(cell["model"]["name"]))
            continue
        flat = _flat(cell.get(REFERENCE_FIELDS[ref_field]) or {})
        if name in flat:
            value = flat[name]
        else:  # a block: its fields, or null when this cell lacks it
            inner = {k.removeprefix(f"{name}."): v for k, v in flat.items() if k.startswith(f"{name}.")}
            value = inner or None
        blocks[ref_field].append(f"{name}: {json.dumps(value, default=str)}")
    return ", ".join(f"model: {v[0]}" if f == "model" else f"{f}: {{{', '.join(v)}}}" for f, v in blocks.items())


def reference_entries(rows: list[Row], reference: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Each reference row beside the one row of ours it names (fp32, no defense): ours, theirs, n; or
    why there is none (no cell, several cells)."""
    if not reference or not reference.get("values"):
        return []
    candidates = [r for r in rows if r.quant == "fp32" and r.defense == "-" and r.specs.get("attack")]
    out = []
    for i, ref in enumerate(reference["values"]):
        matches = [r for r in candidates if reference_matches(ref, r.specs, r.poison_rate)]
        entry: dict[str, Any] = {"index": i, "reference": ref, "matches": len(matches), "cell": None, "note": None}
        if len(matches) == 1:
            row = matches[0]
            entry["cell"] = " · ".join(x for x in (row.model, row.attack, row.train) if x != "-")
            for metric in ("asr", "ba", "cad"):
                s = row.summaries[metric]
                entry[metric] = {"ours": _json_float(s.mean * 100) if s.n else None, "theirs": ref.get(metric),
                                 "n": s.n, "seeds": list(s.seeds)}
            notes = row_notes(row)
            entry["note"] = "; ".join(notes) or None
        elif matches:
            fields = ", ".join(reference_differences([r.specs for r in matches]))
            entry["note"] = f"{len(matches)} cells match; add {fields} to reference.values[{i}]"
        else:
            entry["note"] = "no cell of this scenario matches"
        out.append(entry)
    return out


def reference_table(rows: list[Row], reference: dict[str, Any] | None) -> list[Block]:
    """Ours beside the published values of the scenario's ``reference`` block, cell by cell (fp32)."""
    entries = reference_entries(rows, reference)
    if not entries:
        return []
    table = []
    for e in entries:
        ref = e["reference"]
        line: list[Any] = [ref["dataset"], ref["attack"], ref.get("apply") or "image", _pct(ref["poison_rate"]),
                           e["cell"] or "-"]
        ns = {m: e[m]["n"] for m in ("asr", "ba", "cad")} if e["cell"] else {}
        seeds = {tuple(e[m]["seeds"]) for m in ("asr", "ba", "cad") if e["cell"] and e[m]["n"]}
        line.append("-" if not ns else (max(ns.values()) if len(seeds) <= 1 else
                                        ", ".join(f"{m.upper()} {n}" for m, n in ns.items())))
        for metric in ("asr", "ba", "cad"):
            ours = e[metric]["ours"] if e["cell"] else None
            theirs = ref.get(metric)
            line += [
                "-" if ours is None else f"{ours:.1f}",
                "-" if theirs is None else f"{theirs:.1f}",
                "-" if ours is None or theirs is None else f"{ours - theirs:+.1f}",
            ]
        table.append(line + [_md_text(e["note"] or "")])
    headers = ["dataset", "trigger", "apply", "poison rate", "our cell", "n", "ASR ours", "ASR theirs", "Δ",
               "BA ours", "BA theirs", "Δ", "CAD ours", "CAD theirs", "Δ", "note"]
    return [doc.heading(2, f"Published values: {reference.get('source', '')}"),
            doc.paragraph("Ours (mean over the n seeds, fp32, no defense) beside the published numbers; Δ = ours - "
                          "theirs, in points. A reference row names one cell of ours (dataset, trigger, apply, poison "
                          "rate, and its model, model_params, params, dataset_params and train fields when given)."),
            doc.table(table, headers)]


# -- claims ----------------------------------------------------------------------------------------------


def _claim_seed_cell(verdict: dict[str, Any]) -> str:
    shown = " ".join("-" if v is None else f"{v * 100:.2f}" for v in verdict["values"])
    return f"{'met' if verdict['met'] else 'NOT met'} ({shown})"


def claim_blocks(results: list[dict[str, Any]]) -> list[Block]:
    """The Claims section from :func:`bench.claims.check_claims`'s results (``meta["claims"]``): one line per
    claim with each seed's verdict and values (%), the outcome, then the rows each claim picked."""
    if not results:
        return []
    seeds = sorted({s["seed"] for r in results for s in r["per_seed"]})
    table = []
    for r in results:
        claim, by_seed = r["claim"], {s["seed"]: s for s in r["per_seed"]}
        table.append([_md_text(claim["text"]), claim["metric"].upper().replace("_", " "),
                      _md_text(", ".join(claim["at"])),
                      r["bounds"], *[_claim_seed_cell(by_seed[s]) if s in by_seed else "-" for s in seeds],
                      _md_text(r["verdict"])])
    lines = [doc.heading(2, "Claims"),
             doc.paragraph("What this scenario claims about its results (`report.claims`), checked on every seed from "
                           "the stored runs each time the report is written. Per seed: met or not, and the values (%) "
                           "of the rows the claim picks, in the order listed below the table; a seed without a value "
                           "never counts as met. BA DROP: the clean model's fp32 BA (same seed) minus the row's BA."),
             doc.table(table, ["claim", "metric", "at", "bound", *[f"seed {s}" for s in seeds], "outcome"])]
    for r in results:
        text = _md_text(r["claim"]["text"])
        if r["rows"]:
            lines.append(doc.paragraph(f'Rows of "{text}": ' + "; ".join(_md_text(x) for x in r["rows"])))
        failing = [f"seed {s['seed']}: {s['why']}" for s in r["per_seed"] if not s["met"]]
        if failing:
            lines.append(doc.paragraph(f'"{text}" is not met on ' + "; ".join(_md_text(f) for f in failing)))
    return lines


# -- quantization ----------------------------------------------------------------------------------------


def _bits(label: str) -> str:
    return label.split("/")[0]


def _variant(label: str) -> str:
    return label.split("/", 1)[1] if "/" in label else "-"


def _bits_order(bits: str) -> tuple[int, int]:
    return (0, 0) if bits == "fp32" else (1, -int(bits.removeprefix("int")))


def _pair(row: Row | None) -> tuple[str, tuple[int, ...] | None]:
    """A dormancy cell, "BA / ASR", and the seeds both are over (None when they differ or there are none)."""
    if row is None:
        return "-", None
    if not row.ba.n:
        return {FAILED: "failed", NOT_APPLICABLE: "n/a"}.get(row.status, "-"), None
    asr = f"{row.asr.mean * 100:.1f}" if row.asr.n else "-"
    text = f"{row.ba.mean * 100:.1f} / {asr}"
    if row.asr.n and row.asr.seeds != row.ba.seeds:
        return f"{text} (BA {seed_list(row.ba.seeds)}, ASR {seed_list(row.asr.seeds)})", None
    return text, row.ba.seeds


def quantization_tables(rows: list[Row]) -> list[Block]:
    """The quantized-backdoor paper's layouts, when the scenario has a quantization axis.

    * Accuracy under quantization (its Table 1): clean models per training setting (QAT rows included)
      and PTQ config -> BA and the change against the same model at fp32 (over the same seeds).
    * Dormancy: per attack and poison rate (and train setting and defense stage, where they vary), BA / ASR
      at fp32 and every bit-width, one line per scope and variant, with the seeds they are over.
    """
    if all(r.quant == "fp32" for r in rows):
        return []
    lines = [doc.heading(2, "Accuracy under quantization"),
             doc.paragraph("Clean models. PTQ: post-training quantization of the trained weights (Eq. 2); "
                           "train: the training setting (qat_bits = quantization-aware training). Δ: BA change "
                           "against fp32, over the same seeds.")]
    fp32 = {(r.dataset, r.model, r.train, r.defense, r.attack, r.poison_rate): r for r in rows if r.quant == "fp32"}
    show_defense = any(r.attack == "clean" and r.defense != "-" for r in rows)  # defend_clean
    table = []
    for r in rows:
        if r.attack != "clean":
            continue
        ref = fp32.get((r.dataset, r.model, r.train, r.defense, r.attack, r.poison_rate))
        if ref is None or r.quant == "fp32" or not ref.ba.n or not r.ba.n:
            delta = "-"
        elif ref.ba.seeds != r.ba.seeds:
            delta = f"- (fp32 over {seed_list(ref.ba.seeds)})"
        else:
            delta = f"{(r.ba.mean - ref.ba.mean) * 100:+.2f}"
        table.append([r.dataset, r.model, r.train] + ([r.defense] if show_defense else [])
                     + [r.quant, cell_text(r, "ba", scale=100, digits=2), delta])
    headers = ["dataset", "model", "train"] + (["defense"] if show_defense else []) + ["PTQ", "BA", "Δ vs fp32"]
    lines.append(doc.table(table, headers))

    bits = sorted({_bits(r.quant) for r in rows}, key=_bits_order)
    lines += [doc.heading(2, "Dormancy"),
              doc.paragraph("BA / ASR (%) of each attacked model at fp32 and after PTQ at each bit-width, per scope "
                            "and variant, mean over the n seeds (named in a cell whose seeds differ from its line's). "
                            "Dormancy gap = ASR at the target bit-width - ASR at fp32.")]
    cells: dict[tuple[Any, ...], dict[str, Row]] = defaultdict(dict)
    for r in rows:
        if r.attack == "clean":
            continue
        cells[(r.dataset, r.model, r.train, r.defense, r.attack, r.poison_rate)][r.quant] = r
    show_train = any(key[2] != "-" for key in cells)
    show_defense = any(key[3] != "-" for key in cells)
    table = []
    for (dataset, model, train, defense, attack, rate), by_quant in cells.items():
        base = by_quant.get("fp32")
        for variant in sorted({_variant(q) for q in by_quant if q != "fp32"}):
            pairs = [_pair(base if b == "fp32" else by_quant.get(f"{b}/{variant}")) for b in bits]
            seed_sets = {seeds for text, seeds in pairs if text not in ("-", "failed", "n/a")}
            same = len(seed_sets) == 1 and None not in seed_sets
            n = len(next(iter(seed_sets))) if same else "varies"
            shown = [text if same or seeds is None else f"{text} (n={len(seeds)}: {seed_list(seeds)})"
                     for text, seeds in pairs]
            table.append([dataset, model] + ([train] if show_train else []) + ([defense] if show_defense else [])
                         + [attack, _pct(rate), variant, n if seed_sets else "-", *shown])
    headers = (["dataset", "model"] + (["train"] if show_train else []) + (["defense"] if show_defense else [])
               + ["attack", "poison rate", "scope/variant", "n", *bits])
    lines.append(doc.table(table, headers))
    return lines


# -- machine-readable outputs ----------------------------------------------------------------------------


def _csv_value(value: Any) -> Any:
    """Lists of plain values as space-separated text; nested structures as JSON."""
    if isinstance(value, list) and all(isinstance(v, int | float | str) for v in value):
        return " ".join(str(v) for v in value)
    if isinstance(value, list | dict):
        return json.dumps(value, sort_keys=True)
    return value


def to_csv(rows: list[Row]) -> str:
    """One CSV line per aggregated row, fractions (not percentages): the JSON row's fields, seeds lists as
    space-separated numbers, notes joined by "; ", runs and failures as JSON."""
    buf = io.StringIO()
    dicts = [r.to_dict() for r in rows]
    if not dicts:
        return ""
    for d in dicts:
        d["notes"] = "; ".join(d["notes"])
    writer = csv.DictWriter(buf, fieldnames=list(dicts[0]))
    writer.writeheader()
    writer.writerows({k: _csv_value(v) for k, v in d.items()} for d in dicts)
    return buf.getvalue()


def to_json(rows: list[Row], meta: dict[str, Any]) -> str:
    """Rows, leaderboard and published-value comparison as JSON, fractions (not percentages)."""
    required = _required(rows, meta)
    return json.dumps(
        {"meta": meta, "headline_rule": HEADLINE_RULE, "rule_tolerance": RULE_TOLERANCE,
         "required_seeds": required, "rows": [r.to_dict() for r in rows],
         "leaderboard": leaderboard(rows, required), "reference": reference_entries(rows, meta.get("reference"))},
        indent=2,
    )

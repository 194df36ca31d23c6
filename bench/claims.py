"""The claims a scenario makes about its results (``report.claims``), checked seed by seed from the stored runs.

A scenario header that says "asleep at fp32 in every seed" is a sentence somebody typed; a claim is the same
sentence that the report checks against the numbers every time it is written. Each claim picks report rows
(attack, poison rate, model, data set, defense stage, and the evaluations in ``at``), reads one metric per
seed and compares it with its bounds. A seed meets the claim when every picked row has a value for it and
every value is within the bounds; the claim holds when every planned seed meets it and there are at least
the report's required seeds (``report.min_seeds``). A seed without a value (pending, failed, n/a) never
counts as met, so a claim cannot hold on missing runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench.report import OK, RULE_TOLERANCE, Row, at_most, reaches
from bench.scenario import Claim


@dataclass
class SeedVerdict:
    """One seed of a claim: its values (one per picked row, in row order; None = no value) and the verdict."""

    seed: int
    values: list[float | None]
    met: bool
    why: str = ""


@dataclass
class ClaimResult:
    """A claim, the rows it picked (their labels) and each planned seed's verdict."""

    claim: Claim
    rows: list[str]
    seeds: list[SeedVerdict] = field(default_factory=list)
    required: int = 1
    problem: str = ""  # why no row could be checked (a label that matches nothing)

    @property
    def met(self) -> int:
        return sum(s.met for s in self.seeds)

    @property
    def holds(self) -> bool:
        """Every planned seed meets it, and there are at least the required seeds."""
        return not self.problem and bool(self.seeds) and self.met == len(self.seeds) >= self.required

    @property
    def verdict(self) -> str:
        if self.problem:
            return f"not checked: {self.problem}"
        word = "holds" if self.holds else "does not hold"
        text = f"{word}: met in {self.met} of {len(self.seeds)} seeds"
        if len(self.seeds) < self.required:
            text += f" ({self.required} required)"
        return text

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the report's ``meta["claims"]``, drawn by :func:`bench.report.claim_blocks`): the claim,
        its bounds as text, its rows, each seed's values (fractions) and verdict, and the outcome."""
        return {
            "claim": self.claim.model_dump(), "bounds": bounds_text(self.claim), "verdict": self.verdict,
            "rows": self.rows, "holds": self.holds, "met": self.met,
            "seeds": len(self.seeds), "required": self.required, "problem": self.problem or None,
            "per_seed": [{"seed": s.seed, "values": s.values, "met": s.met, "why": s.why or None}
                         for s in self.seeds],
        }


def bounds_text(claim: Claim) -> str:
    """``<= 2%``, ``>= 97%`` or ``>= 1% and <= 3%``, in percent (as the report shows its numbers)."""
    parts = []
    if claim.at_least is not None:
        parts.append(f">= {claim.at_least * 100:g}%")
    if claim.at_most is not None:
        parts.append(f"<= {claim.at_most * 100:g}%")
    return " and ".join(parts)


def within(value: float, claim: Claim) -> bool:
    """Whether ``value`` meets the claim's bounds (within the report's rule tolerance)."""
    low_ok = claim.at_least is None or reaches(value, claim.at_least)
    return low_ok and (claim.at_most is None or at_most(value, claim.at_most))


def _picks(claim: Claim, row: Row) -> bool:
    if row.quant not in claim.at or row.defense != claim.defense:
        return False
    if claim.attack is None:
        if row.attack == "clean" and claim.metric in ("asr", "ra", "cad", "ba_drop"):
            return False
    elif row.attack != claim.attack:
        return False
    if claim.poison_rate is not None and (
            row.poison_rate is None or abs(row.poison_rate - claim.poison_rate) > RULE_TOLERANCE):
        return False
    return (claim.model is None or row.model == claim.model) and (claim.dataset is None or row.dataset == claim.dataset)


def _clean_fp32(rows: list[Row]) -> dict[tuple[str, str, str, int], float]:
    """Clean models' fp32 BA by (data set, model, training, seed): the reference of ``ba_drop``. A clean model
    at chance is no reference (as for CAD): its seed gets no value, so it cannot meet the claim."""
    out = {}
    for row in rows:
        if row.attack == "clean" and row.quant == "fp32" and row.defense == "-":
            for run in row.runs:
                at_chance = any(short == "at chance" for short, _ in run.notes)
                if run.status == OK and "ba" in run.values and not at_chance:
                    out[(row.dataset, row.model, row.train, run.seed)] = run.values["ba"]
    return out


def _value(claim: Claim, row: Row, seed: int, clean: dict[tuple[str, str, str, int], float]) -> float | None:
    run = next((r for r in row.runs if r.seed == seed), None)
    if run is None or run.status != OK:
        return None
    if claim.metric != "ba_drop":
        return run.values.get(claim.metric)
    reference = clean.get((row.dataset, row.model, row.train, seed))
    return None if reference is None or "ba" not in run.values else reference - run.values["ba"]


def _label(row: Row) -> str:
    rate = "" if row.poison_rate is None else f" {row.poison_rate * 100:g}%"
    stage = "" if row.defense == "-" else f" + {row.defense}"
    return f"{row.dataset}/{row.model} {row.attack}{rate}{stage} @ {row.quant}"


def _unmatched(claim: Claim, rows: list[Row], labels: list[str]) -> str:
    """Why a claim picks no row at the evaluations ``labels``: what it asked for, and what the report has."""
    def names(values: set[str]) -> str:
        return ", ".join(sorted(values)) or "none"
    rate = "any" if claim.poison_rate is None else f"{claim.poison_rate * 100:g}%"
    asked = (f"attack {claim.attack or 'any'}, poison rate {rate}, model {claim.model or 'any'}, data set "
             f"{claim.dataset or 'any'}, defense {claim.defense}")
    return (f"no row at {', '.join(labels)} matches ({asked}); the report has attacks "
            f"{names({r.attack for r in rows})}; poison rates "
            f"{names({f'{r.poison_rate * 100:g}%' for r in rows if r.poison_rate is not None})}; models "
            f"{names({r.model for r in rows})}; data sets {names({r.dataset for r in rows})}; evaluations "
            f"{names({r.quant for r in rows})}; defense stages {names({r.defense for r in rows})}")


def check_claim(claim: Claim, rows: list[Row], required: int) -> ClaimResult:
    """One claim against the report's rows: each planned seed's values and verdict."""
    picked = sorted((r for r in rows if _picks(claim, r)), key=lambda r: claim.at.index(r.quant))  # stable
    result = ClaimResult(claim, [_label(r) for r in picked], required=required)
    missing = [label for label in claim.at if all(r.quant != label for r in picked)]
    if missing:  # a typo in one label must not leave the claim checked on the others alone
        result.problem = _unmatched(claim, rows, missing)
        return result
    clean = _clean_fp32(rows) if claim.metric == "ba_drop" else {}
    for seed in sorted({run.seed for row in picked for run in row.runs}):
        values = [_value(claim, row, seed, clean) for row in picked]
        missing = [result.rows[i] for i, v in enumerate(values) if v is None]
        outside = [f"{result.rows[i]}: {v * 100:.2f}%" for i, v in enumerate(values)
                   if v is not None and not within(v, claim)]
        why = "; ".join(([f"no value for {', '.join(missing)}"] if missing else []) + outside)
        result.seeds.append(SeedVerdict(seed, values, not missing and not outside, why))
    return result


def check_claims(claims: list[dict[str, Any]], rows: list[Row], required: int) -> list[ClaimResult]:
    """Every claim of a scenario's ``report.claims`` (raw dicts, as stored with the plan)."""
    return [check_claim(Claim.model_validate(c), rows, required) for c in claims]

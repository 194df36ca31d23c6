"""A scenario's claims (bench.claims): checked seed by seed, never met on a missing run, refused at plan time
when they pick no row, and shown in the report (markdown and JSON) of a real run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from bench.claims import check_claim, check_claims
from bench.cli import app
from bench.report import FAILED, PENDING, Row, SeedRun
from bench.runner import prepare
from bench.scenario import Claim
from tests.conftest import tiny_scenario

runner = CliRunner()


def row(attack: str, quant: str, values: dict[int, dict[str, float] | str], rate: float | None = 0.01,
        model: str = "pmoe", defense: str = "-") -> Row:
    """A report row with one seed per entry: its metric values, or a status (pending / failed)."""
    runs = []
    for seed, v in values.items():
        runs.append(SeedRun(seed, status=v) if isinstance(v, str) else SeedRun(seed, values=dict(v)))
    return Row("mnist", model, "-", attack, None if attack == "clean" else rate, quant, defense, runs)


def claim(**fields: Any) -> Claim:
    return Claim(**{"text": "t", "attack": "badnets+qcb", "metric": "asr", **fields})


ASLEEP = claim(at=["fp32", "int8/whole"], at_most=0.02)


def test_a_claim_holds_when_every_seed_meets_it_at_every_row() -> None:
    rows = [row("badnets+qcb", "int4/whole", {0: {"asr": 0.99}, 1: {"asr": 0.98}}),  # not in `at`
            row("badnets+qcb", "int8/whole", {0: {"asr": 0.004}, 1: {"asr": 0.019}}),
            row("badnets+qcb", "fp32", {0: {"asr": 0.005}, 1: {"asr": 0.02}})]  # 2.00% is at most 2%
    result = check_claim(ASLEEP, rows, required=2)
    assert result.holds and result.met == 2 and result.verdict == "holds: met in 2 of 2 seeds"
    assert [s.values for s in result.seeds] == [[0.005, 0.004], [0.02, 0.019]]
    assert result.rows == ["mnist/pmoe badnets+qcb 1% @ fp32", "mnist/pmoe badnets+qcb 1% @ int8/whole"]


def test_one_seed_over_the_bound_breaks_the_claim_and_says_where() -> None:
    rows = [row("badnets+qcb", "fp32", {0: {"asr": 0.005}, 1: {"asr": 0.0288}, 2: {"asr": 0.002}}),
            row("badnets+qcb", "int8/whole", {0: {"asr": 0.004}, 1: {"asr": 0.01}, 2: {"asr": 0.002}})]
    result = check_claim(ASLEEP, rows, required=3)
    assert not result.holds and result.met == 2
    assert result.verdict == "does not hold: met in 2 of 3 seeds"
    (bad,) = [s for s in result.seeds if not s.met]
    assert bad.seed == 1 and bad.why == "mnist/pmoe badnets+qcb 1% @ fp32: 2.88%"


@pytest.mark.parametrize("status", [PENDING, FAILED])
def test_a_seed_without_a_value_is_never_met(status: str) -> None:
    rows = [row("badnets+qcb", "fp32", {0: {"asr": 0.0}, 1: status}),
            row("badnets+qcb", "int8/whole", {0: {"asr": 0.0}, 1: {"asr": 0.0}})]
    result = check_claim(ASLEEP, rows, required=1)
    assert not result.holds and [s.met for s in result.seeds] == [True, False]
    assert result.seeds[1].values == [None, 0.0]
    assert "no value for mnist/pmoe badnets+qcb 1% @ fp32" in result.seeds[1].why


def test_too_few_seeds_do_not_hold_even_when_all_meet_it() -> None:
    rows = [row("badnets+qcb", "fp32", {0: {"asr": 0.0}}), row("badnets+qcb", "int8/whole", {0: {"asr": 0.0}})]
    result = check_claim(ASLEEP, rows, required=3)
    assert not result.holds and result.verdict == "does not hold: met in 1 of 1 seeds (3 required)"


def test_at_least_and_both_bounds() -> None:
    rows = [row("badnets+qcb", "int4/whole", {0: {"asr": 0.9795}, 1: {"asr": 0.9699}})]
    awake = check_claim(claim(at=["int4/whole"], at_least=0.97), rows, required=1)
    assert [s.met for s in awake.seeds] == [True, False]
    band = check_claim(claim(at=["int4/whole"], at_least=0.97, at_most=0.975), rows, required=1)
    assert [s.met for s in band.seeds] == [False, False]


def test_ba_drop_is_against_the_same_seeds_clean_fp32_model() -> None:
    """The reference is the clean model at fp32 (not at the row's bit-width) and of the row's own seed."""
    rows = [row("clean", "fp32", {0: {"ba": 0.965}, 1: {"ba": 0.978}}),
            row("clean", "int4/whole", {0: {"ba": 0.90}, 1: {"ba": 0.90}}),
            row("badnets+qcb", "int4/whole", {0: {"ba": 0.9515, "asr": 1.0}, 1: {"ba": 0.9580, "asr": 1.0}})]
    result = check_claim(claim(metric="ba_drop", at=["int4/whole"], at_most=0.015), rows, required=2)
    assert [s.values[0] for s in result.seeds] == pytest.approx([0.0135, 0.02])
    assert [s.met for s in result.seeds] == [True, False]
    no_clean = check_claim(claim(metric="ba_drop", at=["int4/whole"], at_most=0.015), rows[2:], required=1)
    assert not any(s.met for s in no_clean.seeds)  # no clean model: no value, never met


def test_ba_drop_reads_the_clean_model_of_the_rows_own_model() -> None:
    rows = [row("clean", "fp32", {0: {"ba": 0.97}}), row("clean", "fp32", {0: {"ba": 0.90}}, model="vmoe"),
            row("badnets+qcb", "fp32", {0: {"ba": 0.89, "asr": 0.0}}, model="vmoe")]
    result = check_claim(claim(metric="ba_drop", model="vmoe", at_most=0.015), rows, required=1)
    assert result.seeds[0].values == [pytest.approx(0.01)] and result.holds


def test_ba_drop_is_never_taken_against_a_clean_model_at_chance() -> None:
    """As CAD: a clean model that learnt nothing (BA at chance) would make every drop negative and so 'met'."""
    clean = row("clean", "fp32", {0: {"ba": 0.10}})
    clean.runs[0].notes.append(("at chance", "clean model: BA 10.0% is at chance"))
    rows = [clean, row("badnets+qcb", "fp32", {0: {"ba": 0.09, "asr": 0.0}})]
    result = check_claim(claim(metric="ba_drop", at_most=0.015), rows, required=1)
    assert result.seeds[0].values == [None] and not result.holds


def test_a_claim_that_picks_nothing_names_the_labels_it_could_use() -> None:
    rows = [row("badnets+qcb", "fp32", {0: {"asr": 0.0}})]
    result = check_claim(claim(attack="badnets", at=["fp32"], at_most=0.02), rows, required=1)
    assert not result.holds and "no row at fp32 matches (attack badnets," in result.problem
    assert "attacks badnets+qcb; poison rates 1%; models pmoe" in result.problem
    assert result.verdict.startswith("not checked")


def test_one_evaluation_that_picks_nothing_is_not_checked_on_the_others_alone() -> None:
    """A typo in one `at` label (or a label the scenario does not evaluate) must not leave a claim that
    holds on the labels that do match."""
    rows = [row("badnets+qcb", "fp32", {0: {"asr": 0.0}}), row("badnets+qcb", "int8/whole", {0: {"asr": 0.0}})]
    result = check_claim(claim(at=["fp32", "int6/Whole", "int8/whole"], at_most=0.02), rows, required=1)
    assert not result.holds and result.problem.startswith("no row at int6/Whole matches")


def test_the_filters_pick_only_their_rows() -> None:
    """poison_rate, model and defense (default: undefended) each narrow the rows a claim reads."""
    rows = [row("badnets", "fp32", {0: {"asr": 0.99}}, rate=0.01),
            row("badnets", "fp32", {0: {"asr": 0.40}}, rate=0.05),
            row("badnets", "fp32", {0: {"asr": 0.10}}, rate=0.01, model="vmoe"),
            row("badnets", "fp32", {0: {"asr": 0.02}}, rate=0.01, defense="efrap / efrap")]
    wanted = {"attack": "badnets", "at_least": 0.9}
    assert check_claim(claim(poison_rate=0.01, model="pmoe", **wanted), rows, 1).rows == [
        "mnist/pmoe badnets 1% @ fp32"]
    assert check_claim(claim(poison_rate=0.05, **wanted), rows, 1).rows == ["mnist/pmoe badnets 5% @ fp32"]
    assert check_claim(claim(model="vmoe", **wanted), rows, 1).rows == ["mnist/vmoe badnets 1% @ fp32"]
    defended = check_claim(claim(defense="efrap / efrap", **{**wanted, "at_least": None, "at_most": 0.05}), rows, 1)
    assert defended.rows == ["mnist/pmoe badnets 1% + efrap / efrap @ fp32"] and defended.holds
    assert len(check_claim(claim(**wanted), rows, 1).rows) == 3  # every undefended badnets row
    missing = check_claim(claim(poison_rate=0.1, **wanted), rows, 1)
    assert "poison rate 10%" in missing.problem and "poison rates 1%, 5%" in missing.problem


def test_without_an_attack_a_claim_reads_every_attacked_row_and_clean_rows_only_for_ba() -> None:
    rows = [row("clean", "fp32", {0: {"ba": 0.97}}), row("badnets", "fp32", {0: {"ba": 0.96, "asr": 0.9}})]
    asr = check_claim(Claim(text="t", metric="asr", at_least=0.5), rows, required=1)
    assert asr.rows == ["mnist/pmoe badnets 1% @ fp32"]
    ba = check_claim(Claim(text="t", metric="ba", at_least=0.95), rows, required=1)
    assert len(ba.rows) == 2 and ba.holds


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "give at_most or at_least"),
        ({"at_least": 0.5, "at_most": 0.2}, "at_least 0.5 is above at_most 0.2"),
        ({"at_most": 2}, "fractions in 0..1"),  # a percent typed as a number would always hold
        ({"at_most": 0.1, "at": ["fp32", "fp32"]}, "twice"),
    ],
)
def test_claim_rejects(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Claim(text="t", metric="asr", **fields)


def test_ba_drop_and_cad_may_be_negative_bounds() -> None:
    assert Claim(text="t", metric="ba_drop", at_least=-0.01, at_most=0.02).at_least == -0.01


# --- through the command line, on a real run ------------------------------------------------------------


CLAIMS = [
    {"text": "the clean model learns", "attack": "clean", "metric": "ba", "at_least": 0.5},
    {"text": "perfect", "attack": "clean", "metric": "ba", "at_least": 1.0},
]


def test_a_run_reports_its_claims_in_markdown_and_json(write_scenario, tmp_path) -> None:
    path = write_scenario(tiny_scenario(report={"claims": CLAIMS}))
    out = runner.invoke(app, ["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--reports-dir",
                              str(tmp_path / "reports")], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    text = (tmp_path / "reports" / "tiny.md").read_text()
    assert "## Claims" in text and "holds: met in 1 of 1 seeds" in text
    assert "does not hold: met in 0 of 1 seeds" in text and '"perfect" is not met on seed 0' in text
    data = json.loads(runner.invoke(app, ["report", str(tmp_path / "runs" / "tiny"), "--format", "json"]).stdout)
    learns, perfect = data["meta"]["claims"]
    assert learns["holds"] and learns["per_seed"][0]["values"][0] == pytest.approx(
        next(r["ba_mean"] for r in data["rows"] if r["attack"] == "clean"))
    assert not perfect["holds"] and perfect["bounds"] == ">= 100%"
    page = runner.invoke(app, ["report", str(tmp_path / "runs" / "tiny"), "--format", "html"]).stdout
    assert "Claims" in page and "holds: met in 1 of 1 seeds" in page and "the clean model learns" in page


def test_a_smoke_run_drops_the_claims() -> None:
    """Claims are about the real scale: a toy run can neither meet nor refute them, and its plan (one seed, the
    largest rate, fewer evaluations) might not even have their rows."""
    from bench.smoke import smoke_scenario

    raw = tiny_scenario(seeds=[0, 1, 2], report={"min_seeds": 3, "claims": CLAIMS})
    assert smoke_scenario(raw, None)["report"] == {}


SHIPPED = [p for p in sorted((Path(__file__).resolve().parents[1] / "scenarios").glob("*.yaml"))
           if ((yaml.safe_load(p.read_text()) or {}).get("report") or {}).get("claims")]


def test_some_shipped_scenarios_make_claims() -> None:
    assert {p.stem for p in SHIPPED} >= {"qcb_mnist", "qcb_backend_mnist", "vmoe_qcb_mnist"}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_claim_picks_its_rows(path: Path) -> None:
    """The plan-time check on the scenarios we ship: each claim names labels their plans really have."""
    prepare(path)  # raises a ScenarioError naming the claim otherwise


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        ([{"text": "x", "attack": "wanet", "metric": "asr", "at_most": 0.1}],
         "report.claims[0] ('x'): no row at fp32 matches (attack wanet"),
        ([{"text": "x", "metric": "asr"}], "give at_most or at_least"),
        ([{"text": "x", "metric": "loss", "at_most": 1}], "report.claims[0].metric: Input should be 'ba'"),
    ],
)
def test_a_bad_claim_exits_2_naming_it(write_scenario, tmp_path, claims: list[dict[str, Any]], message: str) -> None:
    path = write_scenario(tiny_scenario(report={"claims": claims}))
    out = runner.invoke(app, ["plan", str(path), "--runs-dir", str(tmp_path / "runs")])
    assert out.exit_code == 2 and message in " ".join(out.output.split()), out.output
    assert str(path) in " ".join(out.output.split()) or path.name in out.output


def test_check_claims_reads_the_stored_dicts() -> None:
    rows = [row("badnets+qcb", "fp32", {0: {"asr": 0.0}})]
    (result,) = check_claims([{"text": "t", "attack": "badnets+qcb", "metric": "asr", "at_most": 0.02}], rows, 1)
    assert result.holds and result.to_dict()["per_seed"] == [{"seed": 0, "values": [0.0], "met": True, "why": None}]

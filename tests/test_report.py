"""Reports traceable to their runs: real SQLite stores written here, every number checked against what a
reader computes by hand from the stored rows (issue 18)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bench import plan as planning
from bench import report as reporting
from bench import scenario as sc
from bench.analysis.routing import RoutingTally
from bench.errors import ScenarioError
from bench.report import aggregate, check_reference, detections, leaderboard, required_seeds
from bench.store import Store

DIGITS = {"name": "digits", "image_size": 16}
PMOE = {"name": "pmoe", "width": 1, "experts": 2, "topk": 4}
TRAIN = {"epochs": 1, "lr": 0.1}
BADNETS = {"name": "badnets", "target": 0, "apply": "image", "params": {"size": 2}}
FP32 = {"label": "fp32"}


def f32(x: float) -> float:
    """A rate as the store holds it: a float32 mean (450/500 -> 0.89999998)."""
    return float(np.float32(x))


def _id(*parts: Any) -> str:
    return "ev-" + hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cell(seed: int, attack: dict[str, Any] | None = None, rate: float | None = None, *, dataset: dict = DIGITS,
         model: dict = PMOE, train: dict = TRAIN, quant: dict | None = None,
         defense: dict | None = None) -> dict[str, Any]:
    """A plan cell as the store's meta holds it; job ids derived from the setting (same setting, same id)."""
    quant = quant or FP32
    setting = (dataset, model, train, seed, quant)
    return {
        "dataset": dataset, "model": model, "attack": attack, "poison_rate": rate, "seed": seed, "train": train,
        "train_job": "tr-" + _id(setting, attack, rate)[3:], "eval_job": _id(setting, attack, rate, defense),
        "clean_eval_job": _id(setting, None, None, None), "quant": quant, "defense": defense,
        "base_eval_job": _id(setting, attack, rate, None) if defense else None,
    }


def write_store(root: Path, results: list[tuple[dict[str, Any], dict[str, Any] | None]],
                scenario: dict[str, Any] | None = None, defenses: list[tuple[dict, dict | None]] = ()) -> Store:
    """A real store: one record per (cell, metrics) with metrics (None = the job has not run), the cells
    and defend entries as the plan's meta."""
    store = Store(root)
    for c, metrics in results:
        if metrics is not None:
            store.record(c["eval_job"], "evaluate", {"seed": c["seed"]}, [c["train_job"]], metrics, 0.1, "cpu")
    for d, metrics in defenses:
        if metrics is not None:
            store.record(d["job"], "defend", {"seed": d["seed"]}, [], metrics, 0.1, "cpu")
    store.set_meta("cells", [c for c, _ in results])
    store.set_meta("defenses", [d for d, _ in defenses])
    store.set_meta("scenario", scenario or {"name": "t", "seeds": sorted({c["seed"] for c, _ in results})})
    return store


def report_of(store: Store) -> tuple[list[reporting.Row], dict[str, Any]]:
    """Rows and meta read back from the store, as the runner builds them."""
    cells, scenario = store.get_meta("cells"), store.get_meta("scenario")
    records = store.records()
    meta = {"scenario": scenario["name"], "min_seeds": required_seeds(scenario, cells),
            "reference": scenario.get("reference"), "detections": detections(store.get_meta("defenses"), records)}
    return aggregate(cells, records), meta


def table_line(markdown: str, *needles: str) -> str:
    """The one table line of ``markdown`` holding every needle; a first needle "| x" must start it."""
    first = needles[0] if needles[0].startswith("|") else "|"
    found = [line for line in markdown.splitlines() if line.startswith(first) and all(n in line for n in needles)]
    assert len(found) == 1, (needles, found)
    return found[0]


def cells_of(line: str) -> list[str]:
    """A markdown table line's cells, stripped."""
    return [c.strip() for c in line.strip().strip("|").split("|")]


def section(markdown: str, heading: str) -> str:
    """``markdown`` from ``heading`` on."""
    return markdown[markdown.index(heading):]


def head(markdown: str) -> str:
    """The per-group results tables of a report (before the leaderboard)."""
    return markdown.split("## Leaderboard")[0]


def ev(ba: float, asr: float | None = None, **extra: Any) -> dict[str, Any]:
    """Evaluation metrics as a job stores them."""
    out: dict[str, Any] = {"ba": ba, "n_test": 360, **extra}
    if asr is not None:
        out.update(asr=asr, ra=1 - asr, n_asr=500)
    return out


# -- 1. the headline rule compares float32 means within a stated tolerance --------------------------------


def test_rule_holds_at_exactly_90_percent_and_2_points(tmp_path):
    bad = {**BADNETS, "name": "blend"}
    store = write_store(tmp_path, [
        (cell(0), ev(0.9)),
        (cell(0, BADNETS, 0.005), ev(0.88, f32(449 / 500))),  # 89.8%: below the bar
        (cell(0, BADNETS, 0.01), ev(0.88, f32(450 / 500))),  # 90.0% (stored 0.89999998), CAD 2.0 points
        (cell(0, bad, 0.01), ev(0.87, f32(500 / 500))),  # CAD 3 points: over the bar
    ])
    rows, meta = report_of(store)
    assert f32(450 / 500) < 0.9 and 0.9 - 0.88 > 0.02  # what the naive comparison trips on
    board = {e["attack"]: e for e in leaderboard(rows)}
    assert board["badnets"]["status"] == "reached" and board["badnets"]["score_rate"] == 0.01
    assert board["badnets"]["asr_at_score"] == pytest.approx(0.9)
    assert board["badnets"]["cad_at_score"] == pytest.approx(0.02)
    assert board["badnets"]["rank"] == 1 and board["badnets"]["n"] == 1 and board["badnets"]["seeds"] == [0]
    assert board["blend"]["status"] == "not reached" and board["blend"]["rank"] is None
    md = reporting.to_markdown(rows, meta)
    assert "compared within 1e-06" in md
    assert cells_of(table_line(section(md, "## Leaderboard"), "badnets")) == [
        "1", "badnets", "1%", "90.0", "2.0", "1", "90.0 at 1% (n=1)"]


# -- 2. a missing clean baseline: every column says which seeds it averages -------------------------------


def test_missing_clean_baseline_shows_seeds_and_blocks_the_leaderboard(tmp_path):
    store = write_store(tmp_path, [
        (cell(0), ev(0.90)), (cell(1), None),  # the clean model of seed 1 has not run
        (cell(0, BADNETS, 0.1), ev(0.89, 0.95)), (cell(1, BADNETS, 0.1), ev(0.87, 0.97)),
    ])
    rows, meta = report_of(store)
    row = next(r for r in rows if r.attack == "badnets")
    assert (row.ba.seeds, row.asr.seeds, row.cad.seeds) == ((0, 1), (0, 1), (0,))
    assert row.ba.mean == pytest.approx((0.89 + 0.87) / 2) and row.cad.mean == pytest.approx(0.90 - 0.89)
    md = reporting.to_markdown(rows, meta)
    line = table_line(head(md), "| badnets", "10%")
    assert "88.0 ± 1.4 (n=2: seeds 0, 1)" in line and "1.0 (n=1: seed 0)" in line
    assert "no CAD for seed 1: clean baseline pending" in line and "columns average different seeds" in line
    entry = leaderboard(rows, meta["min_seeds"])[0]
    assert meta["min_seeds"] == 2 and entry["status"] == "not judged" and entry["rank"] is None
    assert entry["not_judged"] == [{"poison_rate": 0.1, "reason": "ASR over seeds 0, 1, CAD over seed 0"}]
    assert cells_of(table_line(md, "badnets", "not judged")) == [
        "-", "badnets", "not judged", "-", "-", "-", "96.0 at 10% (n=2)",
        "10% not judged: ASR over seeds 0, 1, CAD over seed 0"]
    # even a scenario content with one seed does not compare ASR over {0, 1} with CAD over {0}
    assert leaderboard(rows, 1)[0]["status"] == "not judged"
    data = json.loads(reporting.to_json(rows, meta))
    by = {r["attack"]: r for r in data["rows"]}
    assert by["badnets"]["asr_seeds"] == [0, 1] and by["badnets"]["cad_seeds"] == [0] and by["badnets"]["cad_n"] == 1
    assert by["clean"]["missing"] == 1 and by["clean"]["runs"][1]["status"] == "pending"


def test_min_seeds_comes_from_the_scenario_report_block(tmp_path):
    results = [(cell(s), ev(0.9)) for s in (0, 1)] + [(cell(2), {"failed": "out of memory on cuda: OOM"})]
    results += [(cell(s, BADNETS, 0.1), ev(0.9 - 0.01 * s, 0.95 + 0.01 * s)) for s in (0, 1, 2)]
    scenario = {"name": "t", "seeds": [0, 1, 2], "report": {"min_seeds": 2}}
    rows, meta = report_of(write_store(tmp_path / "a", results, scenario))
    assert meta["min_seeds"] == 2 and required_seeds({"seeds": [0, 1, 2], "report": {"min_seeds": None}}) == 3
    row = next(r for r in rows if r.attack == "badnets")
    # the clean model of seed 2 failed: CAD over seeds 0, 1 only, so the leaderboard takes neither ASR over 0-2
    assert row.asr.seeds == (0, 1, 2) and row.cad.seeds == (0, 1)
    assert leaderboard(rows, 2)[0]["not_judged"][0]["reason"] == "ASR over seeds 0, 1, 2, CAD over seeds 0, 1"
    # the same seeds for both: with the attacked seed 2 failed too, ASR and CAD are over 0, 1
    results[-1] = (results[-1][0], {"failed": "training diverged: mean loss nan in epoch 1", "failed_epoch": 1})
    rows, _ = report_of(write_store(tmp_path / "b", results, scenario))
    entry = leaderboard(rows, 2)[0]
    assert entry["status"] == "reached" and entry["n"] == 2 and entry["seeds"] == [0, 1]
    assert entry["asr_at_score"] == pytest.approx((0.95 + 0.96) / 2)
    assert entry["cad_at_score"] == pytest.approx(((0.9 - 0.9) + (0.9 - 0.89)) / 2)
    assert leaderboard(rows, 3)[0]["not_judged"][0]["reason"] == "n=2 of 3 seeds required"


# -- 3. ranks within each group, settings on every line, dense ties ---------------------------------------


def test_ranks_count_within_each_group_and_ties_share_a_rank(tmp_path):
    cifar = {"name": "cifar10"}
    names = ["badnets", "blend", "wanet", "sig"]
    results = [(cell(0, dataset=cifar), ev(0.9))]
    asr = {"badnets": 0.95, "blend": 0.95, "wanet": 0.99, "sig": 0.5}  # badnets and blend tie at 1%
    rate = {"badnets": 0.01, "blend": 0.01, "wanet": 0.05, "sig": 0.01}
    results += [(cell(0, {**BADNETS, "name": n}, rate[n], dataset=cifar), ev(0.89, asr[n])) for n in names]
    for lr in (0.1, 0.01):  # two training settings of MNIST
        train = {"epochs": 1, "lr": lr}
        mnist_asr = 0.91 if lr == 0.1 else 0.2
        results += [(cell(0, dataset={"name": "mnist"}, train=train), ev(0.99)),
                    (cell(0, BADNETS, 0.01, dataset={"name": "mnist"}, train=train), ev(0.985, mnist_asr))]
    rows, meta = report_of(write_store(tmp_path, results))
    board = leaderboard(rows)
    ranks = {(e["dataset"], e["train"], e["attack"]): e["rank"] for e in board}
    cifar_ranks = [ranks[("cifar10", "lr=0.1", n)] for n in names]  # CIFAR-10 trained at lr 0.1 too
    assert cifar_ranks == [1, 1, 2, None]
    assert ranks[("mnist", "lr=0.1", "badnets")] == 1 and ranks[("mnist", "lr=0.01", "badnets")] is None
    md = reporting.to_markdown(rows, meta)
    board_md = md[md.index("## Leaderboard"):]
    assert "### mnist · pmoe · train: lr=0.1" in board_md and "### mnist · pmoe · train: lr=0.01" in board_md
    assert "### cifar10 · pmoe · train: lr=0.1" in board_md
    section = board_md[board_md.index("### mnist · pmoe · train: lr=0.1"):].split("###")[1]
    assert cells_of(table_line(section, "badnets"))[0] == "1"


# -- 4. published values name one cell, or planning stops -------------------------------------------------


def test_reference_matching_several_cells_is_an_error_naming_fields(tmp_path):
    cells = [cell(s, BADNETS, 0.1, model={**PMOE, "experts": e}) for s in (0, 1) for e in (2, 4)]
    cells += [cell(0, BADNETS, 0.1, model={**PMOE, "experts": 2}, quant={"label": "int4/whole"})]
    ref = {"source": "paper", "values": [
        {"dataset": "digits", "attack": "badnets", "apply": "image", "poison_rate": 0.1, "asr": 90.0},
        {"dataset": "digits", "attack": "badnets", "apply": "image", "poison_rate": 0.1, "asr": 50.0},
    ]}
    with pytest.raises(ScenarioError) as err:
        check_reference(ref, cells, "scenarios/x.yaml")
    message = str(err.value)
    assert message.startswith("scenarios/x.yaml: reference.values[0]: matches 2 cells")
    assert "model_params.experts (2 / 4)" in message and "model_params: {experts: 2}" in message
    ref["values"][0]["model_params"] = {"experts": 2}
    with pytest.raises(ScenarioError, match=r"reference\.values\[1\]"):
        check_reference(ref, cells, "scenarios/x.yaml")
    ref["values"][1]["model_params"] = {"experts": 4}
    check_reference(ref, cells, "scenarios/x.yaml")
    # the report puts each reference row beside the one cell it names
    results = [(c, ev(0.9, 0.9 if c["model"]["experts"] == 2 else 0.4)) for c in cells]
    results += [(cell(s, model={**PMOE, "experts": e}), ev(0.92)) for s in (0, 1) for e in (2, 4)]
    rows, meta = report_of(write_store(tmp_path, results, {"name": "t", "seeds": [0, 1], "reference": ref}))
    entries = reporting.reference_entries(rows, ref)
    assert [e["asr"]["ours"] for e in entries] == [pytest.approx(90.0), pytest.approx(40.0)]
    assert [e["asr"]["n"] for e in entries] == [2, 2] and entries[0]["cad"]["ours"] == pytest.approx(2.0)
    md = reporting.to_markdown(rows, meta)
    assert "pmoe (experts=4) · badnets" in table_line(md, "| digits", "50.0", "-10.0")


def test_reference_train_and_trigger_params_narrow_the_match():
    cells = [cell(0, {**BADNETS, "params": {"size": s}}, 0.1, train={"epochs": 1, "lr": lr})
             for s in (2, 4) for lr in (0.1, 0.01)]
    ref = {"values": [{"dataset": "digits", "attack": "badnets", "poison_rate": 0.1, "params": {"size": 4}}]}
    with pytest.raises(ScenarioError, match=r"differ in train\.lr \(0\.01 / 0\.1\); add train to this reference row"):
        check_reference(ref, cells, "s.yaml")
    ref["values"][0]["train"] = {"lr": 0.01}
    check_reference(ref, cells, "s.yaml")
    # a block some cells lack (the qcb objective) is one field; null names the cells without it
    qcb = {**BADNETS, "objective": {"name": "qcb", "target_bits": 4}}
    cells = [cell(0, BADNETS, 0.1), cell(0, qcb, 0.1)]
    ref = {"values": [{"dataset": "digits", "attack": "badnets", "poison_rate": 0.1}]}
    with pytest.raises(ScenarioError, match=r'differ in params\.objective \("set" / null\); add params .*'
                                            r"\(e\.g\. params: \{objective: null\}\)"):
        check_reference(ref, cells, "s.yaml")
    rows = aggregate(cells, {})
    for objective, attack in ((None, "badnets"), ({"target_bits": 4}, "badnets+qcb")):  # "+qcb" tells them apart
        ref["values"][0]["params"] = {"objective": objective}
        check_reference(ref, cells, "s.yaml")
        named = [r.attack for r in rows if reporting.reference_matches(ref["values"][0], r.specs, r.poison_rate)]
        assert named == [attack]


def test_the_papers_reference_names_one_cell_per_row():
    resolved = sc.load(Path(__file__).parent.parent / "scenarios" / "badpatches_paper.yaml")
    plan = planning.build(resolved)
    reference = resolved.scenario.reference.model_dump()
    assert len(reference["values"]) > 30
    check_reference(reference, [c.to_dict() for c in plan.cells], resolved.source)


# -- 5. detections: every setting apart, labels counted, NaN left out -------------------------------------


def _defend(seed: int, experts: int, lam: float = 0.1) -> dict[str, Any]:
    model = {**PMOE, "experts": experts}
    return {"dataset": DIGITS, "model": model, "attack": BADNETS, "poison_rate": 0.1, "seed": seed, "train": TRAIN,
            "defense": {"name": "neural-cleanse", "budget": 0.1, "lam": lam},
            "job": f"de-{seed}-{experts}-{lam}"}


def test_detections_keep_settings_apart_and_never_average_labels(tmp_path):
    flags, index = [0, -1, 7, 0], [2.5, float("nan"), 3.5, 4.5]
    defenses = [(_defend(s, 4), {"n_defender": 144, "detected": {
        "flagged_class": flags[s], "flagged_classes": str(flags[s]) if flags[s] >= 0 else "",
        "anomaly_index": index[s], "correct_flag": int(flags[s] == 0)}}) for s in range(4)]
    defenses += [(_defend(s, 2), {"detected": {"flagged_class": 3, "anomaly_index": 1.0, "correct_flag": 0}})
                 for s in range(3)]
    defenses += [(_defend(3, 2), {"failed": "out of memory on cuda: tried to allocate 2 GiB"})]
    store = write_store(tmp_path, [(cell(s), ev(0.9)) for s in range(4)], defenses=defenses)
    rows, meta = report_of(store)
    entries = {e["model"]: e for e in meta["detections"]}
    assert set(entries) == {"pmoe (experts=2)", "pmoe (experts=4)"}
    four = entries["pmoe (experts=4)"]
    assert four["n"] == 4 and four["stage"] == "detected"
    assert four["labels"]["flagged_class"] == {"0": [0, 3], "-1": [1], "7": [2]}
    assert four["metrics"]["anomaly_index"]["mean"] == pytest.approx((2.5 + 3.5 + 4.5) / 3)
    assert four["metrics"]["anomaly_index"]["seeds"] == [0, 2, 3]
    assert four["metrics"]["correct_flag"]["mean"] == pytest.approx(0.5)
    assert "flagged_class" not in four["metrics"]
    two = entries["pmoe (experts=2)"]
    assert two["n"] == 3 and [r["status"] for r in two["runs"]] == ["ok", "ok", "ok", "failed"]
    md = reporting.to_markdown(rows, meta)
    line = table_line(md, "pmoe (experts=4)", "detected")
    assert "flagged_class: 0 ×2 (seeds 0, 3), -1 ×1 (seed 1), 7 ×1 (seed 2)" in line
    assert "anomaly_index=3.5 ± 1 (n=3: seeds 0, 2, 3)" in line and "nan" not in line.lower()
    line = table_line(md, "pmoe (experts=2)", "detected")
    assert "failed: seed 3 [1]" in line and "- [1] failed: seed 3 (de-3-2-0.1): out of memory on cuda" in md


def test_a_failed_defense_shows_failed_not_numbers(tmp_path):
    defenses = [(_defend(0, 2), {"failed": "out of memory on cuda"}), (_defend(1, 2), None)]
    store = write_store(tmp_path, [(cell(s), ev(0.9)) for s in (0, 1)], defenses=defenses)
    rows, meta = report_of(store)
    (entry,) = meta["detections"]
    assert entry["status"] == "failed" and entry["stage"] == "-" and entry["n"] == 0
    line = table_line(reporting.to_markdown(rows, meta), "neural-cleanse")
    assert "| failed " in line and "pending: seed 1" in line


# -- 6. dormancy: train and defense settings on every line ------------------------------------------------


def test_dormancy_lines_name_train_and_defense(tmp_path):
    int4 = {"label": "int4/whole"}
    results = []
    for lr, asr4 in ((0.1, 0.99), (0.01, 0.40)):
        train = {"epochs": 1, "lr": lr}
        for quant, asr in ((None, 0.02), (int4, asr4)):
            results += [(cell(s, train=train, quant=quant), ev(0.9)) for s in (0, 1)]
            results += [(cell(s, BADNETS, 0.1, train=train, quant=quant), ev(0.89, asr + 0.01 * s)) for s in (0, 1)]
    rows, meta = report_of(write_store(tmp_path, results))
    md = reporting.to_markdown(rows, meta)
    dormancy = md[md.index("## Dormancy"):]
    assert "| train " in table_line(dormancy, "dataset", "int4")
    assert "89.0 / 99.5" in table_line(dormancy, "lr=0.1", "badnets")  # ASR (0.99 + 1.00) / 2
    assert "89.0 / 40.5" in table_line(dormancy, "lr=0.01", "badnets")
    assert cells_of(table_line(dormancy, "lr=0.1", "badnets"))[6] == "2"  # n


# -- failed, not applicable, chance ------------------------------------------------------------------------


def test_failed_and_not_applicable_cells_show_as_such_and_enter_no_mean(tmp_path):
    dense = {"name": "dense", "width": 1}
    gate = {"label": "int4/gate"}
    planned_na = {**cell(0, BADNETS, 0.1, model=dense, quant=gate), "eval_job": "", "clean_eval_job": "",
                  "train_job": "", "not_applicable": "scope 'gate' needs a model with routing"}
    results = [
        (cell(0), ev(0.9)), (cell(1), ev(0.92)),
        (cell(0, BADNETS, 0.1), ev(0.88, 0.97)),
        (cell(1, BADNETS, 0.1), {"failed": "training diverged: mean loss nan in epoch 3", "failed_epoch": 3}),
        (cell(0, BADNETS, 0.2), {"failed": "out of memory on cuda"}),
        (cell(1, BADNETS, 0.2), {"failed": "out of memory on cuda"}),
        (cell(0, model=dense, quant=gate), {"not_applicable": "scope 'gate' needs a model with routing"}),
        (planned_na, None),
    ]
    rows, meta = report_of(write_store(tmp_path, results))
    by = {(r.model, r.attack, r.poison_rate, r.quant): r for r in rows}
    partial = by[("pmoe", "badnets", 0.1, "fp32")]
    assert partial.ba.n == 1 and partial.cad.mean == pytest.approx(0.02) and partial.cad.seeds == (0,)
    assert by[("pmoe", "badnets", 0.2, "fp32")].status == "failed"
    assert by[("dense", "badnets", 0.1, "int4/gate")].status == "n/a"
    md = reporting.to_markdown(rows, meta)
    line = table_line(head(md), "| badnets", "10%")
    assert "97.0 (n=1)" in line and "failed: seed 1 [1]" in line
    job = partial.runs[1].eval_job
    assert f"- [1] failed: seed 1 ({job}): training diverged: mean loss nan in epoch 3 (epoch 3)" in md
    assert table_line(head(md), "| badnets", "20%").count("| failed ") == 4  # ASR, BA, CAD, RA
    board = {e["score_rate"] or e["status"]: e for e in leaderboard(rows, 1)}
    assert board[0.1]["status"] == "reached"  # seed 0: ASR 97%, CAD 2 points, over the same seed
    data = json.loads(reporting.to_json(rows, meta))
    failed = next(r for r in data["rows"] if r["poison_rate"] == 0.2)
    assert failed["status"] == "failed" and failed["ba_mean"] is None
    assert [f["reason"] for f in failed["failed"]] == ["out of memory on cuda"] * 2
    na = [r for r in data["rows"] if r["status"] == "n/a"]
    assert {r["not_applicable"][0]["reason"] for r in na} == {"scope 'gate' needs a model with routing"}
    assert {r["not_applicable"][0]["job"] for r in na} == {None, results[-2][0]["eval_job"]}


def test_no_cad_against_a_clean_model_at_chance(tmp_path):
    results = [(cell(0), ev(0.105, num_classes=10)), (cell(1), ev(0.90, num_classes=10)),
               (cell(0, BADNETS, 0.1), ev(0.10, 0.99)), (cell(1, BADNETS, 0.1), ev(0.89, 0.98))]
    rows, meta = report_of(write_store(tmp_path / "a", results))
    row = next(r for r in rows if r.attack == "badnets")
    assert row.cad.seeds == (1,) and row.cad.mean == pytest.approx(0.01)
    entry = leaderboard(rows, 2)[0]
    assert entry["status"] == "not judged" and entry["rank"] is None
    md = reporting.to_markdown(rows, meta)
    assert "no CAD for seed 0: clean baseline at chance" in table_line(head(md), "| badnets", "10%")
    assert "at chance: seed 0" in table_line(head(md), "| clean")
    assert "BA 10.5% is at chance (10.0% for 10 classes, + 2 points)" in md
    # without num_classes in the record there is nothing to compare with: CAD as stored
    plain = [(c, {k: v for k, v in m.items() if k != "num_classes"}) for c, m in results]
    rows, _ = report_of(write_store(tmp_path / "b", plain))
    assert next(r for r in rows if r.attack == "badnets").cad.seeds == (0, 1)


# -- DER from the paired jobs ------------------------------------------------------------------------------


def test_der_is_computed_from_the_paired_before_and_after_jobs(tmp_path):
    defense = {"name": "fine-pruning", "rate": 0.2, "stage": "finetuned"}
    before = {0: (0.90, 0.95), 1: (0.80, 0.99)}  # seed: (BA, ASR) of the attacked model
    after = {0: (0.85, 0.15), 1: (0.82, 0.59)}
    results = [(cell(s), ev(0.92)) for s in (0, 1)]
    results += [(cell(s, BADNETS, 0.1), ev(*before[s])) for s in (0, 1)]
    results += [(cell(s, BADNETS, 0.1, defense=defense), ev(*after[s])) for s in (0, 1)]
    rows, meta = report_of(write_store(tmp_path, results))
    row = next(r for r in rows if r.defense != "-")
    # seed 0: ASR drop 0.80, BA drop 0.05 -> 0.875; seed 1: ASR drop 0.40, BA gain -> 0.70
    assert [r.values["der"] for r in row.runs] == [pytest.approx(0.875), pytest.approx(0.70)]
    assert row.der.mean == pytest.approx(0.7875) and row.der.seeds == (0, 1)
    md = reporting.to_markdown(rows, meta)
    assert cells_of(table_line(md, "| fine-pruning / finetuned")) == [
        "fine-pruning / finetuned", "83.5 ± 2.1 (n=2)", "37.0 ± 31.1 (n=2)", "0.787 ± 0.124 (n=2)"]
    assert cells_of(table_line(md, "| before defense")) == [
        "before defense", "85.0 ± 7.1 (n=2)", "97.0 ± 2.8 (n=2)", "-"]


# -- 9. trigger routed is a tautology for a trigger on every patch -----------------------------------------


def test_trigger_patch_share_is_stored_and_a_full_share_reads_as_tautology(tmp_path):
    tally = RoutingTally(2, (4, 4), touch=torch.zeros(4, 4, dtype=torch.bool))
    tally.touch[0, 0] = True
    sel = torch.zeros(3, 2, 4, 4, dtype=torch.bool)
    sel[:, :, 0, 0] = True
    tally.update(sel, sel)
    assert tally.result()["route_trigger_patch_share"] == 1 / 16
    blend = {**BADNETS, "name": "blend"}
    routing = {"route_rate_any": 1.0, "route_jaccard_mean": 0.75, "route_touched_patches": 16.0}
    results = [(cell(0), ev(0.9)),
               (cell(0, blend, 0.1), ev(0.88, 0.97, **routing, route_trigger_patch_share=1.0)),
               (cell(0, BADNETS, 0.1), ev(0.88, 0.97, **routing, route_trigger_patch_share=1 / 16))]
    rows, meta = report_of(write_store(tmp_path, results))
    md = reporting.to_markdown(rows, meta)
    assert "| all patches " in table_line(head(md), "| blend") and "0.75 (n=1)" in table_line(head(md), "| blend")
    assert "100.0 (n=1)" in table_line(head(md), "| badnets")
    assert "trigger routed = 1 by construction" in md
    data = json.loads(reporting.to_json(rows, meta))
    assert {r["attack"]: r["routed_tautological"] for r in data["rows"]} == {"clean": False, "blend": True,
                                                                            "badnets": False}


# -- outputs agree ----------------------------------------------------------------------------------------


def test_csv_and_json_carry_the_seeds_status_and_notes_the_markdown_shows(tmp_path):
    results = [(cell(0), ev(0.9)), (cell(1), {"failed": "out of memory on cuda"}),
               (cell(0, BADNETS, 0.1), ev(0.88, 0.97)), (cell(1, BADNETS, 0.1), ev(0.86, 0.99))]
    rows, meta = report_of(write_store(tmp_path, results))
    data = json.loads(reporting.to_json(rows, meta))
    table = {r["attack"]: r for r in csv.DictReader(io.StringIO(reporting.to_csv(rows)))}
    for row in data["rows"]:
        line = table[row["attack"]]
        assert line["status"] == row["status"] and line["ba_seeds"] == " ".join(map(str, row["ba_seeds"]))
        assert line["notes"] == "; ".join(row["notes"])
        assert math.isclose(float(line["ba_mean"]), row["ba_mean"])
    clean_1 = results[1][0]["eval_job"]
    assert data["rows"][1]["notes"] == [
        f"no CAD for seed 1: clean baseline failed (seed 1: clean baseline {clean_1} failed: out of memory on cuda)",
        "columns average different seeds"]
    assert data["required_seeds"] == 2 and data["leaderboard"][0]["status"] == "not judged"
    assert data["rule_tolerance"] == 1e-6 and "within 1e-06" in data["headline_rule"]

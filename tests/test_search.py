"""`bench search`: the search block, objectives, studies in real SQLite storages, resuming, sharing a study
between processes, pruning, constraints, and best.yaml run back through `bench run`.

Trainings are the tiny kind (digits at 16x16, a width-1 pMoE with 2 experts, one to three epochs); Adam at
lr 0.01 so that a BadNets square at intensity 1 is learnt (ASR ~1 from epoch 2 on; after epoch 1 the probe
ASR is still at chance, ~0.1, at either intensity) and intensity 0 is not (ASR ~0).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import torch
import typer
import yaml
from optuna.trial import TrialState
from typer.testing import CliRunner

from bench.cli import app as bench_app
from bench.cli.search import search
from bench.errors import ScenarioError
from bench.jobs import JobContext, run_train
from bench.plan import build
from bench.quant import QuantConfig, attach_qat
from bench.search import (
    TrialMetrics,
    TrialSeededSampler,
    constraints,
    objective_values,
    prepare_search,
    probe_value,
    run_search,
)
from bench.search.output import best_scenario
from bench.search.paths import get_path, parse_path, resolve_path, set_path
from bench.search.study import (
    default_storage,
    fingerprint,
    make_pruner,
    make_sampler,
    open_storage,
    open_study,
)
from bench.search.trial import TrialRunner, fp32_state
from bench.store import Store
from tests.conftest import FP32, tiny_scenario

STRENGTH_01 = {"path": "attacks.0.strength", "type": "categorical", "choices": [0.0, 1.0]}


def search_scenario(name: str = "tiny", epochs: int = 1, **search_block: Any) -> dict[str, Any]:
    """A single-cell tiny scenario evaluated at fp32 and int8, with a ``search:`` block."""
    return tiny_scenario(
        name=name,
        train={"epochs": epochs, "batch_size": 64, "optimizer": "adam", "lr": 0.01, **FP32},
        attacks=[{"name": "badnets", "size": 3, "position": "top-left", "target": 0}],
        quantization={"bits": ["fp32", 8]},
        search={"sampler": "random", "pruner": "none", **search_block},
    )


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the suite shares two cores, and oversubscribed threads only wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def search_app() -> typer.Typer:
    """The `bench` app shape the lead registers: ``app.command("search")(search)``."""
    app = typer.Typer()
    app.command("search")(search)

    @app.callback()
    def main() -> None:
        """bench"""

    return app


def invoke(args: list[str]) -> Any:
    return CliRunner().invoke(search_app(), ["search", *args])


def study_of(runs: Path, name: str = "tiny") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{runs / name / 'search.db'}")


def train_rows(runs: Path, name: str = "tiny") -> list[Any]:
    return [r for r in Store(runs / name).records().values() if r.kind == "train"]


# -- the objectives and paths, without training ------------------------------------------------------
def test_objective_values_and_constraints() -> None:
    m = TrialMetrics(ba=0.90, asr=0.05, ba_clean=0.93, asr_q=0.80, ba_q=0.85)
    assert m.ba_drop == pytest.approx(0.03)
    assert objective_values("dormant", m) == [0.80]
    assert objective_values("multi", m) == pytest.approx([0.80, 0.05, 0.03])
    assert objective_values("asr", m) == [0.05]
    dormant = constraints("dormant", m, tau=0.10, epsilon=0.02)
    assert dormant["fp32_asr_over_tau"] == pytest.approx(-0.05)  # fp32 ASR 5% <= 10%: feasible
    assert dormant["ba_drop_over_epsilon"] == pytest.approx(0.01)  # 3 points > 2: violated
    assert constraints("multi", m, 0.1, 0.02) == {}
    assert set(constraints("asr", m, 0.1, 0.02)) == {"ba_drop_over_epsilon"}
    assert probe_value("dormant", asr_fp32=0.30, asr_q=0.90, tau=0.10) == pytest.approx(0.70)
    assert probe_value("dormant", asr_fp32=0.05, asr_q=0.90, tau=0.10) == pytest.approx(0.90)
    assert probe_value("asr", asr_fp32=0.4, asr_q=None, tau=0.1) == 0.4


def test_epsilon_at_all_bounds_the_worst_ba_over_every_evaluation() -> None:
    m = TrialMetrics(ba=0.92, asr=0.01, ba_clean=0.93, asr_q=0.99, ba_q=0.90, asr_asleep=0.01, ba_asleep=0.915)
    assert m.worst_ba_drop == pytest.approx(0.03)  # the int4 BA is the lowest
    assert constraints("dormant", m, 0.02, 0.02)["ba_drop_over_epsilon"] == pytest.approx(-0.01)  # fp32 only
    assert constraints("dormant", m, 0.02, 0.02, "all")["ba_drop_over_epsilon"] == pytest.approx(0.01)
    lowest_asleep = TrialMetrics(ba=0.92, asr=0.01, ba_clean=0.93, asr_q=0.99, ba_q=0.92, ba_asleep=0.88)
    assert lowest_asleep.worst_ba_drop == pytest.approx(0.05)
    assert TrialMetrics(ba=0.92, asr=0.01, ba_clean=0.93).worst_ba_drop == pytest.approx(0.01)  # fp32 alone
    # a drop of exactly one point, from BAs stored as float32, is at the bound whichever way they rounded
    at_bound = TrialMetrics(ba=float(np.float32(0.8903)), asr=0.0, ba_clean=float(np.float32(0.9003)))
    assert at_bound.ba_drop - 0.01 > 0  # float32 rounding alone
    assert constraints("dormant", at_bound, 0.02, 0.01)["ba_drop_over_epsilon"] == 0


def test_paths_resolve_strength_to_each_triggers_parameter() -> None:
    raw = tiny_scenario(attacks=[{"name": "badnets", "target": 0}, {"name": "blend", "target": 0},
                                 {"name": "wanet", "target": 0}])
    assert parse_path("attacks[1].objective.lambda_bd") == ("attacks", 1, "objective", "lambda_bd")
    assert resolve_path(raw, "attacks.0.strength", "p") == ("attacks", 0, "intensity")
    assert resolve_path(raw, "attacks[1].strength", "p") == ("attacks", 1, "alpha")
    assert resolve_path(raw, "attacks.2.strength", "p") == ("attacks", 2, "s")
    keys = resolve_path(raw, "train.lr", "p")
    set_path(raw, keys, 0.5)
    assert get_path(raw, keys) == 0.5
    with pytest.raises(ScenarioError, match=r"p: 'attacks\.5\.size'.*positions? 0\.\.2"):
        resolve_path(raw, "attacks.5.size", "p")
    with pytest.raises(ScenarioError, match=r"no 'train\.schedule\.x'|no 'train.schedule'"):
        resolve_path(raw, "train.schedule.x", "p")


def test_fp32_state_undoes_qat_parametrizations() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(8, 2))
    plain_keys = set(model.state_dict())
    masters = {k: v.clone() for k, v in model.state_dict().items()}
    handle = attach_qat(model, QuantConfig(bits=2, scope="whole"))
    assert set(model.state_dict()) != plain_keys  # parametrized keys while QAT is attached
    state = fp32_state(model)
    assert set(state) == plain_keys
    for key, value in state.items():
        assert torch.equal(value, masters[key])  # the fp32 masters, not Q_2 of them
    handle.remove()


def test_trial_seeded_sampler_is_reproducible_and_never_replays_on_resume(tmp_path: Path) -> None:
    def draws(study: optuna.Study, n: int) -> list[float]:
        out: list[float] = []
        study.optimize(lambda t: out.append(t.suggest_float("x", 0, 1)) or 0.0, n_trials=n)
        return out

    def seeded() -> TrialSeededSampler:
        return TrialSeededSampler(lambda s: optuna.samplers.RandomSampler(seed=s), seed=7)

    url_a, url_b = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    first = draws(optuna.create_study(storage=url_a, study_name="s", sampler=seeded()), 2)
    again = draws(optuna.create_study(storage=url_b, study_name="s", sampler=seeded()), 2)
    assert first == again  # same seed, same trial numbers: same proposals
    resumed = draws(optuna.load_study(storage=url_a, study_name="s", sampler=seeded()), 2)
    assert not set(resumed) & set(first)  # trials 2 and 3 get their own seeds
    plain = optuna.samplers.RandomSampler
    resumed_plain = draws(optuna.load_study(storage=url_b, study_name="s", sampler=plain(seed=7)), 2)
    replay = draws(optuna.create_study(sampler=plain(seed=7)), 2)
    assert resumed_plain == replay  # what a plainly seeded sampler does on resume: the same points again


# -- bad search blocks: exit 2, the message names the field ------------------------------------------
RANGE = {"path": "attacks.0.strength", "low": 0, "high": 1}
BAD_BLOCKS = [
    ({"params": [{**RANGE, "lo": 3}]}, "search.params[0].lo: unknown field"),
    ({"params": [{**RANGE, "log": True}]}, "search.params[0].low: must be > 0 with log: true"),
    ({"params": [{**RANGE, "path": "attacks.3.strength"}]}, "search.params[0].path: 'attacks.3.strength'"),
    ({"params": [{**RANGE, "path": "attacks.0.objective.lambda_bd"}]},
     "search.params[0].path: 'attacks.0.objective.lambda_bd': the scenario has no 'attacks.0.objective'"),
    ({"params": [{**RANGE, "high": 1.5}]},
     "search.params[0].high: attacks.0.intensity = 1.5 is not a valid scenario value: badnets.intensity"),
    ({"params": [{"path": "attacks.0.strength", "type": "categorical"}]}, "search.params[0].choices:"),
    ({"objective": "multi", "pruner": "median", "params": [RANGE]}, "search.pruner: Optuna cannot prune"),
    ({"objective": "dormnt", "params": [RANGE]}, "search.objective: Input should be 'dormant'"),
    ({"target_quant": "int4/whole", "params": [RANGE]}, "search.target_quant: 'int4/whole' is not among"),
    ({"params": [RANGE], "enqueue": [{"attacks.0.size": 3}]}, "search.enqueue[0].attacks.0.size: not a"),
    ({"params": [STRENGTH_01], "enqueue": [{"attacks.0.strength": 0.5}]},
     "search.enqueue[0].attacks.0.strength: 0.5 is outside the range"),
    ({"pruner": {"name": "median", "warmup": 1}, "params": [RANGE]},
     "search.pruner.warmup: unknown field; allowed: name, startup_trials, warmup_epochs"),
    ({"asleep_quant": ["int6/whole"], "params": [RANGE]}, "search.asleep_quant[0]: 'int6/whole' is not among"),
    ({"asleep_quant": ["int8/whole"], "params": [RANGE]}, "search.asleep_quant[0]: 'int8/whole' is the target"),
    ({"objective": "asr", "asleep_quant": ["int8/whole"], "params": [RANGE]},
     "search.asleep_quant: only objective: dormant"),
    ({"objective": "asr", "epsilon_at": "all", "params": [RANGE]},
     "search.epsilon_at: 'all' bounds the BA at the quantized evaluations of objective: dormant"),
    ({"epsilon_at": "int4", "params": [RANGE]}, "search.epsilon_at: Input should be 'fp32' or 'all'"),
    ({"objective": "multi", "epsilon_at": "all", "params": [RANGE]}, "dormant only (multi has no constraints)"),
]


@pytest.mark.parametrize(("block", "message"), BAD_BLOCKS)
def test_bad_search_block_exits_2_naming_the_field(write_scenario, tmp_path: Path, block: dict[str, Any],
                                                  message: str) -> None:
    raw = search_scenario()
    raw["search"] = block
    path = write_scenario(raw)
    result = invoke([str(path), "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "runs" / "tiny" / "results.db").exists()  # nothing ran


def test_scenarios_a_search_cannot_take_exit_2(write_scenario, tmp_path: Path) -> None:
    two_rates = search_scenario(params=[STRENGTH_01])
    two_rates["poison_rates"] = [0.05, 0.1]
    result = invoke([str(write_scenario(two_rates)), "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "poison_rates: a search trains one cell per trial" in result.output
    no_block = tiny_scenario()
    result = invoke([str(write_scenario(no_block, "plain.yaml")), "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "search: this scenario has no search block" in result.output


def test_a_study_made_for_another_scenario_is_refused(write_scenario, tmp_path: Path) -> None:
    raw = search_scenario(params=[STRENGTH_01])
    prepared = prepare_search(write_scenario(raw))
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    made_for = fingerprint(prepared.base, prepared.spec, prepared.target)
    spec = prepared.spec
    open_study(open_storage(url), "tiny", spec, make_sampler(spec), make_pruner(spec), made_for, "x")
    raw["train"]["epochs"] = 3
    result = invoke([str(write_scenario(raw)), "--storage", url, "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2, result.output
    assert "study 'tiny' was made for a different search (scenario changed" in " ".join(result.output.split())
    bad = invoke([str(write_scenario(raw)), "--storage", "nosuchdb://x", "--study", "other"])
    assert bad.exit_code == 2 and "--storage: cannot open 'nosuchdb://x'" in bad.output


def test_best_scenario_fills_params_keeps_seeds_and_rebases_plugins(write_scenario, tmp_path: Path) -> None:
    (tmp_path / "my_plugins").mkdir()
    (tmp_path / "my_plugins" / "nothing.py").write_text('"""A plugin that registers nothing."""\n')
    raw = search_scenario(params=[{"path": "attacks[0].strength", "low": 0.1, "high": 1.0}])
    raw.update(seeds=[0, 1, 2], plugins=["my_plugins/nothing.py"])
    prepared = prepare_search(write_scenario(raw))
    assert prepared.base["seeds"] == [0]  # trials train the first seed
    trial = optuna.trial.create_trial(params={"attacks.0.strength": 0.25}, value=0.5, distributions={
        "attacks.0.strength": optuna.distributions.FloatDistribution(0.1, 1.0)})
    out_dir = tmp_path / "runs" / "tiny"
    scenario = best_scenario(prepared, trial, out_dir)
    assert "search" not in scenario and scenario["seeds"] == [0, 1, 2]
    assert scenario["attacks"][0]["intensity"] == 0.25 and "strength" not in scenario["attacks"][0]
    assert (out_dir / scenario["plugins"][0]).resolve() == (tmp_path / "my_plugins" / "nothing.py").resolve()
    assert raw["attacks"][0] == search_scenario()["attacks"][0]  # the scenario as written is untouched


# -- real searches ------------------------------------------------------------------------------------
def test_probe_leaves_training_bit_identical(write_scenario) -> None:
    # the intermediate-value probe builds models and draws triggers; training must not notice
    prepared = prepare_search(write_scenario(search_scenario(objective="dormant", params=[STRENGTH_01])))
    job = next(j for j in build(prepared.resolved).jobs if j.kind == "train" and j.spec["attack"] is not None)
    store = Store(prepared.base_dir / "runs")
    ctx = JobContext(store, torch.device("cpu"))
    runner = TrialRunner(prepared, store, torch.device("cpu"), ctx)
    seen: list[tuple[float, float | None]] = []
    ctx.model_hook = lambda model, spec, epoch, epochs: seen.append(
        runner.probe(model, spec, QuantConfig(bits=8, scope="whole")))
    probed = run_train(job.spec, ctx)
    ctx.model_hook = None
    plain = run_train(job.spec, ctx)
    assert len(seen) == 1 and seen[0][1] is not None
    assert probed.metrics["epoch_losses"] == plain.metrics["epoch_losses"]
    assert all(torch.equal(probed.state[k], plain.state[k]) for k in plain.state)


def test_dormant_search_prunes_resumes_honours_constraints_and_best_yaml_reruns(write_scenario,
                                                                               tmp_path: Path) -> None:
    runs, reports = tmp_path / "runs", tmp_path / "reports"
    # dormant: maximise ASR at int8 subject to fp32 ASR <= 50%. Intensity 1 learns the backdoor (by epoch 2):
    # a high value that violates the fp32 constraint. Intensity 0 (no trigger at all) is feasible with a low
    # value. The loud point goes first, so that the quiet one is judged against it. After epoch 1 neither
    # model has learnt anything about the trigger (both probe ASRs sit at chance, ~0.1, a few hundredths
    # apart either way), so the pruner's warm-up skips that epoch; at epoch 2 the loud trial's value is ~0.5
    # (ASR@int8 ~1 minus the fp32 ASR in excess of tau) and the quiet one's ~0.02: far apart.
    raw = search_scenario(
        epochs=3, objective="dormant", tau=0.5, epsilon=0.5, n_trials=2, params=[STRENGTH_01],
        pruner={"name": "median", "startup_trials": 1, "warmup_epochs": 1},
        enqueue=[{"attacks.0.strength": 1.0}, {"attacks.0.strength": 0.0}],
    )
    path = write_scenario(raw)
    first = invoke([str(path), "--runs-dir", str(runs), "--reports-dir", str(reports)])
    assert first.exit_code == 0, first.output
    loud, quiet = study_of(runs).get_trials()
    assert loud.params["attacks.0.strength"] == 1.0 and quiet.params["attacks.0.strength"] == 0.0
    # pruning: at epoch 2 the intensity-0 model's intermediate value is below the median of trial 0's at that
    # epoch, and the median pruner stops it there, one epoch early (not at epoch 1: the warm-up)
    assert loud.state == TrialState.COMPLETE and sorted(loud.intermediate_values) == [1, 2, 3]
    assert quiet.state == TrialState.PRUNED and sorted(quiet.intermediate_values) == [1, 2]
    assert loud.intermediate_values[2] > quiet.intermediate_values[2] + 0.2
    assert "trial 1 pruned at epoch 2" in " ".join(first.output.split())
    stored = {r.id for r in train_rows(runs)}
    assert loud.user_attrs["jobs"]["train"] in stored
    assert quiet.user_attrs["jobs"]["train"] not in stored  # a pruned job leaves no row
    assert len(stored) == 2  # the clean baseline and trial 0

    # resume with two more trials and no pruning (the pruner is not part of what a study is made for): the
    # enqueued intensity 0 replays trial 1's epochs 1 and 2, is not pruned this time, and trains to the end
    study_of(runs).enqueue_trial({"attacks.0.strength": 0.0})
    unpruned = write_scenario({**raw, "search": {**raw["search"], "pruner": "none"}}, "unpruned.yaml")
    second = run_search(unpruned, n_trials=2, runs_dir=runs, reports_dir=reports)
    assert second.ran == [2, 3]
    trials = study_of(runs).get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3]
    trained, repeat = trials[2], trials[3]
    assert trained.params["attacks.0.strength"] == 0.0
    assert trained.state == TrialState.COMPLETE and trained.user_attrs["replayed_from"] == quiet.number
    assert sorted(trained.intermediate_values) == [1, 2, 3]  # epochs 1-2 replayed, epoch 3 trained and probed
    assert {e: trained.intermediate_values[e] for e in (1, 2)} == quiet.intermediate_values
    assert trained.user_attrs["jobs"]["train"] == quiet.user_attrs["jobs"]["train"]
    assert trained.user_attrs["jobs"]["train"] in {r.id for r in train_rows(runs)}
    # trial 3 draws intensity 0 or 1, both finished before: its jobs are all reused, nothing recomputes
    assert repeat.state == TrialState.COMPLETE and repeat.user_attrs["ran_jobs"] == 0
    assert len(train_rows(runs)) == 3  # clean, intensity 1, intensity 0: one training each
    # without --n-trials the block's total (2) is the budget, and the study has 4 finished: nothing runs
    third = run_search(unpruned, runs_dir=runs, reports_dir=reports)
    assert third.ran == [] and len(study_of(runs).get_trials()) == 4

    # constraints: trial 0 has the higher value but breaks fp32 ASR <= tau; the best trial is feasible
    assert loud.constraints["fp32_asr_over_tau"] > 0 and loud.value > trained.value
    assert all(v <= 0 for v in trained.constraints.values())
    best = third.best.chosen
    assert best is not None and best.params["attacks.0.strength"] == 0.0
    assert best.number in (trained.number, repeat.number) and best.value == trained.value
    assert all(v <= 0 for v in best.constraints.values())
    assert "## Best trial" in third.report_path.read_text()

    # best.yaml: the scenario with the best value filled in, runnable as is, metrics as stored
    assert third.best_yaml == runs / "tiny" / "best.yaml"
    written = yaml.safe_load(third.best_yaml.read_text())
    assert "search" not in written and written["attacks"][0]["intensity"] == 0.0
    result = CliRunner().invoke(bench_app, ["run", str(third.best_yaml), "--runs-dir", str(runs),
                                            "--reports-dir", str(reports)])
    assert result.exit_code == 0, result.output
    assert len(train_rows(runs)) == 3  # the searched cell is reused, not retrained
    report = CliRunner().invoke(bench_app, ["report", str(runs / "tiny"), "--format", "json"])
    rows = json.loads(report.stdout)["rows"]
    row = next(r for r in rows if r["attack"] != "clean" and r["quant"] == "fp32")
    assert row["asr_mean"] == best.user_attrs["metrics"]["asr"]
    assert row["ba_mean"] == best.user_attrs["metrics"]["ba"]


def test_an_invalid_combination_is_pruned_without_training(write_scenario, tmp_path: Path) -> None:
    # each end is valid alone; warm-up 1 with repair from epoch 1 breaks qcb's rule repair > warm-up
    raw = search_scenario(objective="dormant", n_trials=1, enqueue=[
        {"attacks.0.objective.warmup_epochs": 1, "attacks.0.objective.repair_from_epoch": 1}], params=[
        {"path": "attacks.0.objective.warmup_epochs", "type": "int", "low": 0, "high": 1},
        {"path": "attacks.0.objective.repair_from_epoch", "type": "int", "low": 1, "high": 2}])
    raw["attacks"][0]["objective"] = {"name": "qcb", "target_bits": 8, "lambda_fp_trigger": 1.0}
    result = invoke([str(write_scenario(raw)), "--runs-dir", str(tmp_path / "runs"), "--reports-dir",
                     str(tmp_path / "reports")])
    assert result.exit_code == 0, result.output
    (trial,) = study_of(tmp_path / "runs").get_trials()
    assert trial.state == TrialState.PRUNED
    assert "repair_from_epoch 1 must come after" in trial.user_attrs["invalid"]
    assert "trial 0 skipped" in result.output
    assert train_rows(tmp_path / "runs") == []


def test_two_processes_share_one_sqlite_study(write_scenario, tmp_path: Path) -> None:
    runs, reports = tmp_path / "runs", tmp_path / "reports"
    path = write_scenario(search_scenario(objective="multi", sampler="nsga2", params=[
        {"path": "attacks.0.strength", "low": 0.5, "high": 1.0}]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "bench.cli", "search", str(path), "--n-trials", "2", "--runs-dir", str(runs),
           "--reports-dir", str(reports)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              cwd=Path(__file__).resolve().parents[1]) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    trials = study_of(runs).get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]  # nothing lost, nothing twice
    assert all(t.state == TrialState.COMPLETE for t in trials)
    strengths = [t.params["attacks.0.strength"] for t in trials]
    assert len(set(strengths)) == 4  # each trial has its own seed, whichever process ran it
    attacked = [r for r in train_rows(runs) if r.spec["attack"] is not None]
    assert sorted(r.spec["attack"]["params"]["intensity"] for r in attacked) == sorted(strengths)
    assert {t.user_attrs["jobs"]["train"] for t in trials} == {r.id for r in attacked}
    assert "## Pareto front" in (reports / "tiny-search.md").read_text()


def test_asleep_quant_constrains_the_asr_at_each_named_evaluation(write_scenario, tmp_path: Path) -> None:
    raw = search_scenario(objective="dormant", target_quant="int4/whole", asleep_quant=["int8/whole"], tau=0.5,
                          n_trials=1, params=[STRENGTH_01], enqueue=[{"attacks.0.strength": 1.0}])
    raw["quantization"] = {"bits": ["fp32", 8, 4]}
    outcome = run_search(write_scenario(raw), runs_dir=tmp_path / "runs", reports_dir=tmp_path / "reports")
    assert outcome.ran == [0]
    (trial,) = study_of(tmp_path / "runs").get_trials()
    records = Store(tmp_path / "runs" / "tiny").records().values()
    int8 = [r.metrics["asr"] for r in records
            if r.kind == "evaluate" and r.spec["attack"] and (r.spec["quant"] or {}).get("label") == "int8/whole"]
    assert len(int8) == 1
    assert trial.constraints["asleep_asr_over_tau"] == pytest.approx(int8[0] - 0.5, abs=1e-6)
    assert trial.user_attrs["metrics"]["asr_asleep"] == pytest.approx(int8[0])
    assert "int8/whole ASR <= 50%" in outcome.report_path.read_text()


def test_epsilon_at_all_constrains_the_lowest_stored_ba(write_scenario, tmp_path: Path) -> None:
    raw = search_scenario(objective="dormant", target_quant="int4/whole", asleep_quant=["int8/whole"], tau=1.0,
                          epsilon=0.0, epsilon_at="all", n_trials=1, params=[STRENGTH_01],
                          enqueue=[{"attacks.0.strength": 1.0}])
    raw["quantization"] = {"bits": ["fp32", 8, 4]}
    outcome = run_search(write_scenario(raw), runs_dir=tmp_path / "runs", reports_dir=tmp_path / "reports")
    (trial,) = study_of(tmp_path / "runs").get_trials()
    records = Store(tmp_path / "runs" / "tiny").records().values()
    evals = [r for r in records if r.kind == "evaluate"]
    clean = next(r.metrics["ba"] for r in evals if not r.spec["attack"] and not (r.spec["quant"] or {}).get("bits"))
    attacked = [r.metrics["ba"] for r in evals if r.spec["attack"]]
    assert len(attacked) == 3  # fp32, int8, int4
    assert trial.constraints["ba_drop_over_epsilon"] == pytest.approx(clean - min(attacked), abs=1e-6)
    assert trial.user_attrs["metrics"]["worst_ba_drop"] == pytest.approx(clean - min(attacked))
    report = outcome.report_path.read_text()
    assert "BA drop (at fp32, int4/whole, int8/whole) <= 0 points" in report
    assert "worst BA drop" in report


def _leave_trial(study: optuna.Study, strength: float) -> optuna.Trial:
    """Enqueue ``strength`` and start its trial as ``bench search`` does (the trial is RUNNING now)."""
    study.enqueue_trial({"attacks.0.strength": strength})
    trial = study.ask()
    trial.suggest_float("attacks.0.strength", 0.0, 1.0)
    return trial


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_resume_retries_enqueued_points_whose_trials_died_and_leaves_live_ones(write_scenario,
                                                                              tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    raw = search_scenario(n_trials=2, params=[{"path": "attacks.0.strength", "low": 0.0, "high": 1.0}],
                          enqueue=[{"attacks.0.strength": 0.0}, {"attacks.0.strength": 1.0},
                                   {"attacks.0.strength": 0.5}])
    path = write_scenario(raw)
    prepared = prepare_search(path)
    storage = open_storage(default_storage(runs, "tiny"))
    study = open_study(storage, "tiny", prepared.spec, make_sampler(prepared.spec), make_pruner(prepared.spec),
                       fingerprint(prepared.base, prepared.spec, prepared.target), "x")
    interrupted = _leave_trial(study, 0.0)
    study.tell(interrupted, state=TrialState.FAIL)  # what Ctrl-C leaves
    killed = _leave_trial(study, 1.0)
    storage.record_heartbeat(killed._trial_id)  # a kill leaves RUNNING, its heartbeat stopped long ago:
    with sqlite3.connect(runs / "tiny" / "search.db") as db:
        db.execute("UPDATE trial_heartbeats SET heartbeat = datetime('now', '-1 hour') WHERE trial_id = ?",
                   (killed._trial_id,))
    live = _leave_trial(study, 0.5)  # another process is running this one right now
    storage.record_heartbeat(live._trial_id)

    outcome = run_search(path, runs_dir=runs, reports_dir=tmp_path / "reports")
    trials = study_of(runs).get_trials()
    states = [(t.params["attacks.0.strength"], t.state) for t in trials]
    assert states == [(0.0, TrialState.FAIL), (1.0, TrialState.FAIL), (0.5, TrialState.RUNNING),
                      (0.0, TrialState.COMPLETE), (1.0, TrialState.COMPLETE)]
    assert outcome.ran == [3, 4]  # the two dead points, retried; the live one is not taken from its owner
    assert trials[2].datetime_complete is None and not trials[2].user_attrs  # untouched
    strengths = sorted(r.spec["attack"]["params"]["intensity"] for r in train_rows(runs) if r.spec["attack"])
    assert strengths == [0.0, 1.0]
    again = run_search(path, runs_dir=runs, reports_dir=tmp_path / "reports")  # budget (2) reached
    assert again.ran == [] and len(study_of(runs).get_trials()) == 5  # nothing runs, nothing waits

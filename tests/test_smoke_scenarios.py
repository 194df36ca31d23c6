"""Every shipped scenario runs end to end (``bench run S --smoke``): each kind of cell at toy scale, with
MNIST, Fashion-MNIST, CIFAR-10 and GTSRB read from small files in their real on-disk formats."""

from __future__ import annotations

from pathlib import Path

import ondisk
import pytest
from typer.testing import CliRunner

from bench import runner
from bench.cli import app
from bench.store import Store

SCENARIOS = sorted((Path(__file__).resolve().parents[1] / "scenarios").glob("*.yaml"))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every data set a shipped scenario reads, small, in the formats torchvision downloads."""
    root = tmp_path_factory.mktemp("data")
    ondisk.write_mnist(root, "MNIST", n_train=300, n_test=100)
    ondisk.write_mnist(root, "FashionMNIST", n_train=300, n_test=100, seed=5)
    ondisk.write_cifar(root, per_batch=40)
    ondisk.write_gtsrb_random(root)
    return root


def _kinds(cells: list[dict]) -> dict[str, set[tuple]]:
    """The kinds of cell a plan holds, by component name (a smoke run collapses grids of numbers)."""
    out: dict[str, set[tuple]] = {"training": set(), "dataset": set(), "quant": set(), "defense": set()}
    for cell in cells:
        if cell.get("not_applicable"):
            continue
        attack, model = cell["attack"], cell["model"]["name"]
        what = ("clean",) if attack is None else (
            attack["name"], attack["apply"], (attack.get("objective") or {}).get("name"), "trigger_grid" in attack)
        out["training"].add((model, *what))
        out["dataset"].add((cell["dataset"]["name"], model))
        kind = "clean" if attack is None else (attack.get("objective") or {}).get("name", "poisoned")
        out["quant"].add((model, (cell.get("quant") or {}).get("label", "fp32"), kind))
        if cell.get("defense"):
            out["defense"].add((model, cell["defense"]["name"], cell["defense"]["stage"]))
    return out


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_smoke_plan_covers_every_kind_of_cell(scenario: Path, data_root: Path) -> None:
    full = runner.prepare(scenario, data_root=data_root)
    smoke = runner.prepare(scenario, smoke=True, data_root=data_root)
    assert smoke.resolved.name == f"{full.resolved.name}-smoke"
    assert len(smoke.resolved.scenario.seeds) == 1 and smoke.resolved.train[0]["epochs"] <= 3
    want = _kinds([c.to_dict() for c in full.plan.cells])
    got = _kinds([c.to_dict() for c in smoke.plan.cells])
    # every model x trigger x apply x objective, data set x model, model x quantization config and model x
    # defense stage of the full scenario is in the smoke plan
    for kind in want:
        assert want[kind] == got[kind], kind
    assert len(smoke.plan.jobs) <= len(full.plan.jobs)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_every_shipped_scenario_runs_end_to_end_at_toy_scale(scenario: Path, data_root: Path, tmp_path: Path) -> None:
    runs, reports = tmp_path / "runs", tmp_path / "reports"
    result = CliRunner().invoke(app, ["run", str(scenario), "--smoke", "--data-root", str(data_root), "--device",
                                      "cpu", "--runs-dir", str(runs), "--reports-dir", str(reports)])
    assert result.exit_code == 0, result.output
    name = f"{scenario.stem}-smoke" if scenario.stem != "plugins_example" else None
    stores = list(runs.iterdir())
    assert len(stores) == 1 and (name is None or stores[0].name == name)
    report = reports / f"{stores[0].name}.md"
    assert report.is_file() and "# pmoe-bench report" in report.read_text()
    store = Store(stores[0])
    cells = store.get_meta("cells")
    records = store.records()
    assert all("failed" not in r.metrics for r in records.values())
    # every planned cell that can run has its result, its clean baseline (CAD) and its model before the
    # defense (DER); every defense entry has its job: nothing was skipped
    runnable = [c for c in cells if not c.get("not_applicable")]
    assert runnable and all(c["eval_job"] in records and c["clean_eval_job"] in records for c in runnable)
    assert all(c["base_eval_job"] in records for c in runnable if c.get("base_eval_job"))
    assert all(d["job"] in records for d in store.get_meta("defenses", []) if not d.get("not_applicable"))

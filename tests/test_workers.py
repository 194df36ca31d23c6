"""``bench run --workers N``: worker processes run independent jobs at once, in dependency order, with
the scenario's plugins, and record exactly what a one-process run records."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench import runner
from bench.execute.pool import worker_devices
from bench.store import Store
from tests.conftest import tiny_scenario

SIG = Path(__file__).resolve().parents[1] / "plugins" / "sig.py"


def _scenario(name: str) -> dict:
    return tiny_scenario(
        name=name,
        plugins=[str(SIG)],
        attacks=[{"name": "sig", "delta": 0.2, "target": 1}],
        defenses=[{"name": "fine-pruning", "rate": 0.2, "epochs": 1}],
    )


def _records(root: Path) -> dict[str, tuple[str, dict]]:
    return {i: (r.kind, r.metrics) for i, r in Store(root).records().items()}


@pytest.mark.slow
def test_two_workers_record_what_one_process_records(write_scenario, tmp_path):
    one = runner.run(write_scenario(_scenario("one"), "one.yaml"), tmp_path / "runs", tmp_path / "reports")
    two = runner.run(write_scenario(_scenario("two"), "two.yaml"), tmp_path / "runs", tmp_path / "reports",
                     workers=2)
    assert not two.summary.skipped and sorted(two.summary.ran) == sorted(one.summary.ran)
    # kinds: 2 trainings (clean, sig), 1 defense, evaluations of every model and every defended stage
    kinds = [r[0] for r in _records(tmp_path / "runs" / "two").values()]
    assert kinds.count("train") == 2 and kinds.count("defend") == 1 and kinds.count("evaluate") == 4
    # every job ran after its inputs: its dependencies were recorded first
    order = {job_id: i for i, job_id in enumerate(two.summary.ran)}
    plan = runner.prepare(tmp_path / "two.yaml").plan
    for job in plan.jobs:
        assert all(order[d] < order[job.id] for d in job.deps), job.kind
    # the same seeded work gives the same metrics (one CPU thread per worker vs two: allow float noise)
    first, second = _records(tmp_path / "runs" / "one"), _records(tmp_path / "runs" / "two")
    assert first.keys() == second.keys()
    for job_id, (kind, metrics) in first.items():
        for name in ("ba", "asr"):
            if name in metrics:
                assert second[job_id][1][name] == pytest.approx(metrics[name], abs=0.02), (kind, name)
    assert "sig" in (tmp_path / "reports" / "two.md").read_text()
    again = runner.run(tmp_path / "two.yaml", tmp_path / "runs", tmp_path / "reports", workers=2)
    assert again.summary.ran == [] and again.summary.skipped == len(plan.jobs)


def test_each_worker_gets_a_device():
    assert worker_devices(torch.device("cpu"), 3) == ["cpu", "cpu", "cpu"]
    assert worker_devices(torch.device("cuda:1"), 2) == ["cuda:1", "cuda:1"]

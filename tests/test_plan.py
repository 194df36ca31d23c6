"""Planning: dedup by content hash, clean baselines, and which jobs a parameter change touches."""

from __future__ import annotations

import hashlib
import json

from hypothesis import given
from hypothesis import strategies as st

from bench import plan as planning
from bench import scenario as sc
from tests.conftest import tiny_scenario


def _plan(data):
    return planning.build(sc.resolve(data))


def test_matrix_counts_and_clean_baselines():
    data = tiny_scenario(seeds=[0, 1], poison_rates=[0.01, 0.05, 0.1])
    plan = _plan(data)
    # cells: (clean + 1 attack x 3 rates) x 2 seeds
    assert len(plan.cells) == 8
    kinds = [j.kind for j in plan.jobs]
    assert kinds.count("train") == 8  # 2 clean + 6 attacked
    assert kinds.count("evaluate") == 8
    for cell in plan.cells:
        clean = [c for c in plan.cells if c.attack is None and c.seed == cell.seed][0]
        assert cell.clean_eval_job == clean.eval_job


def test_jobs_come_after_their_inputs():
    plan = _plan(tiny_scenario(seeds=[0, 1]))
    seen: set[str] = set()
    for job in plan.jobs:
        assert set(job.deps) <= seen
        seen.add(job.id)


def test_duplicate_entries_are_trained_once():
    data = tiny_scenario(models=[{"name": "pmoe", "width": 1, "experts": 2, "topk": 4}] * 2)
    plan = _plan(data)
    assert [j.kind for j in plan.jobs].count("train") == 2


def test_ids_are_stable_and_changes_touch_only_their_jobs():
    base = _plan(tiny_scenario(poison_rates=[0.05, 0.1]))
    again = _plan(tiny_scenario(poison_rates=[0.05, 0.1]))
    assert [j.id for j in base.jobs] == [j.id for j in again.jobs]
    changed = _plan(tiny_scenario(poison_rates=[0.05, 0.2]))
    old, new = {j.id for j in base.jobs}, {j.id for j in changed.jobs}
    assert len(new - old) == 2  # one train + one evaluate for the new rate
    # An evaluation-only setting retrains nothing.
    evalonly = _plan(tiny_scenario(poison_rates=[0.05, 0.1], train={**tiny_scenario()["train"], "eval_batch_size": 7}))
    assert {j.id for j in evalonly.jobs if j.kind == "train"} == {j.id for j in base.jobs if j.kind == "train"}


def test_summary_counts_done_jobs():
    plan = _plan(tiny_scenario())
    done = {plan.jobs[0].id}
    summary = plan.summary(done)
    assert summary["cells"] == 2
    assert summary["jobs"]["train"] == {"total": 2, "done": 1}
    assert summary["pending_jobs"] == len(plan.jobs) - 1
    assert summary["pending_training_images"] == 1437  # one epoch of digits left


_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)


@given(st.dictionaries(st.text(max_size=8), _values, max_size=5), st.lists(st.text(max_size=6), max_size=3),
       st.sampled_from(["train", "evaluate", "defend"]))
def test_job_id_hashes_the_sorted_json_of_kind_spec_and_deps(spec, deps, kind):
    text = json.dumps({"deps": deps, "kind": kind, "spec": spec, "v": planning.JOB_SCHEMA_VERSION}, sort_keys=True)
    expected = f"{kind[:2]}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
    assert planning.job_id(kind, spec, tuple(deps), {}) == expected
    assert planning.job_id(kind, spec, tuple(deps)) == expected


def test_every_planned_id_is_the_content_hash_of_its_job():
    data = tiny_scenario(seeds=[0, 1], poison_rates=[0.05, 0.1], quantization={"bits": ["fp32", 8, 4],
                         "scopes": ["whole", "gate"]}, defenses=[{"name": "fine-pruning", "rate": 0.2}])
    plan = _plan(data)
    assert any(j.kind == "evaluate" and "stage" in j.spec for j in plan.jobs)
    for job in plan.jobs:
        assert job.id == planning.job_id(job.kind, job.spec, job.deps), job.spec


def test_dependency_tracker_releases_a_job_once_all_its_pending_inputs_finish():
    from bench.execute.schedule import DependencyTracker

    plan = _plan(tiny_scenario(defenses=[{"name": "fine-pruning", "rate": 0.2}]))
    done_before = {j.id for j in plan.jobs if j.kind == "train" and j.spec["attack"] is None}
    pending = plan.pending(done_before)
    tracker = DependencyTracker(pending)
    finished: set[str] = set(done_before)
    ready = list(tracker.initial)
    while ready:
        job = ready.pop(0)
        assert all(d in finished for d in job.deps)
        finished.add(job.id)
        ready += tracker.finished(job.id)
    assert finished == {j.id for j in plan.jobs}

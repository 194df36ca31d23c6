"""How long planning a scenario takes and how many jobs it has; how long resuming a finished store of
N jobs takes (the work a second `bench run` does before deciding there is nothing to do).

    python benchmarks/planning.py [scenarios/pmoe_full.yaml] [--resume-jobs 1000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench import plan as planning
from bench import scenario as scenarios
from bench.registry import load_builtins
from bench.store import Store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("scenario", nargs="?", default="scenarios/pmoe_full.yaml")
    parser.add_argument("--resume-jobs", type=int, default=1000)
    args = parser.parse_args()

    start = time.perf_counter()
    load_builtins()  # imports torch and every built-in component: paid once per process
    imports = time.perf_counter() - start
    start = time.perf_counter()
    resolved = scenarios.load(args.scenario)
    plan = planning.build(resolved)
    seconds = time.perf_counter() - start
    print(f"imports (torch, built-in components): {imports:.3f} s")
    kinds = {k: sum(1 for j in plan.jobs if j.kind == k) for k in ("train", "defend", "evaluate")}
    print(f"planning {args.scenario}: {seconds:.3f} s, {len(plan.cells)} cells, {len(plan.jobs)} jobs {kinds}")

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "run")
        jobs = plan.jobs[: args.resume_jobs]
        for job in jobs:
            store.record(job.id, job.kind, job.spec, list(job.deps), {"ba": 0.9, "asr": 0.9}, 1.0, "cpu")
        start = time.perf_counter()
        reopened = Store(Path(tmp) / "run")
        pending = plan.pending(reopened.done_ids())
        seconds = time.perf_counter() - start
        print(f"resume check of a store with {len(jobs)} finished jobs: {seconds:.3f} s, "
              f"{len(plan.jobs) - len(pending)} recognised as done")


if __name__ == "__main__":
    main()

"""The Python API: a whole study in a few calls, for notebooks and scripts.

    import bench

    study = bench.Study.from_file("scenarios/quickstart.yaml", overrides=["train.epochs=1"])
    study = bench.Study.from_dict({"name": "mine", "models": [...], ...})   # or build it in code
    study.plan()            # the plan's summary (cells, jobs, what is done), as `bench plan --json`
    study.run()             # train, defend, evaluate: resumes from the store, as `bench run`
    study.results()         # one dict per setting (aggregated over seeds), as `bench report --format json`
    study.dataframe()       # the same as a pandas DataFrame (pandas is optional)
    study.report()          # the markdown report

The API is the command line's engine called directly (:mod:`bench.runner`): the same validation (a
mistake raises :class:`bench.errors.BenchError` with the message the CLI prints), the same store under
``runs_dir/<name>``, the same job ids, so a study started in a notebook resumes from the shell and back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import runner
from bench.errors import ScenarioError
from bench.store import Store


@dataclass
class Study:
    """A validated, planned scenario and where its results live."""

    prepared: runner.Prepared
    runs_dir: Path = Path("runs")
    reports_dir: Path = Path("reports")
    last_run: runner.RunOutcome | None = field(default=None, repr=False)

    @classmethod
    def from_file(cls, path: str | Path, overrides: list[str] | None = None, *, runs_dir: str | Path = "runs",
                  reports_dir: str | Path = "reports", smoke: bool = False, data_root: str | Path | None = None,
                  plugins: list[str] | None = None) -> Study:
        """A scenario file (with ``--set``-style ``overrides``, ``smoke`` and ``data_root`` as the CLI's)."""
        prepared = runner.prepare(path, plugins, smoke, data_root, overrides)
        return cls(prepared, Path(runs_dir), Path(reports_dir))

    @classmethod
    def from_dict(cls, scenario: dict[str, Any], overrides: list[str] | None = None, *,
                  runs_dir: str | Path = "runs", reports_dir: str | Path = "reports", smoke: bool = False,
                  data_root: str | Path | None = None, plugins: list[str] | None = None,
                  base_dir: str | Path = ".") -> Study:
        """A scenario given as a mapping, exactly as the YAML file would hold it (paths relative to
        ``base_dir``)."""
        if not isinstance(scenario, dict):
            raise ScenarioError(f"a scenario is a mapping (name:, models:, ...), got {type(scenario).__name__}")
        source = f"<scenario {scenario.get('name', '?')!s}>"
        prepared = runner.prepare_raw(scenario, source, Path(base_dir), plugins, smoke, data_root, overrides)
        return cls(prepared, Path(runs_dir), Path(reports_dir))

    @property
    def name(self) -> str:
        return self.prepared.resolved.name

    @property
    def store_path(self) -> Path:
        return runner.store_dir(self.runs_dir, self.name)

    def store(self) -> Store:
        """The study's results store (created on first use)."""
        return Store(self.store_path)

    def plan(self) -> dict[str, Any]:
        """The plan's summary (cells, n/a cells and reasons, jobs per kind with what is done)."""
        done = Store(self.store_path).done_ids() if (self.store_path / "results.db").exists() else set()
        return self.prepared.plan.summary(done)

    def run(self, device: str | None = None, workers: int = 1, fresh: bool = False,
            retry_failed: bool = False) -> runner.RunOutcome:
        """Run what is not stored yet and write the report; returns what ran and what failed."""
        self.last_run = runner.run_prepared(self.prepared, self.runs_dir, self.reports_dir, fresh, device,
                                            workers=workers, retry_failed=retry_failed)
        return self.last_run

    def results(self) -> list[dict[str, Any]]:
        """One dict per setting over seeds: labels, ``<metric>_mean`` / ``_std`` / ``_n`` / ``_seeds``,
        status and the runs behind it (fractions, not percentages), as ``bench report --format json``."""
        rows, _ = runner.report_rows(runner.open_run(self.store_path))
        return [row.to_dict() for row in rows]

    def dataframe(self) -> Any:
        """:meth:`results` as a pandas DataFrame, one line per setting (needs ``pandas``)."""
        try:
            import pandas as pd
        except ImportError:
            raise ScenarioError("Study.dataframe() needs pandas: pip install pandas") from None
        flat = [{k: v for k, v in row.items() if k not in ("runs", "failed", "not_applicable")}
                for row in self.results()]
        return pd.DataFrame(flat)

    def report(self, fmt: str = "md") -> str:
        """The report in ``md``, ``csv`` or ``json`` (as ``bench report``)."""
        if fmt not in ("md", "csv", "json"):
            raise ScenarioError(f"format: must be md, csv or json, got {fmt!r}")
        return runner.render(runner.open_run(self.store_path), fmt)

    def leaderboard(self) -> list[dict[str, Any]]:
        """The ranked attack leaderboard (as in the JSON report)."""
        return json.loads(self.report("json"))["leaderboard"]

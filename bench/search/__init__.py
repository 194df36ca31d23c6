"""Optuna searches over any number of a scenario, with objectives for dormant backdoors.

A scenario's ``search:`` block names the numbers to tune (dotted paths such as
``attacks.0.objective.lambda_bd`` or ``attacks.0.strength``), the objective (``dormant``, ``multi``,
``asr``), the budget, sampler and pruner. Each trial is an ordinary single-cell scenario run into
``runs/<name>/`` (content-hashed jobs: nothing is computed twice); the study lives in
``runs/<name>/search.db`` or any Optuna storage URL, so searches resume and processes share them.

Public API: :func:`run_search` (the whole search), :func:`prepare_search` (check a scenario's search
without running), :class:`SearchSpec` / :class:`ParamSpec` (the block's schema), :class:`TrialMetrics`
with :func:`objective_values` and :func:`constraints` (what a trial optimises), :func:`best_of`.
Modules: ``spec`` (schema), ``paths`` (dotted paths), ``prepare`` (checks, variants), ``objectives``,
``study`` (storage, samplers, pruner), ``trial`` (one trial, intermediate values), ``output`` (best.yaml,
report), ``run`` (the front door).
"""

from __future__ import annotations

from bench.search.objectives import DIRECTIONS, TrialMetrics, constraints, objective_values, probe_value
from bench.search.output import Best, best_of, to_markdown
from bench.search.prepare import PreparedSearch, SearchParam, prepare_search
from bench.search.run import SearchOutcome, SearchReporter, run_search
from bench.search.spec import ParamSpec, PrunerSpec, SearchSpec, parse_search
from bench.search.study import TrialSeededSampler, default_storage

__all__ = [
    "DIRECTIONS",
    "Best",
    "ParamSpec",
    "PreparedSearch",
    "PrunerSpec",
    "SearchOutcome",
    "SearchParam",
    "SearchReporter",
    "SearchSpec",
    "TrialMetrics",
    "TrialSeededSampler",
    "best_of",
    "constraints",
    "default_storage",
    "objective_values",
    "parse_search",
    "prepare_search",
    "probe_value",
    "run_search",
    "to_markdown",
]

"""Routing analysis: which expert sees the trigger (BadPatches paper, Sections 3.5 and 5.3).

Public API: the routing metrics (:func:`routing_metrics`, :class:`RoutingTally` and the pure functions
under them), the pictures (``draw_*`` with their data functions in :mod:`bench.analysis.maps`), and
:func:`bench.analysis.study.analyze_run`, the library side of ``bench analyze``
(:func:`bench.cli.analysis.analyze`; imported from its module, since it builds on the job runner).
"""

from __future__ import annotations

from bench.analysis.maps import (
    draw_frequency_maps,
    draw_patch_values,
    draw_selection_maps,
    expert_patch_values,
    highlight,
    patch_means,
    selection_frequency,
    value_shares,
)
from bench.analysis.routing import (
    NoRoutingError,
    RoutingTally,
    expert_overlap,
    layer_selection_masks,
    load_cv,
    patch_touch_mask,
    routing_metrics,
    selection_counts,
    selection_jaccard,
    selection_masks,
    trigger_hits,
)

__all__ = [
    "NoRoutingError",
    "RoutingTally",
    "draw_frequency_maps",
    "draw_patch_values",
    "draw_selection_maps",
    "expert_overlap",
    "expert_patch_values",
    "highlight",
    "layer_selection_masks",
    "load_cv",
    "patch_means",
    "patch_touch_mask",
    "routing_metrics",
    "selection_counts",
    "selection_frequency",
    "selection_jaccard",
    "selection_masks",
    "trigger_hits",
    "value_shares",
]

"""Built-in triggers and poisoning; importing this package registers the triggers.

Public API: the triggers (:class:`BadNets`, :class:`Blend`, :class:`WaNet`, :class:`SIG` registered as
``sinusoid``, :class:`Bpp`, :class:`LowFrequency` as ``lowfreq``, :class:`LabelConsistent` as
``label-consistent``, the learned :class:`InputAware` as ``inputaware``), the patch-level wrapper
:class:`BadPatches` with :func:`build_attack_trigger` (and :func:`normalize_grid` for ``trigger_grid``),
the plan-time check :func:`trigger_problem`, poisoning in its modes (:data:`POISON_MODES`,
:func:`poison_indices`, :func:`poison_training_set`, :func:`triggered_test_set`, :func:`asr_mask`,
:func:`backdoor_labels`) and :func:`trigger_grid_png` for pictures.
"""

from __future__ import annotations

from bench.attacks.badnets import BadNets
from bench.attacks.badpatches import APPLY_MODES, BadPatches, build_attack_trigger, normalize_grid
from bench.attacks.base import Trigger
from bench.attacks.blend import Blend
from bench.attacks.bpp import Bpp
from bench.attacks.checks import trigger_problem
from bench.attacks.input_aware import InputAware
from bench.attacks.label_consistent import LabelConsistent
from bench.attacks.lowfreq import LowFrequency
from bench.attacks.pictures import trigger_grid_png
from bench.attacks.poison import (
    POISON_MODES,
    PoisonedSet,
    asr_mask,
    backdoor_labels,
    poison_count,
    poison_indices,
    poison_training_set,
    triggered_test_set,
)
from bench.attacks.sig import SIG
from bench.attacks.wanet import WaNet

__all__ = [
    "APPLY_MODES",
    "POISON_MODES",
    "SIG",
    "BadNets",
    "BadPatches",
    "Blend",
    "Bpp",
    "InputAware",
    "LabelConsistent",
    "LowFrequency",
    "PoisonedSet",
    "Trigger",
    "WaNet",
    "asr_mask",
    "backdoor_labels",
    "build_attack_trigger",
    "normalize_grid",
    "poison_count",
    "poison_indices",
    "poison_training_set",
    "trigger_grid_png",
    "trigger_problem",
    "triggered_test_set",
]

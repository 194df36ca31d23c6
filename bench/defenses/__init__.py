"""Built-in defenses; importing this package registers them (every module of the package is imported, so a
new built-in defense is one new file with ``@register_defense``).

Every defense maps an attacked model and the defender's clean data to named stages
(:mod:`bench.defenses.base`): ``fine-pruning``, ``pruning``, ``fine-tuning`` (Liu et al. 2018, as the
BadPatches paper applies it), ``expert-pruning`` (MoE-specific), ``neural-cleanse`` (Wang et al. 2019),
``strip`` (Gao et al. 2019), and against dormant (quantization-conditioned) backdoors ``efrap`` (Li et al.
2024) and ``quant-audit``. ``bench plugins --kind defense`` lists them all.
"""

from __future__ import annotations

import importlib
import pkgutil

from bench.defenses.base import Defense, DefenseContext, DefenseStage, snapshot
from bench.defenses.efrap import Efrap
from bench.defenses.expert_pruning import ExpertPruning, routing_change
from bench.defenses.fine_pruning import FinePruning
from bench.defenses.finetune import FineTuning, finetune
from bench.defenses.neural_cleanse import NeuralCleanse, ReversedTrigger, ReverseSpec, anomaly_indices, detect
from bench.defenses.pruning import ChannelMask, Pruning, channel_scores, hold_pruned, prune
from bench.defenses.quant_audit import QuantAudit
from bench.defenses.strip import Strip, auroc, strip_entropy

__all__ = [
    "ChannelMask",
    "Defense",
    "DefenseContext",
    "DefenseStage",
    "Efrap",
    "ExpertPruning",
    "FinePruning",
    "FineTuning",
    "NeuralCleanse",
    "Pruning",
    "QuantAudit",
    "ReverseSpec",
    "ReversedTrigger",
    "Strip",
    "anomaly_indices",
    "auroc",
    "channel_scores",
    "detect",
    "finetune",
    "hold_pruned",
    "prune",
    "routing_change",
    "snapshot",
    "strip_entropy",
]

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

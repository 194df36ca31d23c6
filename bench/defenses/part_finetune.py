"""Part fine-tuning: fine-tune one part of a pMoE model on the defender's clean data, the rest frozen.

Which part holds the backdoor? Whole-model fine-tuning (:mod:`bench.defenses.finetune`) removes much of a
patch-level MoE backdoor (BadPatches paper, Section 5.4) but does not say where it lived. Fine-tuning only
the ``router`` (the gate kernels that pick each expert's top-k patches), only the ``experts``, or only the
``rest`` (trunk, MoE embedding, head BatchNorm, classifier) with the same clean data, epochs and train
settings, and comparing the ASR after each (a grid over ``part``), localises it: the part whose retraining
removes the backdoor is the one that carries it (or can route around it).

Frozen means unchanged: frozen parameters get no gradient (so no momentum or weight decay either) and
BatchNorm layers of frozen parts keep their running statistics (they normalise with them while training).
The defender sees the model and its clean data only.
"""

from __future__ import annotations

from typing import Any, ClassVar

from bench.defenses.base import (
    DEFAULT_BUDGET,
    Defense,
    DefenseContext,
    DefenseStage,
    check_budget,
    check_lr,
)
from bench.defenses.finetune import DEFAULT_EPOCHS, check_epochs, finetune_stage
from bench.defenses.moe_parts import PARTS, Part, frozen_except, part_parameters
from bench.errors import ComponentParamsError
from bench.models.base import BenchModel
from bench.registry import register_defense


@register_defense("part-finetune")
class PartFinetune(Defense):
    """Fine-tune one part of a pMoE model (router, experts or the rest) on clean data, the others frozen.

    Arguments:
        part (str): "router" (the gate kernels only), "experts" (every expert parameter) or "rest"
            (everything else: trunk, embedding, head BatchNorm, classifier). Default: "router".
        epochs (int): fine-tuning epochs (the scenario's train settings otherwise). Default: 5.
        lr (float | None): fine-tuning learning rate; None uses the scenario's ``train.lr``.
        budget (float): share of the clean training set the defender holds. Default: 0.05.

    Sees: the model and the defender's clean data.

    Stages: "finetuned" (weights; fine-tuning's metrics plus ``part``, ``trained_params`` and
    ``trained_share``, the trained part's share of all parameters).
    """

    stages = ("finetuned",)
    requires = frozenset({"gate", "experts"})
    sees: ClassVar[frozenset[str]] = frozenset({"model", "clean"})
    name = "part-finetune"
    #: toy-scale parameters for `bench run --smoke`
    smoke: ClassVar[dict[str, Any]] = {"epochs": 1}

    def __init__(
        self, part: Part = "router", epochs: int = DEFAULT_EPOCHS, lr: float | None = None,
        budget: float = DEFAULT_BUDGET,
    ) -> None:
        if part not in PARTS:
            raise ComponentParamsError(f"{self.name}.part: must be one of {', '.join(PARTS)}, got {part!r}")
        check_epochs(self.name, epochs)
        check_lr(self.name, lr)
        self.part: Part = part
        self.epochs = epochs
        self.lr = lr
        self.budget = check_budget(self.name, budget)

    def run(self, model: BenchModel, ctx: DefenseContext) -> list[DefenseStage]:
        trainable = part_parameters(model, self.part)
        if not trainable:
            raise ComponentParamsError(
                f"{self.name}.part: model {type(model).__name__} has no router and experts (a dense model); "
                "part fine-tuning needs a patch-level MoE model such as 'pmoe'"
            )
        sizes = {n: p.numel() for n, p in model.named_parameters()}
        with frozen_except(model, trainable):
            stage = finetune_stage(model, ctx, self.epochs, self.lr)
        trained = sum(sizes[n] for n in trainable)
        stage.metrics.update({
            "part": self.part, "trained_params": int(trained), "trained_share": trained / sum(sizes.values()),
        })
        return [stage]

"""Fine-pruning: prune the dormant channels of the last convolution of every expert, then fine-tune.

Liu, Dolan-Gavitt, Garg, "Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural Networks",
RAID 2018 (https://arxiv.org/abs/1805.12185), as the BadPatches paper applies it to pMoE (Sections 3.6,
4.3, Table 3): per expert, the lowest-activation output channels of its last convolution are zeroed at a
pruning rate (10/20/30%), then the model is fine-tuned for 5 epochs. Both stages are recorded, so a
report shows Table 3's "after pruning" and "after fine-tuning" rows. The two halves are
:mod:`bench.defenses.pruning` and :mod:`bench.defenses.finetune`.
"""

from __future__ import annotations

from bench.defenses.base import DEFAULT_BUDGET, Defense, DefenseContext, DefenseStage, check_budget, check_lr
from bench.defenses.finetune import DEFAULT_EPOCHS, check_epochs, finetune_stage
from bench.defenses.pruning import DEFAULT_RATE, Criterion, check_rate, prune_stage
from bench.models.base import BenchModel
from bench.registry import register_defense


@register_defense("fine-pruning")
class FinePruning(Defense):
    """Fine-pruning (Liu et al. 2018) on the last convolution of every expert (BadPatches, Table 3).

    Arguments:
        rate (float): share of output channels pruned in each expert's last convolution, in [0, 1).
            Default: 0.2 (the paper's Table 3 uses 0.1, 0.2, 0.3).
        criterion (str): "activation" (lowest mean activation on clean data: Liu et al. and the
            BadPatches code) or "magnitude" (lowest filter L1 norm). Default: "activation".
        epochs (int): fine-tuning epochs after pruning. Default: 5 (BadPatches).
        lr (float | None): fine-tuning learning rate; None uses the scenario's ``train.lr``.
        keep_pruned (bool): keep pruned channels at zero while fine-tuning (Liu et al.'s pruned
            network). False lets them grow back, as the BadPatches code's Keras ``fit`` does.
            Default: True.
        budget (float): share of the clean training set the defender holds. Default: 0.05.

    Stages: "pruned" and "finetuned" (both with weights).

    Examples::

        >>> defense = FinePruning(rate=0.3)
        >>> pruned, finetuned = defense.run(model, ctx)
    """

    stages = ("pruned", "finetuned")
    name = "fine-pruning"

    def __init__(
        self,
        rate: float = DEFAULT_RATE,
        criterion: Criterion = "activation",
        epochs: int = DEFAULT_EPOCHS,
        lr: float | None = None,
        keep_pruned: bool = True,
        budget: float = DEFAULT_BUDGET,
    ) -> None:
        check_rate(self.name, rate)
        check_epochs(self.name, epochs)
        check_lr(self.name, lr)
        self.rate = rate
        self.criterion: Criterion = criterion
        self.epochs = epochs
        self.lr = lr
        self.keep_pruned = keep_pruned
        self.budget = check_budget(self.name, budget)

    def run(self, model: BenchModel, ctx: DefenseContext) -> list[DefenseStage]:
        masks, pruned = prune_stage(model, ctx, self.rate, self.criterion)
        finetuned = finetune_stage(model, ctx, self.epochs, self.lr, hold=masks if self.keep_pruned else ())
        finetuned.metrics["keep_pruned"] = int(self.keep_pruned)
        return [pruned, finetuned]

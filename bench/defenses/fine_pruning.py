"""Fine-pruning: prune the dormant channels of the last convolution of every expert, then fine-tune.

Liu, Dolan-Gavitt, Garg, "Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural Networks",
RAID 2018 (https://arxiv.org/abs/1805.12185), as the BadPatches paper applies it to pMoE (Sections 3.6,
4.3, Table 3): per expert, the lowest-ranked output channels of its last convolution are pruned at a
pruning rate (10/20/30%), then the model is fine-tuned for 5 epochs. Both stages are recorded, so a
report shows Table 3's "after pruning" and "after fine-tuning" rows. The two halves are
:mod:`bench.defenses.pruning` and :mod:`bench.defenses.finetune`.

Two rankings (``criterion``): ``activation`` is Liu et al.'s (mean activation after the non-linearity on
clean data); ``raw-output`` is the BadPatches paper's published code (mean raw output of each expert's
1x1 convolution, before BatchNorm and ReLU). The code ranks on 20% of the training set and fine-tunes on
all of it: ``budget: 1.0, rank_budget: 0.2``.
"""

from __future__ import annotations

import torch

from bench.defenses.base import (
    DEFAULT_BUDGET,
    Defense,
    DefenseContext,
    DefenseStage,
    check_budget,
    check_lr,
    check_range,
)
from bench.defenses.finetune import DEFAULT_EPOCHS, check_epochs, finetune_stage
from bench.defenses.pruning import DEFAULT_RATE, Criterion, check_criterion, check_rate, prune_stage
from bench.models.base import BenchModel
from bench.registry import register_defense


@register_defense("fine-pruning")
class FinePruning(Defense):
    """Fine-pruning (Liu et al. 2018) on the last convolution of every expert (BadPatches, Table 3).

    Arguments:
        rate (float): share of output channels pruned in each expert's last convolution, in [0, 1).
            Default: 0.2 (the paper's Table 3 uses 0.1, 0.2, 0.3).
        criterion (str): "activation" (lowest mean activation after the non-linearity on clean data:
            Liu et al. 2018), "raw-output" (lowest mean raw convolution output, before BatchNorm and
            ReLU: the BadPatches paper's published code) or "magnitude" (lowest filter L1 norm).
            Default: "activation".
        epochs (int): fine-tuning epochs after pruning. Default: 5 (BadPatches).
        lr (float | None): fine-tuning learning rate; None uses the scenario's ``train.lr``.
        keep_pruned (bool): True: pruned channels are silenced (exactly zero where the classifier reads
            them) and held there while fine-tuning, Liu et al.'s pruned network. False: the BadPatches
            code: only the convolution's weights and biases are zeroed and nothing holds them, so behind
            a BatchNorm the channels pass a constant and fine-tuning may regrow them. Default: True.
        rank_budget (float | None): share of the training set the channels are ranked on, at most
            ``budget``: the first part of the defender's (randomly drawn) data; fine-tuning uses all of
            it. None ranks on all of it. The BadPatches code ranks on 20% and fine-tunes on 100%:
            ``budget: 1.0, rank_budget: 0.2``. Default: None.
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
        rank_budget: float | None = None,
        budget: float = DEFAULT_BUDGET,
    ) -> None:
        check_rate(self.name, rate)
        check_criterion(self.name, criterion)
        check_epochs(self.name, epochs)
        check_lr(self.name, lr)
        self.rate = rate
        self.criterion: Criterion = criterion
        self.epochs = epochs
        self.lr = lr
        self.keep_pruned = keep_pruned
        self.budget = check_budget(self.name, budget)
        if rank_budget is not None:
            check_range(self.name, "rank_budget", rank_budget, 0.0, self.budget, low_open=True,
                        what="share of the training set ranked on, at most budget")
        self.rank_budget = rank_budget

    def ranking_images(self, ctx: DefenseContext) -> torch.Tensor:
        """The defender's images the channels are ranked on: the first ``rank_budget / budget`` of them."""
        if self.rank_budget is None:
            return ctx.clean_x
        n = max(1, round(len(ctx.clean_x) * self.rank_budget / self.budget))
        return ctx.clean_x[:n]

    def run(self, model: BenchModel, ctx: DefenseContext) -> list[DefenseStage]:
        masks, pruned = prune_stage(model, ctx, self.rate, self.criterion, x=self.ranking_images(ctx),
                                    silence=self.keep_pruned)
        finetuned = finetune_stage(model, ctx, self.epochs, self.lr, hold=masks if self.keep_pruned else ())
        finetuned.metrics["keep_pruned"] = int(self.keep_pruned)
        return [pruned, finetuned]

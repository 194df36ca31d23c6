"""Anti-Backdoor Learning (ABL): train on the poisoned set, isolate what is learned too fast, unlearn it.

Li, Lyu, Koren, Lyu, Li, Ma, "Anti-Backdoor Learning: Training Clean Models on Poisoned Data", NeurIPS
2021, arXiv:2110.11571. A training-time defense: the defender trains its own model, from scratch, on the
poisoned training set; it never sees the attacked model's weights or separate clean data.

From the paper: backdoor samples are learned much faster than clean ones, so the first ``isolation_epochs``
(T_te = 20) train with the local gradient ascent loss LGA = sign(CE - gamma) * CE (gamma = 0.5), which
holds every sample's loss near gamma and lets the fast-learned ones fall below it; the ``isolation_ratio``
(p = 1%) samples with the lowest loss are isolated; after further training on the rest, the model unlearns
the isolated samples by gradient ascent on their CE for ``unlearning_epochs`` (T_u = 5). From the authors'
code (bboylyg/ABL): the unlearning rate ``lr_unlearning_init = 5e-4`` (constant, SGD momentum 0.9, no
augmentation), the isolation losses measured in eval mode, and the "finetuning" of the isolation model on
the other 99% before unlearning (60 epochs there); the code applies the LGA sign to each batch's mean loss
(``gradient_ascent_type = 'LGA'``; its default is a flooding variant), the paper's equation to each sample,
which we follow. Chosen here: isolation and the training on the rest use the scenario's train settings
(optimizer, lr, batch size, augmentation, seed), the latter for ``finetune_epochs`` (None: the scenario's
``train.epochs``, the attacked model's budget); the unlearning keeps the scenario's optimizer and batch size
with the code's constant rate ``unlearning_lr``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bench.defenses.base import Defense, DefenseContext, DefenseStage, check_range, snapshot
from bench.defenses.data_inspection import detection_metrics
from bench.models.base import BenchModel
from bench.registry import register_defense
from bench.train import fit


class LocalGradientAscent:
    """The LGA objective: mean over the batch of ``sign(CE_i - gamma) * CE_i`` (per sample, the paper's Eq.)."""

    def __init__(self, gamma: float) -> None:
        self.gamma = gamma

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(model(x), y, reduction="none")
        return (torch.sign(loss - self.gamma) * loss).mean()


def gradient_ascent(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unlearning: the negated cross-entropy (minimising it ascends the CE of the isolated samples)."""
    return -F.cross_entropy(model(x), y)


@torch.no_grad()
def sample_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``[N]``: each sample's cross-entropy, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([F.cross_entropy(model(x[s : s + batch_size]), y[s : s + batch_size], reduction="none")
                          for s in range(0, len(x), batch_size)])
    finally:
        model.train(was_training)


@register_defense("abl")
class AntiBackdoorLearning(Defense):
    """Anti-Backdoor Learning (Li et al., NeurIPS 2021): LGA isolation, training on the rest, then unlearning.

    Arguments:
        isolation_epochs (int): epochs trained with the LGA loss before isolating. Default: 20 (paper).
        isolation_ratio (float): share of the training set isolated (lowest LGA-trained loss), in (0, 0.5].
            Default: 0.01 (paper).
        gamma (float): the LGA loss floor, > 0. Default: 0.5 (paper).
        finetune_epochs (int | None): epochs of ordinary training on the rest after isolation; None: the
            scenario's ``train.epochs``. 0 skips it. Default: None (the code: 60).
        unlearning_epochs (int): epochs of gradient ascent on the isolated samples. Default: 5 (paper).
        unlearning_lr (float): learning rate of the unlearning. Default: 5e-4 (the authors' code).

    Stages: "isolated" (detection only: precision, recall, F1 of the isolated samples against the truly
    poisoned ones) and "unlearned" (weights).
    Threat model (``sees``): the poisoned training set only; the model is trained from scratch.
    """

    stages = ("unlearned",)
    name = "abl"
    sees: ClassVar[frozenset[str]] = frozenset({"poisoned"})
    #: toy-scale parameters for `bench run --smoke`
    smoke: ClassVar[dict[str, Any]] = {"isolation_epochs": 1, "finetune_epochs": 1, "unlearning_epochs": 1}

    def __init__(
        self,
        isolation_epochs: int = 20,
        isolation_ratio: float = 0.01,
        gamma: float = 0.5,
        finetune_epochs: int | None = None,
        unlearning_epochs: int = 5,
        unlearning_lr: float = 5e-4,
    ) -> None:
        check_range(self.name, "isolation_epochs", isolation_epochs, 1, what="epochs trained with the LGA loss")
        check_range(self.name, "isolation_ratio", isolation_ratio, 0.0, 0.5, low_open=True,
                    what="share of the training set isolated")
        check_range(self.name, "gamma", gamma, 0.0, low_open=True, what="the LGA loss floor")
        if finetune_epochs is not None:
            check_range(self.name, "finetune_epochs", finetune_epochs, 0,
                        what="None uses the scenario's train.epochs, 0 skips it")
        check_range(self.name, "unlearning_epochs", unlearning_epochs, 1, what="epochs of gradient ascent")
        check_range(self.name, "unlearning_lr", unlearning_lr, 0.0, low_open=True)
        self.isolation_epochs, self.isolation_ratio, self.gamma = isolation_epochs, isolation_ratio, gamma
        self.finetune_epochs, self.unlearning_epochs = finetune_epochs, unlearning_epochs
        self.unlearning_lr = unlearning_lr
        self.budget = 0.0  # no clean data: the defender trains on the poisoned training set

    def isolate(self, model: BenchModel, ctx: DefenseContext) -> torch.Tensor:
        """Train ``model`` with LGA for ``isolation_epochs``; ``[N]`` bool: the lowest-loss samples."""
        x, y = ctx.poisoned_x, ctx.poisoned_y
        fit(model, x, y, ctx.train_cfg, seed=ctx.seed, augment=ctx.augment, objective=LocalGradientAscent(self.gamma),
            on_epoch=ctx.on_epoch, epochs=self.isolation_epochs)
        losses = sample_losses(model, x, y, ctx.eval_batch_size).cpu()
        count = max(1, round(self.isolation_ratio * len(y)))
        isolated = torch.zeros(len(y), dtype=torch.bool)
        isolated[losses.argsort(stable=True)[:count]] = True
        return isolated

    def run(self, model: BenchModel, ctx: DefenseContext) -> list[DefenseStage]:
        isolated = self.isolate(model, ctx)
        x, y = ctx.poisoned_x, ctx.poisoned_y
        found = DefenseStage("isolated", None, detection_metrics(isolated, ctx.poisoned_truth, y))
        at = isolated.to(y.device)
        epochs = int(ctx.train_cfg["epochs"]) if self.finetune_epochs is None else self.finetune_epochs
        if epochs:
            fit(model, x[~at], y[~at], ctx.train_cfg, seed=ctx.seed + 1, augment=ctx.augment, on_epoch=ctx.on_epoch,
                epochs=epochs)
        unlearn_cfg = {**ctx.train_cfg, "lr": self.unlearning_lr, "schedule": "constant"}
        result = fit(model, x[at], y[at], unlearn_cfg, seed=ctx.seed + 2, objective=gradient_ascent,
                     on_epoch=ctx.on_epoch, epochs=self.unlearning_epochs)
        metrics = {"n_isolated": int(isolated.sum()), "finetune_epochs": epochs,
                   "unlearning_loss": -result.epoch_losses[-1]}
        return [found, DefenseStage("unlearned", snapshot(model), metrics)]

"""Fine-tuning on the defender's clean data: the second half of fine-pruning, and a defense by itself.

Liu et al. 2018 (https://arxiv.org/abs/1805.12185) fine-tune the pruned network on clean data to recover
accuracy; the BadPatches paper (Sections 4.3 and 5.4) fine-tunes for 5 epochs with the training
settings of the attacked model and finds that fine-tuning, not pruning, removes most of the backdoor.
Every fine-tuning here goes through :func:`bench.train.fit`, the project's one training loop, with the
scenario's train settings (optimizer, momentum, weight decay, batch size) and the cell's seed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from bench.defenses.base import (
    DEFAULT_BUDGET,
    Defense,
    DefenseContext,
    DefenseStage,
    check_budget,
    check_lr,
    check_range,
    snapshot,
)
from bench.defenses.pruning import ChannelMask, hold_pruned
from bench.models.base import BenchModel
from bench.registry import register_defense
from bench.train import TrainResult, fit

#: Fine-tuning epochs of the BadPatches paper's fine-pruning experiments (Section 4.3).
DEFAULT_EPOCHS = 5


def finetune(
    model: BenchModel,
    ctx: DefenseContext,
    epochs: int,
    lr: float | None = None,
    *,
    x: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    hold: Sequence[ChannelMask] = (),
) -> TrainResult:
    """Train ``model`` in place for ``epochs`` on ``(x, y)`` (default: the defender's clean data) with the
    scenario's settings (``lr`` overrides the learning rate) and ``ctx.seed``; channels in ``hold`` stay
    zero throughout. Zero epochs is a no-op."""
    if epochs <= 0:
        return TrainResult()
    cfg = dict(ctx.train_cfg)
    if lr is not None:
        cfg["lr"] = lr
    data_x = ctx.clean_x if x is None else x
    data_y = ctx.clean_y if y is None else y
    guard = hold_pruned(hold) if hold else contextlib.nullcontext()
    with guard:
        return fit(model, data_x, data_y, cfg, seed=ctx.seed, augment=ctx.augment, on_epoch=ctx.on_epoch,
                   epochs=epochs)


def finetune_stage(
    model: BenchModel,
    ctx: DefenseContext,
    epochs: int,
    lr: float | None = None,
    hold: Sequence[ChannelMask] = (),
    name: str = "finetuned",
) -> DefenseStage:
    """Fine-tune on the defender's clean data and record the stage."""
    result = finetune(model, ctx, epochs, lr, hold=hold)
    metrics = {
        "epochs": epochs,
        "lr": float(lr if lr is not None else ctx.train_cfg["lr"]),
        "n_clean": int(len(ctx.clean_y)),
        "final_loss": result.epoch_losses[-1] if result.epoch_losses else float("nan"),
        "train_seconds": result.seconds,
    }
    return DefenseStage(name, snapshot(model), metrics)


def check_epochs(defense: str, epochs: int, low: int = 1) -> None:
    check_range(defense, "epochs", epochs, low, what="fine-tuning epochs on the defender's clean data")


@register_defense("fine-tuning")
class FineTuning(Defense):
    """Fine-tuning alone: retrain the attacked model on the defender's clean data.

    Arguments:
        epochs (int): fine-tuning epochs. Default: 5 (BadPatches paper).
        lr (float | None): learning rate; None uses the scenario's ``train.lr``. Default: None.
        budget (float): share of the clean training set the defender holds. Default: 0.05.

    Stages: "finetuned" (weights; metrics ``epochs``, ``lr``, ``n_clean``, ``final_loss``).
    """

    stages = ("finetuned",)
    name = "fine-tuning"

    def __init__(
        self, epochs: int = DEFAULT_EPOCHS, lr: float | None = None, budget: float = DEFAULT_BUDGET
    ) -> None:
        check_epochs(self.name, epochs)
        check_lr(self.name, lr)
        self.epochs = epochs
        self.lr = lr
        self.budget = check_budget(self.name, budget)

    def run(self, model: BenchModel, ctx: DefenseContext) -> list[DefenseStage]:
        return [finetune_stage(model, ctx, self.epochs, self.lr)]

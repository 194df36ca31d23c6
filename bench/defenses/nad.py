"""NAD: Neural Attention Distillation, a clean-data fine-tuned teacher guides the attacked model's attention.

Li, Lyu, Koren, Lyu, Li, Ma, "Neural Attention Distillation: Erasing Backdoor Triggers from Deep Neural
Networks", ICLR 2021 (arXiv 2101.05930), with the details of their public code (bboylyg/NAD):

1. Teacher: a copy of the attacked model fine-tuned on the defender's clean data (paper Section 3; their
   README: "5~10 epochs" of plain fine-tuning, i.e. NAD with every beta at 0). Default
   :data:`TEACHER_EPOCHS` = 10.
2. Student: the attacked model itself, trained on the same data with
   ``CE(f(x), y) + sum_l beta_l * AT(F_l^student(x), F_l^teacher(x))`` (paper Eq. 2-3), the teacher frozen
   in eval mode. The attention map of a feature map ``F`` (``[N, C, H, W]``) is ``A = mean_c |F_c|^p``
   (p = 2; the paper sums over channels, the same map after the normalisation), flattened and divided by
   its L2 norm (``at.py``: ``+ 1e-6``); ``AT`` is the mean squared difference of the two normalised maps
   (``at.py``: ``F.mse_loss``; the paper writes the L2 norm of the difference; the betas below are the
   code's, calibrated for the mean).
3. Attention layers: the outputs of the three residual groups of their WRN (``main.py``: ``activation1-3``,
   before the final BN-ReLU). Here (:func:`attention_layers`): for ``pmoe`` the outputs of ``trunk.group1``,
   ``trunk.group2`` and the MoE layer (the concatenated expert outputs before ``head_norm``: the MoE layer
   replaces the third group); for ``dense`` ``trunk.group1``, ``trunk.group2``, ``group3``. A plugin model
   can name its own with an ``attention_layers()`` method returning ``(name, module)`` pairs (a module
   that returns a tuple contributes its first element). ``beta1..3`` weight them in that order
   (``config.py``: 500, 1000, 1000); a model with more than three layers reuses ``beta3`` for the rest.
   Scaled here by the input's pixels over CIFAR-10's 32x32 (chosen here; 1 in the paper's setting): every
   map has the positions of the input downsampled as in their WRN, and the mean over positions of a
   unit-norm map's squared difference grows as the map shrinks, so the code's betas on 8x8 digits (2x2
   last map) weigh the attention loss 16x more than on CIFAR-10 and training diverges (measured: BA 6%).
4. Schedule (``config.py``, ``utils/util.py: adjust_learning_rate``): 20 epochs, SGD lr 0.1 (momentum 0.9,
   weight decay 1e-4, Nesterov, batch 64) for the first 2 epochs, then 0.01. Adapted here: both trainings
   go through :func:`bench.train.fit` with the scenario's optimizer, momentum, weight decay, batch size and
   augmentation (as every fine-tuning defense of the bench); ``lr`` (default the scenario's ``train.lr``)
   holds for the first :data:`LR_DROP_EPOCH` epochs and drops by x0.1 after, as in their code. The drop
   starts a second :func:`fit` call, so the optimizer's momentum restarts there (theirs carries over); a
   ``cosine`` train schedule is replaced by this step schedule, and ``compile`` is off for the distillation
   (it reads feature maps through hooks).

Default ``budget`` 0.05: the paper's 5% of the training data. Stage "distilled" (weights); its metrics
include the attention gap (the summed, beta-weighted AT loss to the teacher on the defender's data) before
and after distillation.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

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
from bench.errors import BenchError
from bench.models.base import BenchModel
from bench.registry import register_defense
from bench.train import Objective, TrainResult, cross_entropy, fit

#: NAD training epochs (their ``config.py``: ``--epochs 20``).
EPOCHS = 20
#: Teacher fine-tuning epochs (their README: the teacher is fine-tuned for "5~10 epochs").
TEACHER_EPOCHS = 10
#: Attention-loss weights of the low, middle and high layer (``config.py``: beta1-3).
BETAS = (500.0, 1000.0, 1000.0)
#: Power of the attention map (``config.py``: ``--p 2.0``).
POWER = 2.0
#: The learning rate drops by :data:`LR_DROP` after this many epochs (``adjust_learning_rate``: 0.1 for
#: epochs 0-1, then 0.01).
LR_DROP_EPOCH = 2
LR_DROP = 0.1
#: Input pixels the betas are calibrated for (CIFAR-10's 32x32); other inputs scale them by pixels / this.
REFERENCE_PIXELS = 32 * 32
#: Added to the attention map's norm before dividing (``at.py``).
AT_EPS = 1e-6


def attention_map(features: torch.Tensor, p: float = POWER, eps: float = AT_EPS) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, H * W]``: the mean over channels of ``|F|^p``, divided by its L2 norm."""
    am = features.abs().pow(p).mean(dim=1).flatten(1)
    return am / (am.norm(dim=1, keepdim=True) + eps)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, p: float = POWER) -> torch.Tensor:
    """NAD's AT loss: mean squared difference of the two normalised attention maps (``at.py``)."""
    return F.mse_loss(attention_map(student, p), attention_map(teacher, p))


def beta_scale(image_shape: tuple[int, ...]) -> float:
    """Factor on the betas for images of ``image_shape`` (``[C, H, W]``): ``H * W / 1024``."""
    return float(image_shape[-2] * image_shape[-1]) / REFERENCE_PIXELS


def attention_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The feature maps NAD aligns, in depth order (see the module docstring)."""
    own = getattr(model, "attention_layers", None)
    if callable(own):
        layers = list(own())
    else:
        trunk = getattr(model, "trunk", None)
        last_name = "moe" if isinstance(getattr(model, "moe", None), nn.Module) else "group3"
        last = getattr(model, last_name, None)
        groups = [getattr(trunk, g, None) for g in ("group1", "group2")] if trunk is not None else [None]
        if not isinstance(last, nn.Module) or any(not isinstance(g, nn.Module) for g in groups):
            raise BenchError(
                f"nad: model {type(model).__name__} has no residual groups to align (pmoe and dense have "
                "trunk.group1, trunk.group2 and moe / group3); give it an attention_layers() method"
            )
        layers = [("trunk.group1", groups[0]), ("trunk.group2", groups[1]), (last_name, last)]
    if not layers:
        raise BenchError(f"nad: model {type(model).__name__} names no attention layers")
    return layers


@contextmanager
def recording(layers: Sequence[tuple[str, nn.Module]]) -> Iterator[list[torch.Tensor]]:
    """Record the output of every layer on each forward pass, in call order (cleared by the caller)."""
    seen: list[torch.Tensor] = []

    def hook(_m: nn.Module, _i: Any, out: Any) -> None:
        seen.append(out[0] if isinstance(out, tuple) else out)

    handles = [module.register_forward_hook(hook) for _, module in layers]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


class DistillationObjective:
    """``CE + sum_l beta_l * AT(student_l, teacher_l)`` for :func:`bench.train.fit` (the teacher frozen)."""

    def __init__(self, student_maps: list[torch.Tensor], teacher: nn.Module, teacher_maps: list[torch.Tensor],
                 betas: Sequence[float], p: float = POWER) -> None:
        self.student_maps = student_maps
        self.teacher = teacher
        self.teacher_maps = teacher_maps
        self.betas = list(betas)
        self.p = p

    def attention_gap(self) -> torch.Tensor:
        """The beta-weighted AT loss of the last recorded forward passes of student and teacher."""
        weights = self.betas + [self.betas[-1]] * (len(self.student_maps) - len(self.betas))
        return sum(  # type: ignore[return-value]
            (b * attention_loss(s, t, self.p) for b, s, t in zip(weights, self.student_maps, self.teacher_maps,
                                                                    strict=True)),
            torch.zeros((), device=self.student_maps[0].device),
        )

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.student_maps.clear()
        self.teacher_maps.clear()
        logits = model(x)
        with torch.no_grad():
            self.teacher(x)
        return F.cross_entropy(logits, y) + self.attention_gap()


def stepped_fit(model: nn.Module, ctx: DefenseContext, epochs: int, lr: float, objective: Objective = cross_entropy,
                *, compile_ok: bool = True) -> TrainResult:
    """``epochs`` of :func:`fit` at ``lr`` for the first :data:`LR_DROP_EPOCH` epochs and ``lr * LR_DROP``
    after (NAD's step schedule), with the scenario's other train settings."""
    cfg: dict[str, Any] = {**ctx.train_cfg, "schedule": "constant"}
    if not compile_ok:
        cfg["compile"] = False
    result = TrainResult()
    phases = [(min(epochs, LR_DROP_EPOCH), lr), (max(0, epochs - LR_DROP_EPOCH), lr * LR_DROP)]
    done = 0
    for i, (n, phase_lr) in enumerate(phases):
        if n <= 0:
            continue
        hook = ctx.on_epoch

        def on_epoch(e: int, _n: int, loss: float, offset: int = done, hook: Any = hook) -> None:
            if hook is not None:
                hook(offset + e, epochs, loss)

        part = fit(model, ctx.clean_x, ctx.clean_y, {**cfg, "lr": phase_lr}, seed=ctx.seed + i, augment=ctx.augment,
                   objective=objective, on_epoch=on_epoch, epochs=n)
        result.epoch_losses += part.epoch_losses
        result.seconds += part.seconds
        done += n
    return result


def mean_gap(objective: DistillationObjective, student: nn.Module, x: torch.Tensor, batch: int) -> float:
    """The attention gap on ``x`` with both models in eval mode, averaged over batches (weighted by size)."""
    was = student.training
    student.eval()
    total = 0.0
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch):
                xb = x[i : i + batch]
                objective.student_maps.clear()
                objective.teacher_maps.clear()
                student(xb)
                objective.teacher(xb)
                total += float(objective.attention_gap()) * len(xb)
    finally:
        student.train(was)
    return total / max(1, len(x))


@register_defense("nad")
class NAD(Defense):
    """Neural Attention Distillation (Li et al., ICLR 2021, arXiv 2101.05930); see the module docstring.

    Arguments:
        epochs (int): distillation epochs. Default: 20 (their code).
        teacher_epochs (int): fine-tuning epochs of the teacher. Default: 10 (their README: 5~10).
        beta1, beta2, beta3 (float): AT-loss weights of the first, second and third attention layer, for a
            32x32 input (scaled by H * W / 1024 for others). Default: 500, 1000, 1000 (their code).
        p (float): power of the attention map. Default: 2.
        lr (float | None): learning rate of the first 2 epochs (x0.1 after), for teacher and student; None
            uses the scenario's ``train.lr`` (their code: 0.1, also their training lr). Default: None.
        budget (float): share of the clean training set the defender holds. Default: 0.05 (the paper's 5%).

    Stages: "distilled" (weights; metrics ``epochs``, ``teacher_epochs``, ``lr``, ``n_clean``,
    ``final_loss``, ``teacher_final_loss``, ``attention_layers``, ``beta_scale``, ``at_gap_before``,
    ``at_gap_after``).
    """

    stages = ("distilled",)
    name = "nad"
    sees: ClassVar[frozenset[str]] = frozenset({"model", "clean"})
    smoke: ClassVar[dict[str, Any]] = {"teacher_epochs": 1}

    def __init__(
        self,
        epochs: int = EPOCHS,
        teacher_epochs: int = TEACHER_EPOCHS,
        beta1: float = BETAS[0],
        beta2: float = BETAS[1],
        beta3: float = BETAS[2],
        p: float = POWER,
        lr: float | None = None,
        budget: float = DEFAULT_BUDGET,
    ) -> None:
        check_range(self.name, "epochs", epochs, 1, what="distillation epochs")
        check_range(self.name, "teacher_epochs", teacher_epochs, 1, what="fine-tuning epochs of the teacher")
        for field_name, beta in (("beta1", beta1), ("beta2", beta2), ("beta3", beta3)):
            check_range(self.name, field_name, beta, 0.0, what="weight of the attention loss")
        check_range(self.name, "p", p, 0.0, low_open=True, what="power of the attention map")
        check_lr(self.name, lr)
        self.epochs = epochs
        self.teacher_epochs = teacher_epochs
        self.betas = (float(beta1), float(beta2), float(beta3))
        self.p = float(p)
        self.lr = lr
        self.budget = check_budget(self.name, budget)

    def run(self, model: BenchModel, ctx: DefenseContext) -> list[DefenseStage]:
        lr = float(self.lr if self.lr is not None else ctx.train_cfg["lr"])
        student_layers = attention_layers(model)
        scale = beta_scale(tuple(ctx.clean_x.shape[1:]))
        teacher = copy.deepcopy(model)
        teacher_result = stepped_fit(teacher, ctx, self.teacher_epochs, lr)
        teacher.eval()
        for param in teacher.parameters():
            param.requires_grad_(False)
        with recording(student_layers) as s_maps, recording(attention_layers(teacher)) as t_maps:
            objective = DistillationObjective(s_maps, teacher, t_maps, [b * scale for b in self.betas], self.p)
            before = mean_gap(objective, model, ctx.clean_x, ctx.eval_batch_size)
            result = stepped_fit(model, ctx, self.epochs, lr, objective, compile_ok=False)
            after = mean_gap(objective, model, ctx.clean_x, ctx.eval_batch_size)
        metrics = {
            "epochs": self.epochs,
            "teacher_epochs": self.teacher_epochs,
            "lr": lr,
            "n_clean": int(len(ctx.clean_y)),
            "final_loss": result.epoch_losses[-1],
            "teacher_final_loss": teacher_result.epoch_losses[-1],
            "attention_layers": ",".join(name for name, _ in student_layers),
            "beta_scale": scale,
            "at_gap_before": before,
            "at_gap_after": after,
            "train_seconds": result.seconds + teacher_result.seconds,
        }
        return [DefenseStage("distilled", snapshot(model), metrics)]

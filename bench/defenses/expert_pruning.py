"""Expert pruning: drop or re-initialise the expert whose routing the trigger moves most (MoE-specific).

No paper defines this defense for patch-level MoE; it tests the BadPatches observation (Section 5.4,
Figure 8) that a trigger patch is picked up by particular experts, and the quantized-backdoor paper's
question of which experts carry a backdoor. The method:

1. Suspected triggered inputs. A defender does not know the trigger, so by default it reverse-engineers
   one with Neural Cleanse (:mod:`bench.defenses.neural_cleanse`) on its clean data and stamps the
   flagged class's trigger on those images (``source="neural-cleanse"``). If Neural Cleanse flags no
   class, the defender sees no backdoor and prunes nothing (``expert = -1``). ``source="oracle"``
   stamps the real attack trigger (known to the benchmark only): an *upper bound* on what the defense
   can do, labelled as such in the metrics.
2. Routing change per expert: over the defender's images, the mean share of the expert's top-k patches
   that differ between the clean image and its stamped version (``|S(x) xor S(x')| / 2k``). The expert
   with the largest change is the suspect; ``expert`` declares one instead (then nothing is inferred).
3. Action: ``drop`` zeroes the expert's last convolution (weights and bias; the expert then outputs
   zeros everywhere and is kept at zero while fine-tuning), ``reset`` re-initialises every parameter
   of the expert with the model's initialisation (Glorot, zero bias, BatchNorm at (1, 0) with fresh
   running statistics) so fine-tuning relearns it from clean data only.
4. Fine-tuning on the defender's clean data for ``epochs`` (0: the "finetuned" stage equals "pruned").

Experts are identified through ``model.prunable_convs()``: for a pMoE model entry ``e`` is the last
convolution of expert ``e``, and its parent module is the expert.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
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
from bench.defenses.finetune import DEFAULT_EPOCHS, finetune_stage
from bench.defenses.neural_cleanse import ReverseSpec, check_reverse, detect, detection_metrics
from bench.defenses.pruning import ChannelMask, layer_mask
from bench.errors import ComponentParamsError
from bench.models.base import BenchModel
from bench.models.wrn import init_glorot
from bench.registry import register_defense

Source = Literal["neural-cleanse", "oracle"]
Action = Literal["drop", "reset"]


@torch.no_grad()
def routing_change(
    model: BenchModel, x: torch.Tensor, x_suspect: torch.Tensor, batch_size: int = 1024
) -> torch.Tensor:
    """``[E]``: per expert, the mean share of its kept patches that differ between ``x`` and ``x_suspect``."""
    if len(x) == 0:
        raise ComponentParamsError("expert-pruning: routing changes need clean images; the budget gave none")
    was_training = model.training
    model.eval()
    try:
        total: torch.Tensor | None = None
        for begin in range(0, len(x), batch_size):
            _, clean = model.forward_routing(x[begin : begin + batch_size])
            _, suspect = model.forward_routing(x_suspect[begin : begin + batch_size])
            if clean is None or suspect is None:
                raise ComponentParamsError(_NO_ROUTING.format(model=type(model).__name__))
            # |S xor S'| / (|S| + |S'|): 2k for a fixed top-k (pMoE); capacity-limited routing keeps fewer
            kept = (clean.kept() + suspect.kept()).double().clamp(min=1)
            moved = (clean.selection_mask() ^ suspect.selection_mask()).flatten(2).sum(2).double() / kept
            total = moved.sum(0) if total is None else total + moved.sum(0)
    finally:
        model.train(was_training)
    return (total / len(x)).float()  # type: ignore[operator]


def expert_modules(model: BenchModel) -> list[tuple[str, nn.Module, nn.Module]]:
    """``(conv name, last conv, expert module)`` per expert, from ``model.prunable_convs()``."""
    out = []
    for name, conv in model.prunable_convs():
        parent = name.rpartition(".")[0]
        out.append((name, conv, model.get_submodule(parent) if parent else conv))
    return out


def expert_silencer(model: BenchModel, expert: int) -> ChannelMask:
    """The mask that silences ``expert`` where the classifier reads it: its last convolution and its
    channels of the head BatchNorm are zeroed, so "dropped" means no output, not a constant from the
    BatchNorm's bias (``.apply()`` zeroes them; :func:`bench.defenses.pruning.hold_pruned` keeps them zero)."""
    layer = model.prunable_layers()[expert]
    return layer_mask(layer, torch.arange(layer.channels))


def reset_expert(module: nn.Module, seed: int) -> None:
    """Re-initialise ``module`` as the model's constructor does, from a generator seeded with ``seed``."""
    cuda = sorted({p.device.index or 0 for p in module.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        init_glorot(module)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()


_NO_ROUTING = (
    "expert-pruning: model {model} returns no routing (a dense model); expert pruning needs a patch-level "
    "MoE model such as 'pmoe'"
)


@register_defense("expert-pruning")
class ExpertPruning(Defense):
    """Drop or re-initialise the expert whose routing a (suspected) trigger changes most, then fine-tune.

    Arguments:
        expert (int | None): declare the expert to prune; None infers it from routing changes.
            Default: None.
        source (str): how suspected triggered inputs are made: "neural-cleanse" (the reversed trigger
            of the flagged class; realistic) or "oracle" (the real trigger; an upper bound).
            Default: "neural-cleanse".
        action (str): "drop" (zero the expert's output, kept at zero) or "reset" (re-initialise the
            expert). Default: "drop".
        epochs (int): fine-tuning epochs after pruning (0: none). Default: 5.
        lr (float | None): fine-tuning learning rate; None uses the scenario's ``train.lr``.
        nc_steps (int): Neural Cleanse steps per class for ``source="neural-cleanse"``. Default: 500.
        nc_lambda_init (float): Neural Cleanse's initial mask-norm weight. Default: 1e-3.
        budget (float): share of the clean training set the defender holds. Default: 0.05.

    Stages: "pruned" and "finetuned" (weights; metrics ``expert`` (-1 if none), ``routing_change``,
    ``source``, ``action``, and Neural Cleanse's detection metrics when it is the source).
    """

    stages = ("pruned", "finetuned")
    requires = frozenset({"routing", "experts"})
    name = "expert-pruning"
    #: toy-scale parameters for `bench run --smoke`
    smoke: ClassVar[dict[str, Any]] = {"nc_steps": 2}

    def __init__(
        self,
        expert: int | None = None,
        source: Source = "neural-cleanse",
        action: Action = "drop",
        epochs: int = DEFAULT_EPOCHS,
        lr: float | None = None,
        nc_steps: int = 500,
        nc_lambda_init: float = 1e-3,
        budget: float = DEFAULT_BUDGET,
    ) -> None:
        if expert is not None:
            check_range(self.name, "expert", expert, 0, what="an expert index")
        check_range(self.name, "epochs", epochs, 0, what="fine-tuning epochs after pruning")
        check_lr(self.name, lr)
        self.spec = ReverseSpec(steps=nc_steps, lambda_init=nc_lambda_init)
        check_reverse(self.name, self.spec)
        self.expert = expert
        self.source: Source = source
        self.action: Action = action
        self.epochs = epochs
        self.lr = lr
        self.budget = check_budget(self.name, budget)

    def run(self, model: BenchModel, ctx: DefenseContext) -> list[DefenseStage]:
        experts = expert_modules(model)
        if model.patch_grid is None or len(experts) < 2:
            raise ComponentParamsError(_NO_ROUTING.format(model=type(model).__name__))
        metrics: dict[str, float | int | str] = {"source": self.source, "action": self.action}
        chosen = self.expert
        if chosen is not None and chosen >= len(experts):
            raise ComponentParamsError(
                f"{self.name}.expert: this model has experts 0..{len(experts) - 1}, got {chosen}"
            )
        if chosen is None:
            chosen = self._suspect(model, ctx, metrics)
        else:
            metrics["source"] = "declared"
        metrics["expert"] = -1 if chosen is None else chosen
        hold: list[ChannelMask] = []
        if chosen is not None:
            name, conv, module = experts[chosen]
            if self.action == "drop":
                hold = [expert_silencer(model, chosen)]
                hold[0].apply()
            else:
                reset_expert(module, ctx.seed * 31 + chosen)
        pruned = DefenseStage("pruned", snapshot(model), metrics)
        finetuned = finetune_stage(model, ctx, self.epochs, self.lr, hold=hold)
        return [pruned, finetuned]

    def _suspect(
        self, model: BenchModel, ctx: DefenseContext, metrics: dict[str, float | int | str]
    ) -> int | None:
        """The expert with the largest routing change under the suspected trigger (None: no suspect)."""
        if self.source == "oracle":
            if ctx.trigger is None:
                raise ComponentParamsError(
                    f"{self.name}.source: 'oracle' uses the attack's trigger, but this model has no attack; "
                    "use source: neural-cleanse"
                )
            metrics["source"] = "oracle (upper bound)"
            with torch.no_grad():
                suspect = ctx.trigger(ctx.clean_x).to(ctx.clean_x.dtype)
        else:
            det = detect(model, ctx.clean_x, list(range(ctx.num_classes)), self.spec, ctx.seed)
            metrics.update({f"nc_{k}": v for k, v in detection_metrics(det, ctx).items()})
            if not det.flagged:
                return None
            suspect = det.trigger_of(det.flagged[0])(ctx.clean_x)
        change = routing_change(model, ctx.clean_x, suspect, ctx.eval_batch_size)
        metrics["routing_change"] = ",".join(f"{v:.3f}" for v in change.tolist())
        metrics["routing_change_max"] = float(change.max())
        return int(torch.argmax(change))

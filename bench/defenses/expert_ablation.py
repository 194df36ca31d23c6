"""Expert ablation: silence each expert in turn and measure what the model loses (MoE-specific analysis).

Which expert carries the backdoor? For every expert ``e`` of a pMoE model, the expert is silenced exactly
as expert-pruning's ``drop`` silences it (its last convolution and its channels of the head BatchNorm are
zero, so the classifier reads zeros there: :func:`bench.defenses.expert_pruning.expert_silencer`), and
the model is evaluated on the defender's clean images:

* ``ba_drop_e{i}``: clean accuracy before minus with expert ``i`` silenced (defender-visible).
* ``oracle_asr_drop_e{i}``: attack success rate before minus with expert ``i`` silenced, on the defender's
  non-target images stamped with the attack's trigger. The trigger is known to the *benchmark*, never to
  the defender: an oracle analysis, named so in every metric (as expert-pruning's ``source: oracle``).
* ``load_cv_e{i}``: how concentrated expert ``i``'s clean routing is (coefficient of variation of how often
  it keeps each patch, :func:`bench.analysis.routing.load_cv`; 0 = no positional preference).

The "ablated" stage then silences one expert: with ``select="routing"`` (the default, honest setting:
the defender sees the model and its clean data only) the expert whose clean routing is most concentrated
(largest ``load_cv``: an expert that keeps the same few patches whatever the image is the unusual one);
with ``select="oracle"`` the expert whose silencing drops the ASR most, an upper bound on what choosing
one expert can do (this setting also sees the trigger).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch

from bench.analysis.routing import load_cv, selection_counts, selection_masks
from bench.attacks.poison import backdoor_labels, triggered_test_set
from bench.defenses.base import DEFAULT_BUDGET, Defense, DefenseContext, DefenseStage, check_budget, snapshot
from bench.defenses.expert_pruning import expert_silencer
from bench.defenses.moe_parts import silenced
from bench.errors import ComponentParamsError
from bench.evaluate import predict
from bench.models.base import BenchModel
from bench.registry import register_defense

Select = Literal["routing", "oracle"]
SELECTS = ("routing", "oracle")
#: The label of the oracle choice in the metrics (expert-pruning's wording).
ORACLE = "oracle (upper bound)"


@register_defense("expert-ablation")
class ExpertAblation(Defense):
    """Silence each expert in turn (per-expert BA drop; oracle ASR drop), then silence the suspect one.

    Arguments:
        select (str): which expert the "ablated" stage silences: "routing" (the most concentrated clean
            routing; sees the model and clean data only) or "oracle" (the largest ASR drop; also sees the
            attack's trigger, an upper bound). Default: "routing".
        budget (float): share of the clean training set the defender holds. Default: 0.05.

    Sees: the model and the defender's clean data; the per-expert ASR drops (``oracle_*``) and
    ``select="oracle"`` also use the benchmark's trigger.

    Stages: "ablated" (weights; ``expert``, ``select``, ``ba_before``, ``ba_drop_e{i}``, ``load_cv_e{i}``,
    and with a known attack ``oracle_asr_before``, ``oracle_asr_drop_e{i}``, ``oracle_expert``).
    """

    stages = ("ablated",)
    requires = frozenset({"routing", "experts"})
    sees: ClassVar[frozenset[str]] = frozenset({"model", "clean"})
    name = "expert-ablation"
    #: toy-scale parameters for `bench run --smoke`: none (E + 1 forward passes over the defender's images)
    smoke: ClassVar[dict[str, Any]] = {}

    def __init__(self, select: Select = "routing", budget: float = DEFAULT_BUDGET) -> None:
        if select not in SELECTS:
            raise ComponentParamsError(f"{self.name}.select: must be one of {', '.join(SELECTS)}, got {select!r}")
        self.select: Select = select
        self.budget = check_budget(self.name, budget)

    def run(self, model: BenchModel, ctx: DefenseContext) -> list[DefenseStage]:
        if model.patch_grid is None or len(model.prunable_convs()) < 2:
            raise ComponentParamsError(
                f"{self.name}: model {type(model).__name__} has no routed experts (a dense model); expert "
                "ablation needs a patch-level MoE model such as 'pmoe'"
            )
        if self.select == "oracle" and ctx.trigger is None:
            raise ComponentParamsError(
                f"{self.name}.select: 'oracle' uses the attack's trigger, but this model has no attack; "
                "use select: routing"
            )
        if len(ctx.clean_x) == 0:
            raise ComponentParamsError(f"{self.name}: needs clean images; the budget gave none")
        bs = ctx.eval_batch_size
        cv = load_cv(selection_counts(selection_masks(model, ctx.clean_x, bs)))
        experts = len(cv)
        metrics: dict[str, float | int | str] = {f"load_cv_e{i}": float(v) for i, v in enumerate(cv)}
        ba = [self._accuracy(model, ctx.clean_x, ctx.clean_y, bs)]
        asr_set = self._asr_set(ctx)
        asr = [self._accuracy(model, *asr_set, bs)] if asr_set else []
        for e in range(experts):
            with silenced(model, e):
                ba.append(self._accuracy(model, ctx.clean_x, ctx.clean_y, bs))
                if asr_set:
                    asr.append(self._accuracy(model, *asr_set, bs))
        metrics["ba_before"] = ba[0]
        metrics.update({f"ba_drop_e{e}": ba[0] - ba[e + 1] for e in range(experts)})
        if asr_set:
            metrics["oracle_asr_before"] = asr[0]
            metrics.update({f"oracle_asr_drop_e{e}": asr[0] - asr[e + 1] for e in range(experts)})
            metrics["oracle_expert"] = max(range(experts), key=lambda e: asr[0] - asr[e + 1])
        if self.select == "oracle":
            chosen, metrics["select"] = int(metrics["oracle_expert"]), ORACLE
        else:
            chosen, metrics["select"] = int(torch.argmax(cv)), "routing"
        metrics["expert"] = chosen
        expert_silencer(model, chosen).apply()
        return [DefenseStage("ablated", snapshot(model), metrics)]

    @staticmethod
    def _asr_set(ctx: DefenseContext) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The defender's non-target images with the attack's trigger and their backdoor labels (oracle)."""
        if ctx.trigger is None:
            return None
        x, y = triggered_test_set(ctx.clean_x, ctx.clean_y, ctx.trigger, ctx.target)
        if len(x) == 0:
            return None
        return x, backdoor_labels(y, ctx.target, ctx.num_classes)

    @staticmethod
    def _accuracy(model: BenchModel, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
        return float((predict(model, x, batch_size) == y).float().mean())

"""Routing detector: reject inputs whose patch routing departs from the routing of clean images.

A patch-level MoE model exposes, for every input, which patches each expert's router kept. A trigger is
a patch-level pattern the backdoored routers learned to pick (the BadPatches observation, Section 5.4:
the trigger patch is routed to particular experts), so on triggered inputs experts keep patches they
rarely keep on clean ones. The detector, an inference-time filter like STRIP, needs no trigger and no
extra forward passes beyond the model's own:

1. Fit: on a share ``fit_share`` of the defender's clean images (a seeded split), per expert ``e`` and
   patch ``j`` the mean and standard deviation of its router score (``statistic="scores"``, the default),
   or the frequency ``p_ej`` with which the expert keeps the patch (``statistic="selection"``,
   Laplace-smoothed with ``prior`` pseudo-counts). Top-k keeps only the order of the scores, so
   ``selection`` sees less: on a 4x4 grid with 4 experts it separated worse (AUROC 0.72-0.79).
2. Score: ``scores``: the mean squared z-score of its router scores; ``selection``: the negative
   log-likelihood of the input's selection mask under independent Bernoulli(``p_ej``) entries, summed
   over experts and patches. Higher = more unusual routing.
3. Threshold: the ``1 - frr`` quantile of the scores of the other clean images (never used to fit), so
   about a share ``frr`` of clean inputs is rejected; an input scoring above it is rejected.

It flags routing that departs from clean routing, not backdoor behaviour as such: a patch pattern the
routers react to is flagged whether or not the model's backdoor fires on it (on a weakly backdoored
model, ASR 32%, triggered inputs were still all flagged).

Sees: the model (its routing) and the defender's clean data. Its one stage, "filtered", carries
``state=None`` and, like STRIP's, detection metrics on the clean test set (``frr``/``fpr``) and on the
attack's triggered non-target test images, which only the benchmark can build (``far``, ``tpr``,
``auroc``, ``asr_after_filter``, ``ba_after_filter``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from bench.attacks.poison import backdoor_labels, triggered_test_set
from bench.defenses.base import DEFAULT_BUDGET, Defense, DefenseContext, DefenseStage, check_budget, check_range
from bench.defenses.strip import auroc
from bench.errors import ComponentParamsError
from bench.models.base import BenchModel
from bench.registry import register_defense

Statistic = Literal["selection", "scores"]
STATISTICS = ("selection", "scores")


@dataclass
class Routed:
    """One pass over a set of images: predictions ``[N]``, selection masks and router scores ``[N, E, n]``."""

    preds: torch.Tensor
    masks: torch.Tensor
    scores: torch.Tensor


@torch.no_grad()
def routed(model: BenchModel, x: torch.Tensor, batch_size: int = 1024) -> Routed:
    """Predictions and routing of ``model`` on ``x`` (eval mode, restored after)."""
    was_training = model.training
    model.eval()
    preds, masks, scores = [], [], []
    try:
        for begin in range(0, len(x), batch_size):
            logits, routing = model.forward_routing(x[begin : begin + batch_size])
            if routing is None:
                raise ComponentParamsError(f"routing-detector: model {type(model).__name__} returns no routing")
            preds.append(logits.argmax(1))
            masks.append(routing.selection_mask().flatten(2))
            scores.append(routing.scores.float())
    finally:
        model.train(was_training)
    if not preds:
        raise ComponentParamsError("routing-detector: no images to route")
    return Routed(torch.cat(preds), torch.cat(masks), torch.cat(scores))


@dataclass
class RoutingModel:
    """Clean routing statistics, per expert and patch (``[E, n]``), and the score they give an input."""

    statistic: Statistic
    center: torch.Tensor  # selection: keep frequency p; scores: mean
    spread: torch.Tensor | None = None  # scores: standard deviation

    @classmethod
    def fit(cls, clean: Routed, statistic: Statistic, prior: float = 1.0) -> RoutingModel:
        if statistic == "selection":
            n = len(clean.masks)
            freq = (clean.masks.double().sum(0) + prior) / (n + 2 * prior)
            return cls(statistic, freq)
        values = clean.scores.double()
        mean, std = values.mean(0), values.std(0, correction=0)
        floor = 1e-3 * float(std.mean()) + 1e-12  # a patch whose score never moves must not divide by zero
        return cls(statistic, mean, std.clamp_min(floor))

    def score(self, data: Routed) -> torch.Tensor:
        """``[N]``: how far each input's routing departs from the clean statistics (higher: more unusual)."""
        if self.statistic == "selection":
            p = self.center.clamp(1e-12, 1 - 1e-12)
            kept = data.masks.double()
            nll = -(kept * p.log() + (1 - kept) * (1 - p).log())
            return nll.flatten(1).sum(1).float()
        assert self.spread is not None
        z = (data.scores.double() - self.center) / self.spread
        return z.pow(2).flatten(1).mean(1).float()


def split(n: int, fit_share: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint indices of the defender's ``n`` clean images: ``(fit, threshold)``, a seeded permutation cut
    at ``fit_share`` (at least one image each)."""
    if n < 2:
        raise ComponentParamsError(
            f"routing-detector: the defender needs at least 2 clean images (fit and threshold), got {n}; "
            "raise budget"
        )
    order = torch.randperm(n, generator=generator)
    cut = min(max(1, round(fit_share * n)), n - 1)
    return order[:cut], order[cut:]


@register_defense("routing-detector")
class RoutingDetector(Defense):
    """Reject inputs whose patch routing is unlikely under the routing of clean images (MoE-specific).

    An inference-time filter; no weights change.

    Arguments:
        statistic (str): "selection" (per-expert Bernoulli keep frequency of every patch; score = negative
            log-likelihood of the input's selection mask) or "scores" (per-expert mean and std of every
            patch's router score; score = mean squared z-score). Default: "scores" (on our tiny digits
            BadNets / BadPatches pMoE models AUROC 1.0 against 0.72-0.997 for "selection").
        frr (float): false rejection budget: the threshold is the clean scores' ``1 - frr`` quantile, in
            (0, 1). Default: 0.05.
        fit_share (float): share of the defender's clean images that estimate the statistics; the others
            set the threshold, in (0, 1). Default: 0.5.
        prior (float): Laplace pseudo-count of the selection frequencies (> 0). Default: 1.0.
        test_limit (int | None): score at most this many test images (a seeded subset); None: all.
        budget (float): share of the clean training set the defender holds. Default: 0.05.

    Sees: the model's routing and the defender's clean data (the triggered test images of the metrics are
    the benchmark's).

    Stages: "filtered" (no weights; ``threshold``, ``frr``, ``fpr``, ``clean_score``, and with a known
    attack ``far``, ``tpr``, ``auroc``, ``trojan_score``, ``asr_after_filter``, ``ba_after_filter``).
    """

    stages = ()
    requires = frozenset({"routing"})
    sees: ClassVar[frozenset[str]] = frozenset({"model", "clean"})
    name = "routing-detector"
    #: toy-scale parameters for `bench run --smoke`
    smoke: ClassVar[dict[str, Any]] = {"test_limit": 16}

    def __init__(
        self,
        statistic: Statistic = "scores",
        frr: float = 0.05,
        fit_share: float = 0.5,
        prior: float = 1.0,
        test_limit: int | None = None,
        budget: float = DEFAULT_BUDGET,
    ) -> None:
        if statistic not in STATISTICS:
            raise ComponentParamsError(
                f"{self.name}.statistic: must be one of {', '.join(STATISTICS)}, got {statistic!r}"
            )
        check_range(self.name, "frr", frr, 0.0, 1.0, low_open=True, high_open=True,
                    what="false rejection budget on clean inputs")
        check_range(self.name, "fit_share", fit_share, 0.0, 1.0, low_open=True, high_open=True,
                    what="share of the defender's images that fit the routing statistics")
        check_range(self.name, "prior", prior, 0.0, low_open=True, what="Laplace pseudo-count")
        if test_limit is not None:
            check_range(self.name, "test_limit", test_limit, 1)
        self.statistic: Statistic = statistic
        self.frr = frr
        self.fit_share = fit_share
        self.prior = prior
        self.test_limit = test_limit
        self.budget = check_budget(self.name, budget)

    def run(self, model: BenchModel, ctx: DefenseContext) -> list[DefenseStage]:
        if getattr(model, "patch_grid", None) is None:
            raise ComponentParamsError(
                f"{self.name}: model {type(model).__name__} has no routing (a dense model); the routing "
                "detector needs a patch-level MoE model such as 'pmoe'"
            )
        if ctx.test_x is None or ctx.test_y is None:
            raise ComponentParamsError(f"{self.name}: needs the clean test set in the defense context (ctx.test_x)")
        fit_idx, threshold_idx = split(len(ctx.clean_x), self.fit_share, ctx.generator(salt=20))
        stats = self.fit(model, ctx.clean_x[fit_idx], ctx.eval_batch_size)
        held_out = stats.score(routed(model, ctx.clean_x[threshold_idx], ctx.eval_batch_size))
        threshold = float(torch.quantile(held_out.double(), 1 - self.frr))
        test_x, test_y = ctx.test_x, ctx.test_y
        if self.test_limit is not None and self.test_limit < len(test_x):
            keep = torch.randperm(len(test_x), generator=ctx.generator(salt=21))[: self.test_limit].to(test_x.device)
            test_x, test_y = test_x[keep], test_y[keep]
        clean = routed(model, test_x, ctx.eval_batch_size)
        clean_score = stats.score(clean)
        rejected = clean_score > threshold
        metrics: dict[str, float | int | str] = {
            "threshold": threshold,
            "clean_score": _mean(clean_score),
            "frr": _mean(rejected),
            "fpr": _mean(rejected),
            "n_clean": int(len(clean_score)),
            "n_fit": int(len(fit_idx)),
            "n_threshold": int(len(threshold_idx)),
        }
        if ctx.trigger is not None:
            trig_x, trig_y = triggered_test_set(test_x, test_y, ctx.trigger, ctx.target)
            if len(trig_x):
                trojan = routed(model, trig_x, ctx.eval_batch_size)
                trojan_score = stats.score(trojan)
                accepted = trojan_score <= threshold
                hits = trojan.preds == backdoor_labels(trig_y, ctx.target, ctx.num_classes)
                metrics.update({
                    "trojan_score": _mean(trojan_score),
                    "far": _mean(accepted),
                    "tpr": _mean(~accepted),
                    "auroc": auroc(trojan_score, clean_score),
                    "asr_after_filter": _mean(accepted & hits),
                    "ba_after_filter": _mean(~rejected & (clean.preds == test_y)),
                    "n_triggered": int(len(trojan_score)),
                })
        return [DefenseStage("filtered", None, metrics)]

    def fit(self, model: BenchModel, x: torch.Tensor, batch_size: int = 1024) -> RoutingModel:
        """The clean routing statistics of ``model`` on images ``x``."""
        return RoutingModel.fit(routed(model, x, batch_size), self.statistic, self.prior)


def _mean(values: torch.Tensor) -> float:
    """Mean of a float or bool tensor; NaN when it is empty."""
    return float(values.float().mean()) if values.numel() else float("nan")

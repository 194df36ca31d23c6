"""STRIP: reject inputs whose prediction survives being mixed with other images.

Gao et al., "STRIP: A Defence Against Trojan Attacks on Deep Neural Networks", ACSAC 2019
(https://arxiv.org/abs/1902.06531). A trigger dominates the prediction, so a triggered input superimposed
with random clean images keeps predicting the target (low entropy), while a clean input's prediction
scatters (high entropy). At inference time, each input is superimposed with ``n`` clean images drawn
from the defender's data; the mean Shannon entropy (base 2) of the ``n`` predictions is its score.

Threshold as in the paper (Section V): the defender fits a normal distribution to the entropies of its
own clean images and picks the quantile at the target false rejection rate ``frr`` (1%); an input with
entropy below the threshold is rejected. Superimposition (``superimpose``): ``add`` is the original
image addition (``cv2.addWeighted(x, 1, overlay, 1, 0)`` in their code), clipped to [0, 1], so a bright
trigger survives at full strength; ``blend`` is ``alpha * x + (1 - alpha) * overlay`` (TrojanZoo's STRIP,
``alpha = 0.5``), which halves the trigger's contrast: on our digits BadNets model a blended white square
no longer fires and STRIP fails (AUROC below 0.5), while addition separates cleanly. The paper
evaluates with ``N = 100`` replicas per input; ``n`` defaults to 20 to keep CPU runs cheap.

STRIP changes no weights: its one stage, "filtered", carries ``state=None`` and detection metrics on the
clean test set and on the attack's triggered non-target test images (the benchmark knows the attack):
measured ``frr``/``fpr`` (clean rejected), ``far`` (triggered accepted), ``tpr`` = 1 - far, ``auroc``,
and ``asr_after_filter`` (triggered inputs accepted *and* classified as the target, over all of them).
"""

from __future__ import annotations

import statistics
from typing import Literal

import torch

from bench.attacks.base import Trigger
from bench.attacks.poison import triggered_test_set
from bench.defenses.base import (
    DEFAULT_BUDGET,
    Defense,
    DefenseContext,
    DefenseStage,
    check_budget,
    check_range,
)
from bench.errors import ComponentParamsError
from bench.models.base import BenchModel
from bench.registry import register_defense

Superimpose = Literal["add", "blend"]


@torch.no_grad()
def strip_entropy(
    model: BenchModel,
    x: torch.Tensor,
    pool: torch.Tensor,
    n: int,
    superimpose: Superimpose,
    generator: torch.Generator,
    batch_size: int = 1024,
    alpha: float = 0.5,
) -> torch.Tensor:
    """``[N]``: mean prediction entropy (bits) of each input of ``x`` superimposed with ``n`` images of
    ``pool``: ``clip(x + overlay, 0, 1)`` for ``add``, ``alpha * x + (1 - alpha) * overlay`` for ``blend``.

    Overlay indices are drawn with ``generator`` for all inputs at once, so the result does not depend
    on the batch size.
    """
    picks = torch.randint(0, len(pool), (len(x), n), generator=generator).to(x.device)
    per_batch = max(1, batch_size // n)
    was_training = model.training
    model.eval()
    try:
        out = []
        for begin in range(0, len(x), per_batch):
            xb = x[begin : begin + per_batch]
            overlays = pool[picks[begin : begin + per_batch]]  # [B, n, C, H, W]
            if superimpose == "add":
                mixed = (xb[:, None] + overlays).clamp(0.0, 1.0)
            else:
                mixed = alpha * xb[:, None] + (1 - alpha) * overlays
            probs = model(mixed.flatten(0, 1)).float().softmax(1)
            entropy = -(probs * torch.log2(probs.clamp_min(1e-12))).sum(1)
            out.append(entropy.view(len(xb), n).mean(1))
        return torch.cat(out) if out else torch.empty(0, device=x.device)
    finally:
        model.train(was_training)


def normal_threshold(entropies: torch.Tensor, frr: float) -> float:
    """The ``frr`` quantile of a normal distribution fitted to clean entropies (the paper's rule)."""
    values = entropies.double().tolist()
    if len(values) < 2:
        raise ComponentParamsError(
            f"strip: fitting the clean entropy distribution needs at least 2 clean images, got "
            f"{len(values)}; raise budget"
        )
    mean, std = statistics.fmean(values), statistics.stdev(values)
    if std == 0:
        return mean
    return statistics.NormalDist(mean, std).inv_cdf(frr)


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Area under the ROC curve for ``positive`` scoring higher than ``negative`` (ties count half):
    the Mann-Whitney statistic computed from average ranks."""
    if len(positive) == 0 or len(negative) == 0:
        return float("nan")
    scores = torch.cat([positive, negative]).double().cpu()
    values, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    average_rank = ends - (counts.double() - 1) / 2  # 1-based average rank of each distinct value
    ranks = average_rank[inverse]
    n_pos, n_neg = len(positive), len(negative)
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def _subset(x: torch.Tensor, y: torch.Tensor, limit: int | None, generator: torch.Generator) -> tuple[
    torch.Tensor, torch.Tensor
]:
    if limit is None or limit >= len(x):
        return x, y
    idx = torch.randperm(len(x), generator=generator)[:limit].to(x.device)
    return x[idx], y[idx]


@register_defense("strip")
class Strip(Defense):
    """STRIP (Gao et al. 2019): reject inputs whose predictions stay certain under superimposition.

    An inference-time filter; no weights change.

    Arguments:
        n (int): clean overlays per input. Default: 20 (the paper: 100).
        superimpose (str): "add" (``clip(x + overlay, 0, 1)``, the original) or "blend". Default: "add".
        alpha (float): weight of the input for ``blend``: ``alpha * x + (1 - alpha) * overlay``, in (0, 1).
            Default: 0.5.
        frr (float): target false rejection rate that sets the threshold, in (0, 1). Default: 0.01.
        test_limit (int | None): score at most this many test images (a seeded subset); None: all.
        budget (float): share of the clean training set the defender holds (threshold fitting and
            overlays). Default: 0.05.

    Stages: "filtered" (no weights; ``threshold``, ``frr``, ``fpr``, and with a known attack ``far``,
    ``tpr``, ``auroc``, ``asr_after_filter``, ``ba_after_filter``).
    """

    stages = ()
    name = "strip"

    def __init__(
        self,
        n: int = 20,
        superimpose: Superimpose = "add",
        alpha: float = 0.5,
        frr: float = 0.01,
        test_limit: int | None = None,
        budget: float = DEFAULT_BUDGET,
    ) -> None:
        check_range(self.name, "n", n, 1, what="overlays per input")
        check_range(self.name, "alpha", alpha, 0.0, 1.0, low_open=True, high_open=True)
        check_range(self.name, "frr", frr, 0.0, 1.0, low_open=True, high_open=True,
                    what="target false rejection rate")
        if test_limit is not None:
            check_range(self.name, "test_limit", test_limit, 1)
        self.n = n
        self.superimpose: Superimpose = superimpose
        self.alpha = alpha
        self.frr = frr
        self.test_limit = test_limit
        self.budget = check_budget(self.name, budget)

    def run(self, model: BenchModel, ctx: DefenseContext) -> list[DefenseStage]:
        if ctx.test_x is None or ctx.test_y is None:
            raise ComponentParamsError("strip: needs the clean test set in the defense context (ctx.test_x)")
        threshold = normal_threshold(self._entropy(model, ctx.clean_x, ctx, salt=11), self.frr)
        test_x, test_y = _subset(ctx.test_x, ctx.test_y, self.test_limit, ctx.generator(salt=12))
        clean = self._entropy(model, test_x, ctx, salt=13)
        rejected = clean < threshold
        metrics: dict[str, float | int | str] = {
            "threshold": threshold,
            "clean_entropy": _mean(clean),
            "frr": _mean(rejected),
            "fpr": _mean(rejected),
            "n_clean": int(len(clean)),
        }
        if ctx.trigger is not None and ctx.target is not None:
            metrics.update(self._attack_metrics(model, ctx, ctx.trigger, ctx.target, test_x, test_y, clean,
                                                threshold))
        return [DefenseStage("filtered", None, metrics)]

    def _entropy(self, model: BenchModel, x: torch.Tensor, ctx: DefenseContext, salt: int) -> torch.Tensor:
        return strip_entropy(model, x, ctx.clean_x, self.n, self.superimpose, ctx.generator(salt=salt),
                             ctx.eval_batch_size, self.alpha)

    def _attack_metrics(
        self,
        model: BenchModel,
        ctx: DefenseContext,
        trigger: Trigger,
        target: int,
        test_x: torch.Tensor,
        test_y: torch.Tensor,
        clean: torch.Tensor,
        threshold: float,
    ) -> dict[str, float | int | str]:
        """FAR, TPR, AUROC and what survives the filter, on the attack's triggered non-target test images."""
        from bench.evaluate import predict

        trig_x, _ = triggered_test_set(test_x, test_y, trigger, target)
        trojan = self._entropy(model, trig_x, ctx, salt=14)
        accepted = trojan >= threshold
        hits = predict(model, trig_x, ctx.eval_batch_size) == target
        correct = predict(model, test_x, ctx.eval_batch_size) == test_y
        return {
            "trojan_entropy": _mean(trojan),
            "far": _mean(accepted),
            "tpr": _mean(~accepted),
            "auroc": auroc(-trojan, -clean),
            "asr_after_filter": _mean(accepted & hits),
            "ba_after_filter": _mean((clean >= threshold) & correct),
            "n_triggered": int(len(trojan)),
        }


def _mean(values: torch.Tensor) -> float:
    """Mean of a float or bool tensor; NaN when it is empty."""
    return float(values.float().mean()) if values.numel() else float("nan")

"""STRIP: reject inputs whose prediction survives being mixed with other images.

Gao et al., "STRIP: A Defence Against Trojan Attacks on Deep Neural Networks", ACSAC 2019
(https://arxiv.org/abs/1902.06531), with the details of the authors' public code (garrisongys/STRIP,
notebook ``STRIP_CIFAR10DeepArchit_Tb.ipynb``). A trigger dominates the prediction, so a triggered input
superimposed with random clean images keeps predicting the target (low entropy), while a clean input's
prediction scatters (high entropy). Each input is superimposed with ``n`` clean images drawn (with
replacement) from an overlay pool; the mean Shannon entropy (base 2) of the ``n`` predictions is its score.

Defaults, against their notebook:

* ``n = 100`` overlays per input (``n_sample = 100`` in ``entropyCal``'s cell).
* Disjoint overlay pool: their overlays come from ``x_train[40000:49999]`` (``np.random.randint(40000,
  49999, size=n)``), the clean inputs that set the threshold from ``x_train[26000:28000]``, so no input
  is ever superimposed on itself. We split the defender's clean images the same way, with a seeded
  permutation: a share ``overlay_share`` (half) is the overlay pool, the rest are the threshold inputs;
  test inputs (clean and triggered) are superimposed with the same pool.
* Threshold: a normal distribution fitted to the threshold inputs' entropies by maximum likelihood
  (``scipy.stats.norm.fit``: the population standard deviation) and its quantile at the false rejection
  rate ``frr = 0.01`` (``scipy.stats.norm.ppf(0.01, ...)``, "a preset FRR of 0.01"); an input with
  entropy below it is rejected.
* Superimposition: theirs is ``cv2.addWeighted(background, 1, overlay, 1, 0)`` on float images in
  [0, 1], which does not saturate (``add_unclipped``). Our default ``add`` clips the sum to [0, 1], the
  valid pixel range the model was trained on (what the same call does on 8-bit images): on our digits
  BadNets models the unclipped sums leave the training range and STRIP stops separating (AUROC 0.79
  against 1.0 at 8x8, 0.59 against 0.99 at 16x16, n = 100). ``blend`` is
  ``alpha * x + (1 - alpha) * overlay`` (TrojanZoo's STRIP, ``alpha = 0.5``), which halves the trigger's
  contrast: on our digits BadNets model a blended white square no longer fires and STRIP fails.

STRIP changes no weights: its one stage, "filtered", carries ``state=None`` and detection metrics on the
clean test set and on the attack's triggered non-target test images (the benchmark knows the attack):
measured ``frr``/``fpr`` (clean rejected), ``far`` (triggered accepted), ``tpr`` = 1 - far, ``auroc``,
and ``asr_after_filter`` (triggered inputs accepted *and* classified as the target, over all of them).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

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

Superimpose = Literal["add", "add_unclipped", "blend"]
#: Share of the defender's clean images that form the overlay pool; the rest set the threshold.
OVERLAY_SHARE = 0.5


def draw_overlays(count: int, n: int, pool_size: int, generator: torch.Generator) -> torch.Tensor:
    """``[count, n]`` overlay indices into a pool of ``pool_size`` images, drawn with replacement (as
    ``np.random.randint`` in their code), for all inputs at once: results do not depend on batching."""
    return torch.randint(0, pool_size, (count, n), generator=generator)


def superimposed(x: torch.Tensor, overlays: torch.Tensor, how: Superimpose, alpha: float = 0.5) -> torch.Tensor:
    """``[B, n, C, H, W]``: each input of ``x`` (``[B, C, H, W]``) superimposed with its ``n`` overlays."""
    if how == "blend":
        return alpha * x[:, None] + (1 - alpha) * overlays
    mixed = x[:, None] + overlays
    return mixed if how == "add_unclipped" else mixed.clamp(0.0, 1.0)


@torch.no_grad()
def strip_entropy(
    model: BenchModel,
    x: torch.Tensor,
    pool: torch.Tensor,
    picks: torch.Tensor,
    superimpose: Superimpose,
    batch_size: int = 1024,
    alpha: float = 0.5,
) -> torch.Tensor:
    """``[N]``: mean prediction entropy (bits) of each input ``x[i]`` superimposed with the ``n`` images
    ``pool[picks[i]]`` (``picks``: ``[N, n]``; see :func:`superimposed`). The picks must never point at
    the input itself (an image on itself keeps its prediction, lowering the entropy)."""
    n = picks.shape[1]
    picks = picks.to(x.device)
    per_batch = max(1, batch_size // n)
    was_training = model.training
    model.eval()
    try:
        out = []
        for begin in range(0, len(x), per_batch):
            xb = x[begin : begin + per_batch]
            mixed = superimposed(xb, pool[picks[begin : begin + per_batch]], superimpose, alpha)
            probs = model(mixed.flatten(0, 1)).float().softmax(1)
            entropy = -(probs * torch.log2(probs.clamp_min(1e-12))).sum(1)
            out.append(entropy.view(len(xb), n).mean(1))
        return torch.cat(out) if out else torch.empty(0, device=x.device)
    finally:
        model.train(was_training)


def split_defender_set(n: int, overlay_share: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint indices of the defender's ``n`` clean images: ``(overlay pool, threshold inputs)``, a
    seeded permutation cut at ``overlay_share`` (at least 1 overlay and 2 threshold inputs)."""
    if n < 3:
        raise ComponentParamsError(
            f"strip: the defender needs at least 3 clean images (overlays, and 2 to fit the threshold), got "
            f"{n}; raise budget"
        )
    order = torch.randperm(n, generator=generator)
    cut = min(max(1, round(overlay_share * n)), n - 2)
    return order[:cut], order[cut:]


def normal_threshold(entropies: torch.Tensor, frr: float) -> float:
    """The ``frr`` quantile of a normal distribution fitted to clean entropies by maximum likelihood
    (their ``scipy.stats.norm.fit``: mean and population standard deviation, then ``norm.ppf(frr)``)."""
    values = entropies.double().tolist()
    if len(values) < 2:
        raise ComponentParamsError(
            f"strip: fitting the clean entropy distribution needs at least 2 clean images, got "
            f"{len(values)}; raise budget"
        )
    mean, std = statistics.fmean(values), statistics.pstdev(values)
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


@dataclass(frozen=True)
class ThresholdDraw:
    """Indices into the defender's images: the overlay ``pool``, the threshold ``inputs`` (disjoint from
    it), and ``overlays`` (``[len(inputs), n]``, from the pool) superimposed on each threshold input."""

    pool: torch.Tensor
    inputs: torch.Tensor
    overlays: torch.Tensor


@register_defense("strip")
class Strip(Defense):
    """STRIP (Gao et al. 2019): reject inputs whose predictions stay certain under superimposition.

    An inference-time filter; no weights change.

    Arguments:
        n (int): clean overlays per input (their n_sample = 100; the CPU cost knob). Default: 100.
        superimpose (str): "add" (``clip(x + overlay, 0, 1)``), "add_unclipped" (``x + overlay``, their
            float ``cv2.addWeighted``) or "blend". Default: "add".
        alpha (float): weight of the input for ``blend``: ``alpha * x + (1 - alpha) * overlay``, in (0, 1).
            Default: 0.5.
        frr (float): target false rejection rate that sets the threshold, in (0, 1). Default: 0.01.
        overlay_share (float): share of the defender's clean images that form the overlay pool; the
            others, never superimposed on anything from the pool's side, set the threshold. Default: 0.5.
        test_limit (int | None): score at most this many test images (a seeded subset); None: all.
        budget (float): share of the clean training set the defender holds (overlay pool and threshold
            inputs). Default: 0.05.

    Stages: "filtered" (no weights; ``threshold``, ``frr``, ``fpr``, and with a known attack ``far``,
    ``tpr``, ``auroc``, ``asr_after_filter``, ``ba_after_filter``).
    """

    stages = ()
    name = "strip"
    #: toy-scale parameters for `bench run --smoke`
    smoke: ClassVar[dict[str, Any]] = {"n": 4, "test_limit": 16}

    def __init__(
        self,
        n: int = 100,
        superimpose: Superimpose = "add",
        alpha: float = 0.5,
        frr: float = 0.01,
        overlay_share: float = OVERLAY_SHARE,
        test_limit: int | None = None,
        budget: float = DEFAULT_BUDGET,
    ) -> None:
        check_range(self.name, "n", n, 1, what="overlays per input")
        check_range(self.name, "alpha", alpha, 0.0, 1.0, low_open=True, high_open=True)
        check_range(self.name, "frr", frr, 0.0, 1.0, low_open=True, high_open=True,
                    what="target false rejection rate")
        check_range(self.name, "overlay_share", overlay_share, 0.0, 1.0, low_open=True, high_open=True,
                    what="share of the defender's images used as overlays")
        if test_limit is not None:
            check_range(self.name, "test_limit", test_limit, 1)
        self.n = n
        self.superimpose: Superimpose = superimpose
        self.alpha = alpha
        self.frr = frr
        self.overlay_share = overlay_share
        self.test_limit = test_limit
        self.budget = check_budget(self.name, budget)

    def run(self, model: BenchModel, ctx: DefenseContext) -> list[DefenseStage]:
        if ctx.test_x is None or ctx.test_y is None:
            raise ComponentParamsError("strip: needs the clean test set in the defense context (ctx.test_x)")
        draw = self.threshold_draw(ctx)
        threshold = normal_threshold(self._entropy(model, ctx.clean_x[draw.inputs], draw.overlays, ctx), self.frr)
        test_x, test_y = _subset(ctx.test_x, ctx.test_y, self.test_limit, ctx.generator(salt=12))
        clean = self._entropy(model, test_x, self._overlays(draw.pool, len(test_x), ctx, salt=13), ctx)
        rejected = clean < threshold
        metrics: dict[str, float | int | str] = {
            "threshold": threshold,
            "clean_entropy": _mean(clean),
            "frr": _mean(rejected),
            "fpr": _mean(rejected),
            "n_clean": int(len(clean)),
            "n_overlay_pool": int(len(draw.pool)),
            "n_threshold": int(len(draw.inputs)),
        }
        if ctx.trigger is not None and ctx.target is not None:
            metrics.update(self._attack_metrics(model, ctx, ctx.trigger, ctx.target, test_x, test_y, clean,
                                                threshold, draw.pool))
        return [DefenseStage("filtered", None, metrics)]

    def threshold_draw(self, ctx: DefenseContext) -> ThresholdDraw:
        """The split of the defender's images into overlay pool and threshold inputs, and each threshold
        input's overlays (seeded from the cell's seed: :meth:`run` makes the same draw)."""
        pool, inputs = split_defender_set(len(ctx.clean_x), self.overlay_share, ctx.generator(salt=10))
        return ThresholdDraw(pool, inputs, self._overlays(pool, len(inputs), ctx, salt=11))

    def _overlays(self, pool: torch.Tensor, count: int, ctx: DefenseContext, salt: int) -> torch.Tensor:
        """``[count, n]`` indices into ``ctx.clean_x``, drawn from ``pool`` only."""
        return pool[draw_overlays(count, self.n, len(pool), ctx.generator(salt=salt))]

    def _entropy(self, model: BenchModel, x: torch.Tensor, picks: torch.Tensor, ctx: DefenseContext) -> torch.Tensor:
        return strip_entropy(model, x, ctx.clean_x, picks, self.superimpose, ctx.eval_batch_size, self.alpha)

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
        pool: torch.Tensor,
    ) -> dict[str, float | int | str]:
        """FAR, TPR, AUROC and what survives the filter, on the attack's triggered non-target test images."""
        from bench.evaluate import predict

        trig_x, _ = triggered_test_set(test_x, test_y, trigger, target)
        trojan = self._entropy(model, trig_x, self._overlays(pool, len(trig_x), ctx, salt=14), ctx)
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

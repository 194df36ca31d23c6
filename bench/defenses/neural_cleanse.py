"""Neural Cleanse: reverse-engineer a minimal trigger per class, flag the outlier, unlearn it.

Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural Networks", IEEE S&P
2019 (https://sites.cs.ucsb.edu/~bolunwang/assets/docs/backdoor-sp19.pdf), with the details of their
public code (bolunwang/backdoor, ``visualizer.py``):

1. Reverse engineering (Section IV.B). For each class ``c``, a mask ``m`` (``[H, W]``, shared by the
   channels) and a pattern ``p`` (``[C, H, W]``) are optimised so that ``(1 - m) * x + m * p`` is
   classified as ``c`` for the defender's clean images, while ``|m|_1`` stays small:
   ``CE(f(x'), c) + lambda * |m|_1``. Both live in [0, 1] through ``tanh(w) / (2 - eps) + 0.5``, start
   from uniform random values, and are trained with Adam (lr 0.1, betas 0.5 and 0.9).
   ``lambda`` follows their schedule: it starts at ``lambda_init``; after ``patience`` checks in a row
   with attack success at or above ``success`` it is multiplied by 1.5, after ``patience`` checks below
   it is divided by 1.5 ** 1.5. Their check is once per epoch over the clean set; we check every
   :data:`CHECK_EVERY` optimizer steps (the mean success over those steps), so the schedule behaves
   the same whatever the defender's data size. The kept mask is the smallest one that reached
   ``success`` at a check (the last one if none did). All classes are optimised together in one
   batch (independent parameters, so this equals per-class runs) to keep the GPU busy.
2. Detection (Section IV.C). The anomaly index of a class is ``|n_c - median(n)| / (1.4826 * MAD)`` over
   the mask L1 norms ``n``; classes with index > 2 on the small-norm side are flagged.
3. Mitigation by unlearning (Section VI.C): fine-tune on the clean data where a share (20%) of the
   images carry the reverse-engineered trigger of the flagged class but keep their true labels; the
   paper fine-tunes for 1 epoch. With several flagged classes their triggers take turns. If nothing
   is flagged, the defender has nothing to unlearn and the model is left as it is (``applied = 0``).

CPU cost is about ``steps * classes * batch_size`` forward and backward passes; ``steps`` (500 by
default, far below the original's epochs of mini-batches) and ``classes`` are the knobs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.defenses.base import (
    DEFAULT_BUDGET,
    Defense,
    DefenseContext,
    DefenseStage,
    check_budget,
    check_range,
    snapshot,
)
from bench.defenses.finetune import finetune
from bench.errors import ComponentParamsError
from bench.models.base import BenchModel
from bench.registry import register_defense

#: MAD consistency constant for normally distributed norms (Neural Cleanse, Section IV.C).
CONSISTENCY = 1.4826
#: Optimizer steps between two checks of the lambda schedule (their code checks once per epoch).
CHECK_EVERY = 10
#: Lambda multipliers of the original schedule.
COST_UP = 1.5
COST_DOWN = 1.5**1.5
#: Keeps tanh(w) / (2 - eps) + 0.5 strictly inside (0, 1) (Keras' epsilon in their code).
TANH_EPS = 1e-7
#: Upper bound on images per forward pass while reverse-engineering (classes are split into chunks).
MAX_CHUNK_IMAGES = 1024


@dataclass(frozen=True)
class ReverseSpec:
    """Settings of the reverse-engineering optimisation (the original's defaults)."""

    steps: int = 500
    lr: float = 0.1
    lambda_init: float = 1e-3
    success: float = 0.99
    patience: int = 5
    batch_size: int = 32


@dataclass
class ReversedTrigger:
    """A reverse-engineered trigger for class ``target``: ``(1 - mask) * x + mask * pattern``.

    mask: ``[H, W]`` in [0, 1]; pattern: ``[C, H, W]`` in [0, 1]; success: share of the defender's
    clean images it sent to ``target`` at the kept check.
    """

    target: int
    mask: torch.Tensor
    pattern: torch.Tensor
    success: float

    @property
    def norm(self) -> float:
        """L1 norm of the mask (what Neural Cleanse compares across classes)."""
        return float(self.mask.abs().sum())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mask.to(x.device, x.dtype)
        return (1 - m) * x + m * self.pattern.to(x.device, x.dtype)


@dataclass
class Detection:
    """Outcome of the scan: one reversed trigger, norm and anomaly index per scanned class, and the
    flagged classes (most anomalous first)."""

    triggers: list[ReversedTrigger]
    norms: torch.Tensor
    indices: torch.Tensor
    flagged: list[int]

    def trigger_of(self, cls: int) -> ReversedTrigger:
        return next(t for t in self.triggers if t.target == cls)

    def index_of(self, cls: int) -> float:
        pos = [t.target for t in self.triggers].index(cls)
        return float(self.indices[pos])


def _to_unit(w: torch.Tensor) -> torch.Tensor:
    return torch.tanh(w) / (2 - TANH_EPS) + 0.5


def _from_unit(v: torch.Tensor) -> torch.Tensor:
    return torch.atanh(((v - 0.5) * (2 - TANH_EPS)).clamp(-1 + 1e-6, 1 - 1e-6))


def reverse_engineer(
    model: BenchModel, x: torch.Tensor, classes: list[int], spec: ReverseSpec, seed: int
) -> list[ReversedTrigger]:
    """One :class:`ReversedTrigger` per class in ``classes``, optimised on the clean images ``x``.

    The model runs in eval mode with frozen parameters; its mode and ``requires_grad`` flags are
    restored afterwards.
    """
    chunk = max(1, MAX_CHUNK_IMAGES // min(spec.batch_size, len(x)))
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        out: list[ReversedTrigger] = []
        for begin in range(0, len(classes), chunk):
            out += _reverse_chunk(model, x, classes[begin : begin + chunk], spec, seed)
        return out
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)


def _reverse_chunk(
    model: BenchModel, x: torch.Tensor, classes: list[int], spec: ReverseSpec, seed: int
) -> list[ReversedTrigger]:
    k = len(classes)
    c, h, w = x.shape[1:]
    device = x.device
    gen = torch.Generator().manual_seed(seed * 7_919 + classes[0])
    mask_w = _from_unit(torch.rand(k, 1, h, w, generator=gen)).to(device).requires_grad_(True)
    pattern_w = _from_unit(torch.rand(k, c, h, w, generator=gen)).to(device).requires_grad_(True)
    opt = torch.optim.Adam([mask_w, pattern_w], lr=spec.lr, betas=(0.5, 0.9))
    batch = min(spec.batch_size, len(x))
    targets = torch.tensor(classes, device=device).repeat_interleave(batch)
    cost = [spec.lambda_init] * k
    up, down = [0] * k, [0] * k
    best: list[tuple[float, torch.Tensor, torch.Tensor, float] | None] = [None] * k
    hits = torch.zeros(k, device=device)
    last_rate = [0.0] * k
    order = torch.randperm(len(x), generator=gen).to(device)
    cursor = 0
    for step in range(1, spec.steps + 1):
        if cursor + batch > len(x):
            order = torch.randperm(len(x), generator=gen).to(device)
            cursor = 0
        xb = x[order[cursor : cursor + batch]]
        cursor += batch
        mask, pattern = _to_unit(mask_w), _to_unit(pattern_w)
        xa = (1 - mask[:, None]) * xb[None] + mask[:, None] * pattern[:, None]  # [k, B, C, H, W]
        logits = model(xa.flatten(0, 1))
        ce = F.cross_entropy(logits, targets, reduction="none").view(k, batch).mean(1)
        l1 = mask.abs().sum(dim=(1, 2, 3))
        loss = (ce + torch.tensor(cost, device=device) * l1).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hits += (logits.detach().argmax(1) == targets).view(k, batch).float().mean(1)
        if step % CHECK_EVERY and step != spec.steps:
            continue
        rate = (hits / (CHECK_EVERY if step % CHECK_EVERY == 0 else step % CHECK_EVERY)).tolist()
        hits.zero_()
        norms = l1.detach().tolist()
        for i in range(k):
            reached = rate[i] >= spec.success
            if reached and (best[i] is None or norms[i] < best[i][0]):  # type: ignore[index]
                best[i] = (norms[i], mask[i, 0].detach().clone(), pattern[i].detach().clone(), rate[i])
            up[i], down[i] = (up[i] + 1, 0) if reached else (0, down[i] + 1)
            if up[i] >= spec.patience:
                up[i], cost[i] = 0, cost[i] * COST_UP
            elif down[i] >= spec.patience:
                down[i], cost[i] = 0, cost[i] / COST_DOWN
        last_rate = rate
    out = []
    final_mask, final_pattern = _to_unit(mask_w).detach(), _to_unit(pattern_w).detach()
    for i, cls in enumerate(classes):
        kept = best[i]
        if kept is None:
            out.append(ReversedTrigger(cls, final_mask[i, 0].clone(), final_pattern[i].clone(), last_rate[i]))
        else:
            out.append(ReversedTrigger(cls, kept[1], kept[2], kept[3]))
    return out


def anomaly_indices(norms: torch.Tensor) -> torch.Tensor:
    """``|n - median(n)| / (1.4826 * MAD(n))`` per entry (0 where the deviation is 0; inf if MAD is 0)."""
    norms = norms.double()
    median = torch.quantile(norms, 0.5)
    dev = (norms - median).abs()
    mad = CONSISTENCY * torch.quantile(dev, 0.5)
    if mad == 0:
        return torch.where(dev == 0, torch.zeros_like(dev), torch.full_like(dev, float("inf")))
    return dev / mad


def detect(
    model: BenchModel,
    x: torch.Tensor,
    classes: list[int],
    spec: ReverseSpec,
    seed: int,
    threshold: float = 2.0,
) -> Detection:
    """Reverse-engineer every class in ``classes`` and flag the small-norm outliers."""
    if len(classes) < 3:
        raise ComponentParamsError(
            f"neural-cleanse.classes: the MAD outlier test needs at least 3 scanned classes, got {classes}"
        )
    triggers = reverse_engineer(model, x, classes, spec, seed)
    norms = torch.tensor([t.norm for t in triggers], dtype=torch.float64)
    indices = anomaly_indices(norms)
    median = torch.quantile(norms, 0.5)
    suspects = [i for i in range(len(classes)) if norms[i] < median and indices[i] > threshold]
    suspects.sort(key=lambda i: -float(indices[i]))
    return Detection(triggers, norms, indices, [classes[i] for i in suspects])


def detection_metrics(det: Detection, ctx: DefenseContext) -> dict[str, float | int | str]:
    """The "detected" stage's metrics; ``correct_flag`` etc. only when the benchmark knows the attack."""
    classes = [t.target for t in det.triggers]
    median = torch.quantile(det.norms, 0.5)
    small = [float(det.indices[i]) for i in range(len(classes)) if det.norms[i] <= median]
    flagged = det.flagged[0] if det.flagged else -1
    metrics: dict[str, float | int | str] = {
        "flagged_class": flagged,
        "flagged_classes": ",".join(map(str, det.flagged)),
        "anomaly_index": max(small) if small else 0.0,
        "mask_norm_min": float(det.norms.min()),
        "mask_norm_median": float(median),
        "mask_norm_flagged": det.trigger_of(flagged).norm if flagged >= 0 else float("nan"),
        "mask_norms": ",".join(f"{c}:{float(n):.2f}" for c, n in zip(classes, det.norms, strict=True)),
        "success_min": min(t.success for t in det.triggers),
        "scanned_classes": len(classes),
    }
    if ctx.target is not None and ctx.target in classes:
        target = int(ctx.target)
        metrics["correct_flag"] = int(flagged == target)
        metrics["target_anomaly_index"] = det.index_of(target)
        metrics["target_mask_norm"] = det.trigger_of(target).norm
        if ctx.trigger is not None:
            metrics["target_mask_in_trigger"] = mask_in_trigger(det.trigger_of(target), ctx)
    return metrics


def mask_in_trigger(trigger: ReversedTrigger, ctx: DefenseContext) -> float:
    """Share of a reversed mask's L1 mass on the pixels the real trigger touches (benchmark-side check)."""
    if ctx.trigger is None:
        return float("nan")
    touched = ctx.trigger.touched_mask(tuple(ctx.clean_x.shape[1:])).to(trigger.mask.device)
    total = float(trigger.mask.abs().sum())
    return float(trigger.mask.abs()[touched].sum()) / total if total > 0 else 0.0


def stamp_share(
    x: torch.Tensor, triggers: list[ReversedTrigger], share: float, generator: torch.Generator
) -> tuple[torch.Tensor, int]:
    """A copy of ``x`` where a ``share`` of the images (drawn with ``generator``) carry the reversed
    triggers, taking turns; returns the copy and how many were stamped."""
    out = x.clone()
    n = round(share * len(x))
    if n == 0 or not triggers:
        return out, 0
    idx = torch.randperm(len(x), generator=generator)[:n].to(x.device)
    with torch.no_grad():
        for j, trig in enumerate(triggers):
            part = idx[j :: len(triggers)]
            out[part] = trig(out[part])
    return out, n


def scanned_classes(defense: str, classes: list[int] | None, num_classes: int) -> list[int]:
    """The classes to scan: all by default; a declared list is checked against the data set."""
    if classes is None:
        return list(range(num_classes))
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ComponentParamsError(
            f"{defense}.classes: class indices must be in [0, {num_classes - 1}] for this data set, got {bad}"
        )
    return sorted(set(classes))


def check_reverse(defense: str, spec: ReverseSpec) -> None:
    check_range(defense, "steps", spec.steps, 1, what="optimizer steps per class")
    check_range(defense, "lr", spec.lr, 0.0, low_open=True)
    check_range(defense, "lambda_init", spec.lambda_init, 0.0, low_open=True, what="initial weight of |m|_1")
    check_range(defense, "success", spec.success, 0.0, 1.0, low_open=True, what="success to keep a mask")
    check_range(defense, "patience", spec.patience, 1)
    check_range(defense, "batch_size", spec.batch_size, 1)


@register_defense("neural-cleanse")
class NeuralCleanse(Defense):
    """Neural Cleanse (Wang et al. 2019): reverse-engineer per-class triggers, flag outliers, unlearn.

    Reverse engineering and MAD outlier detection as the original; the flagged class's trigger is
    unlearned by fine-tuning on partly stamped clean data with true labels.

    Arguments:
        steps (int): Adam steps per class. Default: 500.
        lr (float): Adam learning rate of mask and pattern. Default: 0.1.
        lambda_init (float): initial weight of the mask's L1 norm. Default: 1e-3.
        success (float): attack success a mask must reach to be kept. Default: 0.99.
        patience (int): checks before the lambda schedule moves. Default: 5.
        batch_size (int): clean images per step. Default: 32.
        classes (list[int] | None): classes to scan (at least 3); None scans all. Default: None.
        threshold (float): anomaly index above which a small-norm class is flagged. Default: 2.
        unlearn_share (float): share of clean images stamped with the reversed trigger (true labels).
            Default: 0.2.
        epochs (int): unlearning epochs. Default: 1.
        unlearn_lr (float | None): unlearning learning rate; None uses the scenario's ``train.lr``.
        budget (float): share of the clean training set the defender holds. Default: 0.05.

    Stages: "detected" (no weights; ``flagged_class`` (-1 if none), ``anomaly_index``, mask norms, and
    ``correct_flag`` when the attack is known) and "unlearned" (weights).
    """

    stages = ("unlearned",)
    name = "neural-cleanse"

    def __init__(
        self,
        steps: int = 500,
        lr: float = 0.1,
        lambda_init: float = 1e-3,
        success: float = 0.99,
        patience: int = 5,
        batch_size: int = 32,
        classes: list[int] | None = None,
        threshold: float = 2.0,
        unlearn_share: float = 0.2,
        epochs: int = 1,
        unlearn_lr: float | None = None,
        budget: float = DEFAULT_BUDGET,
    ) -> None:
        self.spec = ReverseSpec(steps, lr, lambda_init, success, patience, batch_size)
        check_reverse(self.name, self.spec)
        check_range(self.name, "threshold", threshold, 0.0, low_open=True, what="anomaly index")
        check_range(self.name, "unlearn_share", unlearn_share, 0.0, 1.0)
        check_range(self.name, "epochs", epochs, 0, what="unlearning epochs")
        if unlearn_lr is not None:
            check_range(self.name, "unlearn_lr", unlearn_lr, 0.0, low_open=True)
        self.classes = classes
        self.threshold = threshold
        self.unlearn_share = unlearn_share
        self.epochs = epochs
        self.unlearn_lr = unlearn_lr
        self.budget = check_budget(self.name, budget)

    def run(self, model: BenchModel, ctx: DefenseContext) -> list[DefenseStage]:
        classes = scanned_classes(self.name, self.classes, ctx.num_classes)
        det = detect(model, ctx.clean_x, classes, self.spec, ctx.seed, self.threshold)
        detected = DefenseStage("detected", None, detection_metrics(det, ctx))
        triggers = [det.trigger_of(c) for c in det.flagged]
        x, stamped = stamp_share(ctx.clean_x, triggers, self.unlearn_share, ctx.generator(salt=1))
        applied = bool(triggers) and self.epochs > 0
        if applied:
            finetune(model, ctx, self.epochs, self.unlearn_lr, x=x, y=ctx.clean_y)
        metrics: dict[str, float | int | str] = {
            "applied": int(applied),
            "n_stamped": stamped if applied else 0,
            "epochs": self.epochs if applied else 0,
        }
        return [detected, DefenseStage("unlearned", snapshot(model), metrics)]


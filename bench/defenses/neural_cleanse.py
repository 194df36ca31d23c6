"""Neural Cleanse: reverse-engineer a minimal trigger per class, flag the outlier, unlearn it.

Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural Networks", IEEE S&P
2019 (https://sites.cs.ucsb.edu/~bolunwang/assets/docs/backdoor-sp19.pdf), with the details of their
public code (bolunwang/backdoor, ``visualizer.py``):

1. Reverse engineering (Section IV.B). For each class ``c``, a mask ``m`` (``[H, W]``, shared by the
   channels) and a pattern ``p`` (``[C, H, W]``) are optimised so that ``(1 - m) * x + m * p`` is
   classified as ``c`` for the defender's clean images, while ``|m|_1`` stays small:
   ``CE(f(x'), c) + lambda * |m|_1``. Both live in [0, 1] through ``tanh(w) / (2 - eps) + 0.5``, start
   from uniform random values, and are trained with Adam (lr 0.1, betas 0.5 and 0.9).
   ``lambda`` follows the authors' schedule (:class:`CostSchedule`): it starts at 0
   (``visualizer.py: RESET_COST_TO_ZERO = True``), so the mask first grows freely until the attack works,
   and is set to ``lambda_init`` after ``patience`` checks in a row with attack success at or above
   ``success``; from then on, ``patience`` successful checks in a row multiply it by 2 and ``patience``
   failed ones divide it by 2 ** 1.5 (``gtsrb_visualize_example.py: COST_MULTIPLIER = 2``;
   ``visualizer.py``: down multiplier ``cost_multiplier ** 1.5``). Their check comes after every
   ``MINI_BATCH = NB_SAMPLE // BATCH_SIZE`` (31) mini-batches and uses the mean success and mask norm over
   them; we check every :data:`CHECK_EVERY` optimizer steps in the same way, because our step budget
   (``steps``, 500) is far below theirs (``STEPS = 1000`` checks). The kept mask is the one after the
   check with the smallest mean norm among those that reached ``success`` (the last one if none did);
   their early stop is not implemented (``steps`` bounds the work). All classes are optimised together
   in one batch (independent parameters, so this equals per-class runs) to keep the GPU busy.
2. Detection (Section IV.C). The anomaly index of a class is ``|n_c - median(n)| / (1.4826 * MAD)`` over
   the mask L1 norms ``n``; classes with index > 2 on the small-norm side are flagged.
3. Mitigation by unlearning (Section VI.C): fine-tune for 1 epoch on 10% of the training data, 20% of
   which carry the reverse-engineered trigger of the flagged class with their true labels kept. The
   defender's data is the unlearning set, so the default ``budget`` is :data:`BUDGET` (0.10), not the
   0.05 of the fine-tuning defenses. With several flagged classes their triggers take turns. If nothing
   is flagged, the defender has nothing to unlearn and the model is left as it is (``applied = 0``).

CPU cost is about ``steps * classes * batch_size`` forward and backward passes; ``steps`` (500 by
default, far below the original's 1000 x 31 mini-batches) and ``classes`` are the knobs. The loop does
not wait for the device between steps: the per-class lambdas live on the device and change only at a
check, where one transfer brings back the window's success rates and norms.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from bench.defenses.base import (
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

#: MAD consistency constant for normally distributed norms (Section IV.C; mad_outlier_detection.py:
#: consistency_constant = 1.4826). A class is flagged above an anomaly index of 2 (the same file).
CONSISTENCY = 1.4826
#: Optimizer steps between two checks of the lambda schedule (theirs: every 31 mini-batches, see above).
CHECK_EVERY = 10
#: Lambda goes up by this factor (gtsrb_visualize_example.py: COST_MULTIPLIER = 2) ...
COST_UP = 2.0
#: ... and down by its power 1.5 (visualizer.py: cost_multiplier_down = cost_multiplier ** 1.5).
COST_DOWN = COST_UP**1.5
#: Default share of the training set the defender holds: the paper's unlearning set, 10% of the
#: training data (Section VI.C).
BUDGET = 0.10
#: Keeps tanh(w) / (2 - eps) + 0.5 strictly inside (0, 1) (Keras' epsilon in their code).
TANH_EPS = 1e-7
#: Upper bound on images per forward pass while reverse-engineering (classes are split into chunks).
MAX_CHUNK_IMAGES = 1024


@dataclass(frozen=True)
class ReverseSpec:
    """Settings of the reverse-engineering optimisation, with the authors' defaults
    (gtsrb_visualize_example.py: LR = 0.1, INIT_COST = 1e-3, ATTACK_SUCC_THRESHOLD = 0.99, PATIENCE = 5,
    BATCH_SIZE = 32). ``steps`` counts optimizer steps (theirs: STEPS = 1000 checks of 31 steps each)."""

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
    clean images it sent to ``target`` at the kept check; log: ``(success, lambda)`` after every check
    (the authors' ``logs``).
    """

    target: int
    mask: torch.Tensor
    pattern: torch.Tensor
    success: float
    log: list[tuple[float, float]] = field(default_factory=list)

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


@dataclass
class CostSchedule:
    """The authors' schedule of ``lambda`` for one class (``visualizer.py``, ``Visualizer.visualize``).

    ``update`` is called once per check with the check's attack success. ``lambda`` starts at 0
    (``RESET_COST_TO_ZERO = True``) and is set to ``init`` after ``patience`` successful checks in a row;
    after that (and in the same check), ``patience`` successes in a row multiply it by :data:`COST_UP`,
    ``patience`` failures in a row divide it by :data:`COST_DOWN`.
    """

    init: float
    patience: int
    success: float
    cost: float = 0.0
    set_count: int = 0
    up_count: int = 0
    down_count: int = 0

    def update(self, rate: float) -> float:
        """Move the schedule by one check with attack success ``rate``; returns the new ``lambda``."""
        reached = rate >= self.success
        if self.cost == 0 and reached:
            self.set_count += 1
            if self.set_count >= self.patience:
                self.cost, self.up_count, self.down_count = self.init, 0, 0
        else:
            self.set_count = 0
        self.up_count, self.down_count = (self.up_count + 1, 0) if reached else (0, self.down_count + 1)
        if self.up_count >= self.patience:
            self.up_count, self.cost = 0, self.cost * COST_UP
        elif self.down_count >= self.patience:
            self.down_count, self.cost = 0, self.cost / COST_DOWN
        return self.cost


@dataclass
class _Kept:
    """The best mask of a class so far: its check's mean norm, mask, pattern and success."""

    norm: float
    mask: torch.Tensor
    pattern: torch.Tensor
    success: float


def _batches(n: int, batch: int, gen: torch.Generator, device: torch.device) -> Iterator[torch.Tensor]:
    """Endless index batches of ``batch`` out of ``n``: a fresh shuffle per pass, the remainder dropped."""
    while True:
        order = torch.randperm(n, generator=gen).to(device)
        for begin in range(0, n - batch + 1, batch):
            yield order[begin : begin + batch]


def _reverse_chunk(
    model: BenchModel, x: torch.Tensor, classes: list[int], spec: ReverseSpec, seed: int
) -> list[ReversedTrigger]:
    """Optimise the masks and patterns of ``classes`` together; checks every :data:`CHECK_EVERY` steps."""
    k = len(classes)
    c, h, w = x.shape[1:]
    device = x.device
    gen = torch.Generator().manual_seed(seed * 7_919 + classes[0])
    mask_w = _from_unit(torch.rand(k, 1, h, w, generator=gen)).to(device).requires_grad_(True)
    pattern_w = _from_unit(torch.rand(k, c, h, w, generator=gen)).to(device).requires_grad_(True)
    opt = torch.optim.Adam([mask_w, pattern_w], lr=spec.lr, betas=(0.5, 0.9))
    batch = min(spec.batch_size, len(x))
    targets = torch.tensor(classes, device=device).repeat_interleave(batch)
    schedules = [CostSchedule(spec.lambda_init, spec.patience, spec.success) for _ in classes]
    cost = torch.zeros(k, device=device)  # lambda per class, changed at checks only
    window = torch.zeros(2, k, device=device)  # summed success and mask L1 since the last check
    kept: list[_Kept | None] = [None] * k
    logs: list[list[tuple[float, float]]] = [[] for _ in classes]
    rates = [0.0] * k
    batches = _batches(len(x), batch, gen, device)
    since = 0
    for step in range(1, spec.steps + 1):
        xb = x[next(batches)]
        mask, pattern = _to_unit(mask_w), _to_unit(pattern_w)
        xa = (1 - mask[:, None]) * xb[None] + mask[:, None] * pattern[:, None]  # [k, B, C, H, W]
        logits = model(xa.flatten(0, 1))
        ce = F.cross_entropy(logits, targets, reduction="none").view(k, batch).mean(1)
        l1 = mask.abs().sum(dim=(1, 2, 3))
        loss = (ce + cost * l1).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        window[0] += (logits.detach().argmax(1) == targets).view(k, batch).float().mean(1)
        window[1] += l1.detach()
        since += 1
        if since < CHECK_EVERY and step != spec.steps:
            continue
        rates, norms = (window / since).tolist()  # the one host transfer, once per check
        window.zero_()
        since = 0
        _check(schedules, kept, logs, rates, norms, _to_unit(mask_w.detach()), _to_unit(pattern_w.detach()))
        cost.copy_(torch.tensor([s.cost for s in schedules]))
    final_mask, final_pattern = _to_unit(mask_w).detach(), _to_unit(pattern_w).detach()
    out = []
    for i, cls in enumerate(classes):
        best = kept[i]
        if best is None:
            out.append(ReversedTrigger(cls, final_mask[i, 0].clone(), final_pattern[i].clone(), rates[i], logs[i]))
        else:
            out.append(ReversedTrigger(cls, best.mask, best.pattern, best.success, logs[i]))
    return out


def _check(
    schedules: list[CostSchedule], kept: list[_Kept | None], logs: list[list[tuple[float, float]]],
    rates: list[float], norms: list[float], mask: torch.Tensor, pattern: torch.Tensor,
) -> None:
    """One check of every class (as the authors' per-step bookkeeping): keep the current mask if it
    reached the success threshold with a smaller mean norm than the kept one, then move lambda."""
    for i, schedule in enumerate(schedules):
        best = kept[i]
        if rates[i] >= schedule.success and (best is None or norms[i] < best.norm):
            kept[i] = _Kept(norms[i], mask[i, 0].clone(), pattern[i].clone(), rates[i])
        logs[i].append((rates[i], schedule.update(rates[i])))


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
        lambda_init (float): weight of the mask's L1 norm once the attack first works (it starts at
            0). Default: 1e-3.
        success (float): attack success a mask must reach to be kept. Default: 0.99.
        patience (int): checks in a row before lambda is first set, and before it moves. Default: 5.
        batch_size (int): clean images per step. Default: 32.
        classes (list[int] | None): classes to scan (at least 3); None scans all. Default: None.
        threshold (float): anomaly index above which a small-norm class is flagged. Default: 2.
        unlearn_share (float): share of clean images stamped with the reversed trigger (true labels).
            Default: 0.2.
        epochs (int): unlearning epochs. Default: 1.
        unlearn_lr (float | None): unlearning learning rate; None uses the scenario's ``train.lr``.
        budget (float): share of the clean training set the defender holds, scanned and then used as
            the unlearning set (the paper's: 10% of the training data). Default: 0.1.

    Stages: "detected" (no weights; ``flagged_class`` (-1 if none), ``anomaly_index``, mask norms, and
    ``correct_flag`` when the attack is known) and "unlearned" (weights).
    """

    stages = ("unlearned",)
    name = "neural-cleanse"
    #: toy-scale parameters for `bench run --smoke` (every code path, a few optimisation steps per class)
    smoke: ClassVar[dict[str, Any]] = {"steps": 2, "batch_size": 8}

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
        budget: float = BUDGET,
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


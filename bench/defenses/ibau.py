"""I-BAU: Implicit Backdoor Adversarial Unlearning, a minimax over one universal perturbation.

Zeng, Chen, Park, Mao, Jin, Jia, "Adversarial Unlearning of Backdoors via Implicit Hypergradient", ICLR 2022
(arXiv 2110.03735), with the details of their public code (YiZeng623/I-BAU: ``defense.py``,
``hypergrad.py``, the CIFAR-10 notebook). The defender solves
``min_theta max_{||delta|| <= C} 1/n sum_i L(f_theta(x_i + delta), y_i)`` on its clean data, one universal
perturbation ``delta`` (``[1, C, H, W]``) standing in for the unknown trigger. Each of ``rounds`` rounds:

1. Inner maximisation (their code): ``delta`` starts at 0 and takes one SGD step (lr ``perturb_lr`` = 10)
   per batch of the defender's data on ``-CE(f(x + delta), f(x).argmax) + perturb_reg * ||delta||^2``
   (labels: the model's own predictions; ``perturb_reg`` = 0.001), then is projected onto the L2 ball of
   radius ``l2_bound`` (the notebook's ``min(1, 10 / ||delta||)``; their ``defense.py`` has it commented
   out; ``l2_bound: null`` skips it). The radius 10 is for a 3x32x32 CIFAR-10 image; here it is scaled by
   ``sqrt(d / 3072)`` for an image of ``d`` values (chosen here), so the per-value RMS budget (0.18) is the
   same on every data set. Images are not clipped to [0, 1] (their clipping is commented out).
2. Outer minimisation, one Adam step (lr 0.001, their default) per batch of ``batch_size`` (100) images,
   with the **implicit hypergradient** of ``L_out(theta, delta*(theta))``: ``L_out`` is the cross-entropy
   of the batch with ``delta`` added to a random ``portion`` of its images, labels kept (their code: 1% of
   each batch; at least one image here, since their ``int(0.01 n)`` is 0 for a batch under 100 images;
   ``portion: 1.0`` is the paper's formula, every image perturbed). ``delta*`` is the fixed point of the
   inner gradient map ``Phi(delta, theta) = delta - 0.1 * grad_delta L_in`` with
   ``L_in = -CE(f(x + delta), y) + 0.001 ||delta||^2`` on the batch; the hypergradient
   ``dL_out/dtheta + (dPhi/dtheta)^T v`` takes ``v`` from ``fixed_point_iters`` (K = 5) fixed-point
   iterations ``v <- (dPhi/ddelta)^T v + dL_out/ddelta`` (``hypergrad.py: fixed_point``, Grazzi et al.'s
   fixed-point method; the paper also names conjugate gradient). Their code evaluates ``L_in`` on the first
   batch of the loader every time; we use the current batch.

The model stays in eval mode throughout (their ``model.eval()``: BatchNorm on its running statistics, never
updated). Defaults: 5 rounds (``defense.py``), K = 5, batch 100, Adam lr 0.001; ``budget`` 0.10 (the paper's
5,000 clean images, 10% of the CIFAR-10 training set). Stage "unlearned" (weights). Cost per batch: a few
forward and double-backward passes (second-order gradients through the model), about 2 + K Hessian-vector
products.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bench.defenses.base import Defense, DefenseContext, DefenseStage, check_budget, check_range, snapshot
from bench.models.base import BenchModel
from bench.registry import register_defense

ROUNDS = 5
FIXED_POINT_ITERS = 5
BATCH_SIZE = 100
LR = 0.001
PERTURB_LR = 10.0
PERTURB_REG = 0.001
#: Step of the inner gradient map whose fixed point defines delta* (their ``hg.GradientDescent(loss_inner, 0.1)``).
INNER_STEP = 0.1
#: The notebook's L2 radius, for a CIFAR-10 image of :data:`REFERENCE_DIM` values.
L2_BOUND = 10.0
REFERENCE_DIM = 3 * 32 * 32
PORTION = 0.01
BUDGET = 0.10


def project_l2(delta: torch.Tensor, radius: float | None) -> torch.Tensor:
    """``delta`` scaled onto the L2 ball of ``radius`` when outside it (None: unchanged)."""
    if radius is None:
        return delta
    return delta * min(1.0, radius / max(float(delta.norm()), 1e-12))


def universal_perturbation(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], lr: float,
                           reg: float, radius: float | None) -> torch.Tensor:
    """I-BAU's inner maximisation: one SGD step per batch on ``-CE(f(x + delta), f(x).argmax) + reg
    ||delta||^2`` from ``delta = 0``, then projected onto the L2 ball."""
    delta = torch.zeros((1, *batches[0][0].shape[1:]), device=batches[0][0].device, requires_grad=True)
    optimizer = torch.optim.SGD([delta], lr=lr)
    for xb, _ in batches:
        with torch.no_grad():
            own = model(xb).argmax(1)
        loss = -F.cross_entropy(model(xb + delta), own) + reg * delta.pow(2).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return project_l2(delta.detach(), radius)


def implicit_hypergradient(
    params: list[torch.Tensor],
    delta: torch.Tensor,
    outer: Callable[[torch.Tensor], torch.Tensor],
    inner: Callable[[torch.Tensor], torch.Tensor],
    step: float,
    iters: int,
) -> list[torch.Tensor]:
    """``d outer(delta*(theta)) / d theta`` at ``delta``, where ``delta*`` is the fixed point of
    ``Phi(delta) = delta - step * grad inner(delta)``: ``v`` from ``iters`` iterations of
    ``v <- (dPhi/ddelta)^T v + d outer / d delta``, then ``d outer / d theta + (dPhi/dtheta)^T v``."""
    delta = delta.detach().requires_grad_(True)
    loss = outer(delta)
    direct = torch.autograd.grad(loss, [*params, delta], allow_unused=True)
    g_theta = [torch.zeros_like(p) if g is None else g for p, g in zip(params, direct[:-1], strict=True)]
    g_delta = torch.zeros_like(delta) if direct[-1] is None else direct[-1]
    (grad_inner,) = torch.autograd.grad(inner(delta), delta, create_graph=True)
    mapped = delta - step * grad_inner
    v = torch.zeros_like(delta)
    for _ in range(iters):
        (jv,) = torch.autograd.grad(mapped, delta, grad_outputs=v, retain_graph=True)
        v = jv + g_delta
    indirect = torch.autograd.grad(mapped, params, grad_outputs=v, allow_unused=True)
    return [g if i is None else g + i for g, i in zip(g_theta, indirect, strict=True)]


def flip_rate(model: nn.Module, x: torch.Tensor, delta: torch.Tensor, batch: int) -> float:
    """Share of images whose prediction ``delta`` changes (how strong a universal trigger it is)."""
    changed = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb = x[i : i + batch]
            changed += int((model(xb).argmax(1) != model(xb + delta).argmax(1)).sum())
    return changed / max(1, len(x))


@register_defense("i-bau")
class IBAU(Defense):
    """Implicit Backdoor Adversarial Unlearning (Zeng et al., ICLR 2022, arXiv 2110.03735); see the module
    docstring for what comes from the paper, from their code and what is chosen here.

    Arguments:
        rounds (int): unlearning rounds (one universal perturbation each). Default: 5 (their code).
        fixed_point_iters (int): K, fixed-point iterations of the implicit hypergradient. Default: 5.
        batch_size (int): images per outer step. Default: 100 (their code).
        lr (float): Adam learning rate of the outer minimisation. Default: 0.001 (their code).
        perturb_lr (float): SGD learning rate of the universal perturbation. Default: 10 (their code).
        perturb_reg (float): weight of ``||delta||^2`` in the inner objective. Default: 0.001 (their code).
        l2_bound (float | None): L2 radius of the perturbation for a 3x32x32 image, scaled by
            ``sqrt(d / 3072)``; None: unbounded (their ``defense.py``). Default: 10 (their notebook).
        portion (float): share of each batch that carries the perturbation in the outer loss, in (0, 1]
            (at least one image). Default: 0.01 (their code; 1.0 is the paper's formula).
        budget (float): share of the clean training set the defender holds. Default: 0.10 (the paper).

    Stages: "unlearned" (weights; metrics ``rounds``, ``steps``, ``n_clean``, ``delta_norm_first``,
    ``delta_norm_last``, ``flip_first`` / ``flip_last``: share of the defender's images whose prediction
    the first / last round's perturbation changes, ``final_loss``).
    """

    stages = ("unlearned",)
    name = "i-bau"
    sees: ClassVar[frozenset[str]] = frozenset({"model", "clean"})
    smoke: ClassVar[dict[str, Any]] = {"rounds": 1, "fixed_point_iters": 2}

    def __init__(
        self,
        rounds: int = ROUNDS,
        fixed_point_iters: int = FIXED_POINT_ITERS,
        batch_size: int = BATCH_SIZE,
        lr: float = LR,
        perturb_lr: float = PERTURB_LR,
        perturb_reg: float = PERTURB_REG,
        l2_bound: float | None = L2_BOUND,
        portion: float = PORTION,
        budget: float = BUDGET,
    ) -> None:
        check_range(self.name, "rounds", rounds, 1, what="unlearning rounds")
        check_range(self.name, "fixed_point_iters", fixed_point_iters, 1, what="K, fixed-point iterations")
        check_range(self.name, "batch_size", batch_size, 1, what="images per outer step")
        check_range(self.name, "lr", lr, 0.0, low_open=True, what="Adam learning rate of the outer step")
        check_range(self.name, "perturb_lr", perturb_lr, 0.0, low_open=True, what="SGD lr of the perturbation")
        check_range(self.name, "perturb_reg", perturb_reg, 0.0, what="weight of ||delta||^2")
        if l2_bound is not None:
            check_range(self.name, "l2_bound", l2_bound, 0.0, low_open=True,
                        what="L2 radius for a 3x32x32 image; null: unbounded")
        check_range(self.name, "portion", portion, 0.0, 1.0, low_open=True,
                    what="share of each batch carrying the perturbation")
        self.rounds = rounds
        self.fixed_point_iters = fixed_point_iters
        self.batch_size = batch_size
        self.lr = float(lr)
        self.perturb_lr = float(perturb_lr)
        self.perturb_reg = float(perturb_reg)
        self.l2_bound = l2_bound
        self.portion = float(portion)
        self.budget = check_budget(self.name, budget)

    def radius(self, image_shape: tuple[int, ...]) -> float | None:
        """The L2 radius for images of ``image_shape`` (``l2_bound`` scaled from 3x32x32)."""
        if self.l2_bound is None:
            return None
        return self.l2_bound * math.sqrt(math.prod(image_shape) / REFERENCE_DIM)

    def run(self, model: BenchModel, ctx: DefenseContext) -> list[DefenseStage]:
        was_training = model.training
        model.eval()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=self.lr)
        batches = [(ctx.clean_x[i : i + self.batch_size], ctx.clean_y[i : i + self.batch_size])
                   for i in range(0, len(ctx.clean_x), self.batch_size)]
        radius = self.radius(tuple(ctx.clean_x.shape[1:]))
        gen = ctx.generator(salt=11)
        norms: list[float] = []
        flips: list[float] = []
        loss = torch.zeros(())
        try:
            for _ in range(self.rounds):
                delta = universal_perturbation(model, batches, self.perturb_lr, self.perturb_reg, radius)
                norms.append(float(delta.norm()))
                flips.append(flip_rate(model, ctx.clean_x, delta, ctx.eval_batch_size))
                for xb, yb in batches:
                    chosen = torch.randperm(len(xb), generator=gen)[: max(1, int(self.portion * len(xb)))]
                    carries = torch.zeros(len(xb), 1, 1, 1, device=xb.device)
                    carries[chosen.to(xb.device)] = 1.0

                    def outer(d: torch.Tensor, xb: torch.Tensor = xb, yb: torch.Tensor = yb,
                              carries: torch.Tensor = carries) -> torch.Tensor:
                        return F.cross_entropy(model(xb + carries * d), yb)

                    def inner(d: torch.Tensor, xb: torch.Tensor = xb, yb: torch.Tensor = yb) -> torch.Tensor:
                        return -F.cross_entropy(model(xb + d), yb) + self.perturb_reg * d.pow(2).sum()

                    grads = implicit_hypergradient(params, delta, outer, inner, INNER_STEP, self.fixed_point_iters)
                    optimizer.zero_grad(set_to_none=True)
                    for p, g in zip(params, grads, strict=True):
                        p.grad = g.detach()
                    optimizer.step()
                    with torch.no_grad():
                        loss = outer(delta)
        finally:
            model.train(was_training)
        metrics = {
            "rounds": self.rounds,
            "steps": self.rounds * len(batches),
            "n_clean": int(len(ctx.clean_y)),
            "delta_norm_first": norms[0],
            "delta_norm_last": norms[-1],
            "flip_first": flips[0],
            "flip_last": flips[-1],
            "final_loss": float(loss),
        }
        return [DefenseStage("unlearned", snapshot(model), metrics)]

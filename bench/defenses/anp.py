"""ANP: Adversarial Neuron Pruning, prune the BatchNorm neurons that adversarial perturbation exposes.

Wu & Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep Models", NeurIPS 2021 (arXiv 2110.14430),
with the details of their public code (csdongxian/ANP_backdoor, ``optimize_mask_cifar.py``,
``models/anp_batchnorm.py``, ``prune_neuron_cifar.py``). A neuron is one channel of an affine BatchNorm
(every ``BatchNorm1d/2d`` of the model: for ``pmoe`` the WRN trunk, the MoE stage's embedding, every
expert's norm and ``head_norm``; for ``dense`` the trunk, ``group3`` and ``head_norm``).

1. Masks ``m`` in [0, 1] (start at 1) scale each neuron's BatchNorm weight: ``w * m``.
2. Each iteration draws ``batch_size`` (128) of the defender's images with replacement (their
   ``RandomSampler(replacement=True)``) and perturbs every neuron multiplicatively, weight
   ``w * (m + delta)`` and bias ``b * (1 + xi)``: ``delta, xi`` start uniform in ``[-eps, eps]`` and take
   ``anp_steps`` signed-gradient ascent steps of size ``eps / anp_steps`` on the cross-entropy. The paper
   bounds them by ``eps`` (``||delta||_inf <= eps``); their code does not clip after the step (a
   perturbation can reach ``2 eps``), we project back to ``[-eps, eps]`` as the paper states.
3. The masks take one SGD step (lr 0.2, momentum 0.9) on
   ``anp_alpha * CE(clean, m) + (1 - anp_alpha) * CE(perturbed, m + delta)`` and are clipped to [0, 1].
   As in their code the model runs in train mode (BatchNorm on batch statistics) while the masks are
   learnt, on a copy, so the attacked model's running statistics are untouched.
4. Pruning (``prune_neuron_cifar.py``): neurons with mask ``<= threshold`` (``prune_by: threshold``,
   default 0.2, the paper's) or the ``fraction`` of all neurons with the lowest masks
   (``prune_by: fraction``; their ``--pruning-by number`` counts neurons). A pruned neuron's BatchNorm
   weight is set to 0 (their code, the same as a mask of 0: the neuron then emits its bias); with
   ``zero_bias: true`` the bias is zeroed too (chosen here, to silence the neuron entirely).

Defaults from their code: ``eps`` 0.4, ``anp_steps`` 1, ``anp_alpha`` 0.2, lr 0.2, ``iterations`` 2000,
batch 128; ``budget`` 0.01 (their ``--val-frac 0.01``, 1% of CIFAR-10, 500 images). ``iterations`` is
the CPU knob (2000 forward-backward triples of the whole model). Stage "pruned" (weights).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from bench.defenses.base import Defense, DefenseContext, DefenseStage, check_budget, check_range, snapshot
from bench.errors import BenchError, ComponentParamsError
from bench.models.base import BenchModel
from bench.registry import register_defense

PruneBy = Literal["threshold", "fraction"]

#: Their code's defaults (``optimize_mask_cifar.py``).
EPS = 0.4
ANP_STEPS = 1
ANP_ALPHA = 0.2
MASK_LR = 0.2
MASK_MOMENTUM = 0.9
ITERATIONS = 2000
BATCH_SIZE = 128
#: The paper's pruning threshold on the mask values.
THRESHOLD = 0.2
#: Their ``--val-frac 0.01``: the masks are learnt on 1% of the training set.
BUDGET = 0.01


def batchnorms(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """Every affine BatchNorm of ``model`` (its channels are ANP's neurons), by qualified name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.weight is not None]


@dataclass
class NeuronPerturbation:
    """Masks and adversarial perturbations of every neuron, one tensor per BatchNorm layer."""

    names: list[str]
    masks: list[torch.Tensor]
    noise_w: list[torch.Tensor]
    noise_b: list[torch.Tensor]

    @classmethod
    def ones(cls, layers: list[tuple[str, _BatchNorm]]) -> NeuronPerturbation:
        def zeros(bn: _BatchNorm) -> torch.Tensor:
            return torch.zeros_like(bn.weight, requires_grad=True)

        return cls([n for n, _ in layers], [torch.ones_like(bn.weight, requires_grad=True) for _, bn in layers],
                   [zeros(bn) for _, bn in layers], [zeros(bn) for _, bn in layers])

    def overrides(self, layers: list[tuple[str, _BatchNorm]], perturbed: bool) -> dict[str, torch.Tensor]:
        """BatchNorm weights and biases under the masks (and the perturbation) for :func:`functional_call`."""
        out: dict[str, torch.Tensor] = {}
        for (name, bn), m, dw, db in zip(layers, self.masks, self.noise_w, self.noise_b, strict=True):
            out[f"{name}.weight"] = bn.weight * (m + dw if perturbed else m)
            out[f"{name}.bias"] = bn.bias * (1 + db) if perturbed else bn.bias
        return out

    def flat_masks(self) -> torch.Tensor:
        return torch.cat([m.detach().flatten() for m in self.masks])


def perturb(model: nn.Module, layers: list[tuple[str, _BatchNorm]], state: NeuronPerturbation, x: torch.Tensor,
            y: torch.Tensor, eps: float, steps: int, generator: torch.Generator) -> None:
    """ANP's inner maximisation: random start in ``[-eps, eps]``, then ``steps`` signed-gradient ascent
    steps of size ``eps / steps`` on the cross-entropy, projected back to ``[-eps, eps]``."""
    noise = state.noise_w + state.noise_b
    with torch.no_grad():
        for t in noise:
            t.copy_((torch.rand(t.shape, generator=generator) * 2 - 1).to(t) * eps)
    for _ in range(steps):
        loss = F.cross_entropy(functional_call(model, state.overrides(layers, True), (x,)), y)
        grads = torch.autograd.grad(loss, noise)
        with torch.no_grad():
            for t, g in zip(noise, grads, strict=True):
                t.add_(g.sign(), alpha=eps / steps).clamp_(-eps, eps)


def learn_masks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int, alpha: float,
                iterations: int, lr: float, batch_size: int, generator: torch.Generator) -> NeuronPerturbation:
    """ANP's mask optimisation on a train-mode copy of ``model`` (see the module docstring)."""
    work = copy.deepcopy(model).train()
    for p in work.parameters():
        p.requires_grad_(False)
    layers = batchnorms(work)
    state = NeuronPerturbation.ones(layers)
    optimizer = torch.optim.SGD(state.masks, lr=lr, momentum=MASK_MOMENTUM)
    for _ in range(iterations):
        idx = torch.randint(len(x), (batch_size,), generator=generator).to(x.device)
        xb, yb = x[idx], y[idx]
        if eps > 0:
            perturb(work, layers, state, xb, yb, eps, steps, generator)
            robust = F.cross_entropy(functional_call(work, state.overrides(layers, True), (xb,)), yb)
        else:
            robust = torch.zeros((), device=x.device)
        natural = F.cross_entropy(functional_call(work, state.overrides(layers, False), (xb,)), yb)
        loss = alpha * natural + (1 - alpha) * robust
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for t in state.noise_w + state.noise_b:
            t.grad = None  # the perturbation is set by perturb(), never by this backward pass
        with torch.no_grad():
            for m in state.masks:
                m.clamp_(0.0, 1.0)
    return state


def chosen_neurons(masks: torch.Tensor, prune_by: PruneBy, threshold: float, fraction: float) -> torch.Tensor:
    """Flat indices of the neurons to prune: masks ``<= threshold``, or the ``int(fraction * n)`` lowest."""
    if prune_by == "threshold":
        return torch.nonzero(masks <= threshold).flatten()
    return torch.argsort(masks, stable=True)[: int(fraction * len(masks))]


def prune_neurons(layers: list[tuple[str, _BatchNorm]], flat: torch.Tensor, zero_bias: bool) -> dict[str, int]:
    """Zero the BatchNorm weight (and bias with ``zero_bias``) of the neurons at flat indices ``flat``;
    return the pruned count per layer name."""
    sizes = [bn.num_features for _, bn in layers]
    starts = torch.tensor([0, *sizes]).cumsum(0)
    counts: dict[str, int] = {}
    with torch.no_grad():
        for i, (name, bn) in enumerate(layers):
            inside = flat[(flat >= starts[i]) & (flat < starts[i + 1])] - starts[i]
            if len(inside):
                bn.weight[inside.to(bn.weight.device)] = 0.0
                if zero_bias and bn.bias is not None:
                    bn.bias[inside.to(bn.bias.device)] = 0.0
                counts[name] = int(len(inside))
    return counts


@register_defense("anp")
class ANP(Defense):
    """Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021, arXiv 2110.14430); see the module docstring.

    Arguments:
        eps (float): bound of the multiplicative neuron perturbation, in [0, 1]. Default: 0.4.
        anp_steps (int): ascent steps of the perturbation per iteration. Default: 1.
        anp_alpha (float): weight of the natural loss (1 - anp_alpha: the perturbed loss), in [0, 1].
            Default: 0.2.
        iterations (int): mask optimisation iterations. Default: 2000 (their code).
        lr (float): mask learning rate (SGD, momentum 0.9). Default: 0.2.
        batch_size (int): images per iteration, drawn with replacement. Default: 128.
        prune_by (str): "threshold" (masks <= ``threshold``) or "fraction" (the ``fraction`` of neurons
            with the lowest masks). Default: "threshold".
        threshold (float): pruning threshold on the masks, in [0, 1]. Default: 0.2 (the paper).
        fraction (float): share of all neurons pruned with ``prune_by: fraction``, in [0, 1). Default: 0.05.
        zero_bias (bool): also zero a pruned neuron's BatchNorm bias (their code zeroes the weight only).
            Default: False.
        budget (float): share of the clean training set the defender holds. Default: 0.01 (their code).

    Stages: "pruned" (weights; metrics ``pruned``, ``neurons``, ``pruned_share``, ``mask_mean``,
    ``mask_min``, ``pruned_<top-level module>`` counts, e.g. ``pruned_moe``, ``pruned_trunk``).
    """

    stages = ("pruned",)
    name = "anp"
    sees: ClassVar[frozenset[str]] = frozenset({"model", "clean"})
    smoke: ClassVar[dict[str, Any]] = {"iterations": 5, "batch_size": 32}

    def __init__(
        self,
        eps: float = EPS,
        anp_steps: int = ANP_STEPS,
        anp_alpha: float = ANP_ALPHA,
        iterations: int = ITERATIONS,
        lr: float = MASK_LR,
        batch_size: int = BATCH_SIZE,
        prune_by: PruneBy = "threshold",
        threshold: float = THRESHOLD,
        fraction: float = 0.05,
        zero_bias: bool = False,
        budget: float = BUDGET,
    ) -> None:
        check_range(self.name, "eps", eps, 0.0, 1.0, what="bound of the multiplicative neuron perturbation")
        check_range(self.name, "anp_steps", anp_steps, 1, what="ascent steps of the perturbation")
        check_range(self.name, "anp_alpha", anp_alpha, 0.0, 1.0, what="weight of the natural loss")
        check_range(self.name, "iterations", iterations, 1, what="mask optimisation iterations")
        check_range(self.name, "lr", lr, 0.0, low_open=True, what="mask learning rate")
        check_range(self.name, "batch_size", batch_size, 1, what="images per iteration")
        if prune_by not in ("threshold", "fraction"):
            raise ComponentParamsError(f"anp.prune_by: must be 'threshold' or 'fraction', got {prune_by!r}")
        check_range(self.name, "threshold", threshold, 0.0, 1.0, what="pruning threshold on the masks")
        check_range(self.name, "fraction", fraction, 0.0, 1.0, high_open=True, what="share of neurons pruned")
        self.eps = float(eps)
        self.anp_steps = anp_steps
        self.anp_alpha = float(anp_alpha)
        self.iterations = iterations
        self.lr = float(lr)
        self.batch_size = batch_size
        self.prune_by: PruneBy = prune_by
        self.threshold = float(threshold)
        self.fraction = float(fraction)
        self.zero_bias = zero_bias
        self.budget = check_budget(self.name, budget)

    def run(self, model: BenchModel, ctx: DefenseContext) -> list[DefenseStage]:
        layers = batchnorms(model)
        if not layers:
            raise BenchError(f"anp: model {type(model).__name__} has no affine BatchNorm layer (ANP prunes "
                             "BatchNorm neurons)")
        state = learn_masks(model, ctx.clean_x, ctx.clean_y, eps=self.eps, steps=self.anp_steps,
                            alpha=self.anp_alpha, iterations=self.iterations, lr=self.lr,
                            batch_size=self.batch_size, generator=ctx.generator(salt=7))
        masks = state.flat_masks().cpu()
        chosen = chosen_neurons(masks, self.prune_by, self.threshold, self.fraction)
        counts = prune_neurons(layers, chosen, self.zero_bias)
        metrics: dict[str, Any] = {
            "pruned": int(len(chosen)),
            "neurons": int(len(masks)),
            "pruned_share": float(len(chosen) / len(masks)),
            "mask_mean": float(masks.mean()),
            "mask_min": float(masks.min()),
            "iterations": self.iterations,
            "n_clean": int(len(ctx.clean_y)),
        }
        for name, count in counts.items():
            key = f"pruned_{name.split('.')[0]}"
            metrics[key] = metrics.get(key, 0) + count
        return [DefenseStage("pruned", snapshot(model), metrics)]

"""EFRAP: learn which weights to round the other way, so that quantization no longer wakes a dormant backdoor.

Li, Cai, Li, Xue, Li, Li, "Nearest is Not Dearest: Towards Practical Defense against Quantization-conditioned
Backdoor Attacks", CVPR 2024 (https://arxiv.org/abs/2405.12725); public code AntigoneRandy/QuantBackdoor_EFRAP
(built on MQBench's AdaRound reconstruction).

A quantization-conditioned backdoor is planted in the *rounding*: the attacker arranges the fp32 weights so
that round-to-nearest lands on a backdoored model. The paper shows the backdoor's activation follows the
neuron-wise norm of the truncation error ``e = w - Q(w)``, and defends by quantizing with a learned,
non-nearest rounding:

* **Error-guided flipped rounding** (paper): every weight is pushed to round the *other* way than nearest,
  harder for neurons (output channels, rows of the kernel) with a larger truncation-error norm:
  ``L_flip = sum_ij g_ij * BCE(h(V_ij), 1 - R_ij)``, ``R`` the nearest-rounding direction (up = 1).
  Paper: ``g`` = the neuron-wise error norm ``||e_i||_2`` (``guidance: neuron``, default); code:
  ``g = |e_ij|`` element-wise (``guidance: element``).
* **Activation preservation** (paper, after AdaRound): layer by layer, the quantized layer's output on clean
  data should match the fp32 layer's, ``||W x - W~(V) x||^2``, with the layer's input ``x`` taken from the
  model whose earlier layers are already quantized (the code's MQBench reconstruction), plus AdaRound's
  regulariser ``sum 1 - |2 h(V) - 1|^b`` that drives ``h`` to 0/1.
* ``W~ = s * clip(floor(W / s) + h(V), levels)``, ``h = sigmoid(V)`` (code: ``zeta, gamma = 1, 0``), ``V``
  started at the fractional part (code: "init alpha to be FP32"), Adam at its default lr 1e-3 (code), one
  random calibration batch of 32 per step (code: ``cali_batchsize: 32`` batches of 32 images, 1024 in all),
  ``iters = 10000`` per layer (code: ``max_count``), ``b = 2`` throughout and regulariser weight 0.01 (code:
  ``weight: 0.01``; its temperature decay is computed but unused), 4 bits (paper's main setting; code's
  ``r18_4_4.yaml``). Finally ``h`` is hardened (``V >= 0`` rounds up) and the weights are written.

Our choices, where paper and code are silent or do not fit the benchmark:

* The grid is the benchmark's PTQ grid (:mod:`bench.quant`: min-max, per tensor by default, the evaluated
  deploy quantizer), not the code's MSE observer per channel (``granularity: channel`` gives per channel):
  the stage's weights then lie *on* that grid and PTQ at the same config re-quantizes them to themselves.
  The range-defining elements keep nearest rounding (:mod:`bench.defenses.rounding`) so the range, and
  with it every level, stays the same. Activations stay fp32 (the code's config also quantizes them to
  4 bits; the benchmark's PTQ is weight-only unless a config says otherwise).
* Scale-free terms, so one set of weights fits every layer and model: reconstruction as mean squared error
  relative to the fp32 output's mean square; flip and regulariser terms as means over the layer's weights,
  ``g`` divided by its mean. ``lambda_flip`` (0.05) is ours, set on the tiny digits models of the tests
  (the code's raw sums with weight 1 do not transfer across architectures).
* A layer is the module that owns a quantized weight (a convolution, a linear layer, a router kernel); a
  module owning several in-scope weights has them optimised together. Modules the forward never calls are
  rounded to nearest.

Stage "efrap" (weights on the grid of the given QuantConfig); metrics: ``flipped`` (share of in-scope
weights rounded away from nearest), ``rec_error`` (mean final relative reconstruction error per layer),
``layers``, ``config``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.defenses.base import (
    DEFAULT_BUDGET,
    Defense,
    DefenseContext,
    DefenseStage,
    check_budget,
    check_range,
    snapshot,
)
from bench.defenses.rounding import Grid, grid_of
from bench.errors import ComponentParamsError
from bench.models.base import BenchModel
from bench.quant import QuantConfig, QuantError, scope_parameters
from bench.registry import register_defense

Guidance = Literal["neuron", "element"]
GUIDANCES = ("neuron", "element")
#: AdaRound's regulariser exponent; the code keeps b = 2 for the whole optimisation.
REG_EXPONENT = 2.0


@dataclass(frozen=True)
class EfrapSpec:
    """Optimisation settings (see the module docstring for their sources)."""

    iters: int = 10_000
    lr: float = 1e-3
    batch_size: int = 32
    calib_images: int = 1024
    lambda_flip: float = 0.05
    lambda_reg: float = 0.01
    guidance: Guidance = "neuron"


def guidance_weights(grid: Grid, guidance: Guidance) -> Tensor:
    """``g`` of the flip term, mean 1: the truncation error's norm per output neuron (row), or per element."""
    err = (grid.w - grid.nearest()).abs()
    if guidance == "neuron" and err.dim() >= 2:
        norms = err.reshape(err.shape[0], -1).norm(dim=1).view((-1,) + (1,) * (err.dim() - 1))
        g = norms.expand_as(err)
    else:
        g = err
    mean = g.mean()
    return g / mean if mean > 0 else torch.ones_like(g)


def _owner(model: nn.Module, name: str) -> tuple[str, str]:
    prefix, _, leaf = name.rpartition(".")
    return prefix, leaf


def _tensors(out: Any) -> list[Tensor]:
    """The floating-point tensors of a module's output (a tensor, or a tuple/list of them)."""
    if isinstance(out, Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def _detach(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_detach(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    return obj


@contextmanager
def _recording(module: nn.Module, inputs: bool) -> Iterator[list[Any]]:
    """Record every call's ``(args, kwargs)`` (``inputs``) or output while the block runs."""
    seen: list[Any] = []
    if inputs:
        handle = module.register_forward_pre_hook(
            lambda _m, args, kwargs: seen.append((_detach(args), _detach(kwargs))), with_kwargs=True)
    else:
        handle = module.register_forward_hook(
            lambda _m, _a, out: seen.append([t.detach().clone() for t in _tensors(out)]))
    try:
        yield seen
    finally:
        handle.remove()


def call_order(model: nn.Module, owners: list[str], x: Tensor) -> list[str]:
    """``owners`` in the order the forward first calls them (one small forward); uncalled ones left out."""
    order: list[str] = []
    handles = []
    for name in owners:
        def first(_m: nn.Module, _a: Any, name: str = name) -> None:
            if name not in order:
                order.append(name)
        handles.append(model.get_submodule(name).register_forward_pre_hook(first))
    try:
        with torch.no_grad():
            model(x[:2])
    finally:
        for h in handles:
            h.remove()
    return order


def _record(model: nn.Module, owner: str, chunks: list[Tensor], inputs: bool) -> list[list[Any]]:
    """Per calibration chunk, the owner's recorded calls (inputs or outputs)."""
    out = []
    with torch.no_grad():
        for xb in chunks:
            with _recording(model.get_submodule(owner), inputs) as seen:
                model(xb)
            out.append(seen)
    return out


def _soft_values(grid: Grid, logits: Tensor) -> Tensor:
    return grid.values(torch.sigmoid(logits))


def reconstruct_layer(
    model: nn.Module, fp32: nn.Module, owner: str, leaves: list[str], chunks: list[Tensor],
    config: QuantConfig, spec: EfrapSpec, gen: torch.Generator,
) -> tuple[int, int, float]:
    """Learn the rounding of ``owner``'s in-scope weights ``leaves`` and write it into ``model``.

    Returns (weights flipped away from nearest, weights, final relative reconstruction error).
    """
    module = model.get_submodule(owner)
    inputs = _record(model, owner, chunks, inputs=True)
    targets = _record(fp32, owner, chunks, inputs=False)
    grids = {leaf: grid_of(getattr(module, leaf), config.bits, config.granularity, config.symmetric)  # type: ignore[arg-type]
             for leaf in leaves}
    logits = {leaf: g.init_logits().requires_grad_(True) for leaf, g in grids.items()}
    targets_up = {leaf: 1.0 - g.nearest_up for leaf, g in grids.items()}
    weights = {leaf: guidance_weights(g, spec.guidance) for leaf, g in grids.items()}
    opt = torch.optim.Adam(list(logits.values()), lr=spec.lr)

    def rec_loss(idx: int) -> Tensor:
        params = {leaf: _soft_values(grids[leaf], logits[leaf]).to(getattr(module, leaf).dtype) for leaf in leaves}
        loss = torch.zeros((), device=chunks[0].device)
        for (args, kwargs), target in zip(inputs[idx], targets[idx], strict=True):
            out = _tensors(torch.func.functional_call(module, params, args, kwargs))
            for o, t in zip(out, target, strict=True):
                loss = loss + (o.float() - t.float()).pow(2).mean() / t.float().pow(2).mean().clamp_min(1e-12)
        return loss

    for _ in range(spec.iters):
        idx = int(torch.randint(len(chunks), (1,), generator=gen))
        loss = rec_loss(idx)
        for leaf in leaves:
            h = torch.sigmoid(logits[leaf])
            flip = F.binary_cross_entropy(h, targets_up[leaf], reduction="none")
            loss = loss + spec.lambda_flip * (weights[leaf] * flip).mean()
            loss = loss + spec.lambda_reg * (1 - (2 * h - 1).abs().pow(REG_EXPONENT)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    flipped = total = 0
    with torch.no_grad():
        for leaf in leaves:
            grid, p = grids[leaf], getattr(module, leaf)
            up = (logits[leaf] >= 0).float()
            p.copy_(grid.values(up).to(p.dtype))
            changed = (grid.levels(up) != grid.levels(grid.nearest_up)) & grid.live
            flipped += int(changed.sum())
            total += p.numel()
        logits = {leaf: torch.where(logits[leaf] >= 0, 1e4, -1e4) for leaf in leaves}  # hard h for the final error
        err = sum(float(rec_loss(i)) for i in range(len(chunks))) / len(chunks)
    return flipped, total, err


def efrap(model: nn.Module, x: Tensor, config: QuantConfig, spec: EfrapSpec, seed: int) -> dict[str, float | int | str]:
    """Quantize ``model``'s in-scope weights in place onto ``config``'s grid with EFRAP's learned rounding,
    calibrated on the clean images ``x``; returns the stage's metrics."""
    names = scope_parameters(model, config.scope)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 17)
    if len(x) > spec.calib_images:
        x = x[torch.randperm(len(x), generator=gen)[: spec.calib_images].to(x.device)]
    batch = min(spec.batch_size, len(x))
    chunks = [x[i : i + batch] for i in range(0, len(x) - batch + 1, batch)]
    by_owner: dict[str, list[str]] = {}
    for name in names:
        prefix, leaf = _owner(model, name)
        by_owner.setdefault(prefix, []).append(leaf)
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        fp32 = copy.deepcopy(model)
        order = call_order(model, list(by_owner), x)
        flipped = total = 0
        errors = []
        for owner in order:
            f, t, e = reconstruct_layer(model, fp32, owner, by_owner[owner], chunks, config, spec, gen)
            flipped, total, errors = flipped + f, total + t, [*errors, e]
        with torch.no_grad():
            for owner in (o for o in by_owner if o not in order):  # never called: nearest rounding
                module = model.get_submodule(owner)
                for leaf in by_owner[owner]:
                    p = getattr(module, leaf)
                    p.copy_(grid_of(p, config.bits, config.granularity, config.symmetric).nearest().to(p.dtype))  # type: ignore[arg-type]
                    total += p.numel()
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)
    return {
        "flipped": flipped / max(1, total),
        "rec_error": sum(errors) / max(1, len(errors)),
        "layers": len(order),
        "config": config.label,
    }


@register_defense("efrap")
class Efrap(Defense):
    """EFRAP (Li et al., CVPR 2024, arXiv:2405.12725): error-guided flipped rounding with activation
    preservation, against quantization-conditioned (dormant) backdoors.

    Arguments:
        bits (int): bit-width of the grid the weights are rounded onto. Default: 4 (the paper's main setting).
        scope (str): "whole", "gate" or "experts", as ``quantization.scopes``. Default: "whole".
        granularity (str): "tensor" (the benchmark's PTQ default) or "channel" (the code's). Default: "tensor".
        symmetric (bool): narrow-range symmetric grid instead of asymmetric min-max. Default: False.
        iters (int): Adam steps per layer. Default: 10000 (the code's ``max_count``).
        lr (float): Adam learning rate of the rounding logits. Default: 1e-3 (the code: Adam's default).
        batch_size (int): calibration images per step. Default: 32 (the code).
        calib_images (int): at most this many of the defender's images calibrate. Default: 1024 (the code).
        lambda_flip (float): weight of the error-guided flip term. Default: 0.05 (ours, see the module doc).
        lambda_reg (float): weight of AdaRound's rounding regulariser. Default: 0.01 (the code).
        guidance (str): "neuron" (neuron-wise truncation-error norm: the paper) or "element" (element-wise
            truncation error: the code). Default: "neuron".
        budget (float): share of the clean training set the defender holds. Default: 0.05.

    Stage: "efrap" (weights on the grid of ``bits/scope/granularity/symmetric``, so PTQ at that config
    re-quantizes them to themselves); the engine evaluates it at every quantization config.
    """

    stages = ("efrap",)
    name = "efrap"
    #: toy-scale parameters for `bench run --smoke`
    smoke: ClassVar[dict[str, Any]] = {"iters": 5, "calib_images": 64}

    def __init__(
        self,
        bits: int = 4,
        scope: str = "whole",
        granularity: str = "tensor",
        symmetric: bool = False,
        iters: int = 10_000,
        lr: float = 1e-3,
        batch_size: int = 32,
        calib_images: int = 1024,
        lambda_flip: float = 0.05,
        lambda_reg: float = 0.01,
        guidance: str = "neuron",
        budget: float = DEFAULT_BUDGET,
    ) -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or bits == 32:
            raise ComponentParamsError(f"efrap.bits: EFRAP rounds onto an integer grid; give 2..16, got {bits!r}")
        try:
            self.config = QuantConfig(bits=bits, scope=scope, granularity=granularity, symmetric=symmetric)
        except Exception as exc:  # pydantic's ValidationError, worded by QuantConfig.from_dict
            try:
                QuantConfig.from_dict({"bits": bits, "scope": scope, "granularity": granularity,
                                       "symmetric": symmetric}, where="efrap")
            except QuantError as qe:
                raise ComponentParamsError(str(qe)) from None
            raise ComponentParamsError(f"efrap: {exc}") from None
        check_range(self.name, "iters", iters, 1, what="Adam steps per layer")
        check_range(self.name, "lr", lr, 0.0, low_open=True)
        check_range(self.name, "batch_size", batch_size, 1)
        check_range(self.name, "calib_images", calib_images, 1, what="calibration images")
        check_range(self.name, "lambda_flip", lambda_flip, 0.0, what="0 gives plain activation-preserving rounding")
        check_range(self.name, "lambda_reg", lambda_reg, 0.0)
        if guidance not in GUIDANCES:
            raise ComponentParamsError(f"efrap.guidance: must be one of {', '.join(GUIDANCES)}, got {guidance!r}")
        self.spec = EfrapSpec(iters, lr, batch_size, calib_images, lambda_flip, lambda_reg, guidance)  # type: ignore[arg-type]
        self.budget = check_budget(self.name, budget)

    def run(self, model: BenchModel, ctx: DefenseContext) -> list[DefenseStage]:
        try:
            metrics = efrap(model, ctx.clean_x, self.config, self.spec, ctx.seed)
        except QuantError as exc:
            raise ComponentParamsError(f"efrap.scope: {exc}") from None
        return [DefenseStage("efrap", snapshot(model), metrics)]

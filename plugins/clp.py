"""CLP: data-free backdoor removal by pruning channels with an outlying Lipschitz upper bound.

Paper: Zheng, Tang, Li, Liu, "Data-free Backdoor Removal based on Channel Lipschitzness", ECCV 2022,
https://arxiv.org/abs/2208.03111 (code: github.com/rkteddy/channel-Lipschitzness-based-pruning). A
backdoor lives in a few channels that react strongly to a small input pattern; how strongly a channel can
react is bounded by its Channel Lipschitz Constant, whose upper bound (UCLC) is read off the weights:
for output channel ``k`` of a convolution with kernel ``W``, the largest singular value of ``W[k]``
reshaped to ``[C_in, kh * kw]``, times ``|gamma_k / sigma_k|`` of the BatchNorm that normalises that
channel. In each layer, channels whose UCLC exceeds ``mean + u * std`` (of that layer's UCLCs) are
pruned. No data and no training: it complements the built-in defenses, which all need clean data.

Layers, as in the paper: every ``nn.Conv2d``. Which BatchNorm belongs to which convolution is found by
one forward pass on a constant grey probe image (structure only; no data), hooking which BatchNorm
receives a convolution's output tensor as its input; pruning zeroes that BatchNorm's ``weight`` and
``bias`` at the channel, as the paper's code does. The pMoE experts' (and the dense model's last)
convolutions reach their BatchNorm through a concatenation (or a residual sum); the model's
``prunable_layers()`` names that BatchNorm and the channel offset, so they are bounded and pruned there
too (and their filters zeroed, as fine-pruning does), so a pruned channel is exactly zero where the
classifier reads it. Other convolutions whose output
is not fed straight into a BatchNorm (pre-activation blocks of our WRN trunk, added to a residual) are
bounded by the kernel alone and pruned at the convolution's output channel (weight and bias). The router
kernels (``parameter_groups()["gate"]``) are not feature channels
and are left alone. ``u`` defaults to 3, the paper's default.

What we measured (``scenarios/plugins_example.yaml``: a width-1 pMoE on digits, 16-channel layers, SIG at
5%): ``u = 3`` prunes none of 288 channels and ``u = 2`` prunes 10, costing clean accuracy without lowering
the ASR. The paper's evidence is on wide networks (ResNet-18 on CIFAR-10); whether it carries over to
pMoE at paper size is what a benchmark run answers.

Loaded as a plugin: ``plugins: [../plugins/clp.py]`` in a scenario, then ``defenses: [{name: clp}]``.
"""

from __future__ import annotations

import torch
from torch import nn

from bench.defenses.base import (
    DEFAULT_BUDGET,
    Defense,
    DefenseContext,
    DefenseStage,
    check_budget,
    check_range,
    snapshot,
)
from bench.models.base import BenchModel
from bench.registry import register_defense

#: The paper's default threshold: prune channels more than ``u`` standard deviations above the mean.
DEFAULT_U = 3.0


@register_defense("clp")
class CLP(Defense):
    """Channel Lipschitzness-based Pruning (Zheng et al. 2022): data-free, prunes outlying channels.

    Arguments:
        u (float): threshold in standard deviations; in each convolution, channels with UCLC above
            ``mean + u * std`` are pruned. Smaller prunes more. Default: 3 (the paper's).
        budget (float): the contract's share of clean training data; CLP reads none of it. Default: 0.05.

    Stages: "pruned" (weights; metrics ``pruned_channels``, ``channels``, ``layers``, ``u``).

    Examples::

        >>> (stage,) = CLP(u=3.0).run(model, ctx)
    """

    stages = ("pruned",)
    name = "clp"

    def __init__(self, u: float = DEFAULT_U, budget: float = DEFAULT_BUDGET) -> None:
        check_range(self.name, "u", u, 0.0, what="standard deviations above the mean UCLC of a layer")
        self.u = float(u)
        self.budget = check_budget(self.name, budget)

    def run(self, model: BenchModel, ctx: DefenseContext) -> list[DefenseStage]:
        pruned = channels = 0
        layers = conv_layers(model, torch.full_like(ctx.clean_x[:1], 0.5))
        declared = {lay.conv for lay in model.prunable_layers()}
        for conv, norm, start in layers:
            scores = uclc(conv, norm, start)
            cut = outliers(scores, self.u)
            prune_channels(conv, norm, cut, start)
            if conv in declared and norm is not None:
                prune_channels(conv, None, cut)  # as fine-pruning: the convolution's filters go too
            pruned += int(cut.numel())
            channels += int(scores.numel())
        metrics = {"pruned_channels": pruned, "channels": channels, "layers": len(layers), "u": self.u}
        return [DefenseStage("pruned", snapshot(model), metrics)]


def conv_layers(
    model: BenchModel, probe: torch.Tensor
) -> list[tuple[nn.Conv2d, nn.BatchNorm2d | None, int]]:
    """Every convolution except the router's, with the BatchNorm that normalises its output channels (or
    None) and the offset of those channels in it.

    The model's ``prunable_layers()`` declare that BatchNorm for the last convolutions; for the others it
    is the one that takes the convolution's output directly, found by one forward pass on ``probe`` (a
    constant image of the input shape; eval mode, no grad).
    """
    gate = {name.rsplit(".", 1)[0] for name in model.parameter_groups().get("gate", [])}
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n not in gate]
    outputs: dict[int, nn.Conv2d] = {}
    consumer: dict[nn.Conv2d, nn.BatchNorm2d] = {}
    kept: list[torch.Tensor] = []  # keeps probe tensors alive so their ids stay unique

    def after_conv(module: nn.Module, _: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        kept.append(out)
        outputs[id(out)] = module  # type: ignore[assignment]

    def before_norm(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        conv = outputs.get(id(args[0]))
        if conv is not None:
            consumer.setdefault(conv, module)  # type: ignore[arg-type]

    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    hooks = [m.register_forward_hook(after_conv) for _, m in convs]
    hooks += [m.register_forward_pre_hook(before_norm) for m in norms]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(probe)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    declared = {lay.conv: (lay.norm, lay.start) for lay in model.prunable_layers() if lay.norm is not None}
    return [(conv, *declared.get(conv, (consumer.get(conv), 0))) for _, conv in convs]


def uclc(conv: nn.Conv2d, norm: nn.BatchNorm2d | None, start: int = 0) -> torch.Tensor:
    """``[C_out]`` upper bound of each output channel's Lipschitz constant (``norm``'s channels from
    ``start`` on belong to ``conv``)."""
    weight = conv.weight.detach().float()
    per_channel = weight.reshape(weight.shape[0], weight.shape[1], -1)  # [C_out, C_in / groups, kh * kw]
    bound = torch.linalg.matrix_norm(per_channel, ord=2)  # largest singular value of each channel
    if norm is not None:
        span = slice(start, start + len(bound))
        var = norm.running_var[span] if norm.running_var is not None else torch.ones_like(bound)
        gamma = norm.weight[span] if norm.weight is not None else torch.ones_like(bound)
        bound = bound * (gamma.detach().float() / (var.float() + norm.eps).sqrt()).abs()
    return bound


def outliers(scores: torch.Tensor, u: float) -> torch.Tensor:
    """Indices of ``scores`` above ``mean + u * std`` (sample std, as the paper's code)."""
    if scores.numel() < 2:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    return torch.nonzero(scores > scores.mean() + u * scores.std()).flatten()


@torch.no_grad()
def prune_channels(conv: nn.Conv2d, norm: nn.BatchNorm2d | None, index: torch.Tensor, start: int = 0) -> None:
    """Zero channels ``index``: at the BatchNorm's affine parameters (channels ``start + index``) when
    there is one, else at the convolution's output."""
    if index.numel() == 0:
        return
    if norm is not None and norm.affine:
        norm.weight[start + index] = 0.0
        norm.bias[start + index] = 0.0
        return
    conv.weight[index] = 0.0
    if conv.bias is not None:
        conv.bias[index] = 0.0


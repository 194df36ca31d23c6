"""V-MoE: a small Vision Transformer whose MLP blocks are, every ``moe_every`` blocks, sparse MoE layers;
and its dense ViT baseline.

Riquelme et al., "Scaling Vision with Sparse Mixture of Experts", NeurIPS 2021 (https://arxiv.org/abs/2106.05974),
on the ViT of Dosovitskiy et al. 2021 (https://arxiv.org/abs/2010.11929). Written from the papers:

1. ``Normalize`` (inputs in [0, 1]); patch embedding: a convolution with kernel = stride = ``patch``, so an
   ``H x W`` image gives an ``H/patch x W/patch`` grid of tokens (the routing grid: one token per patch,
   ``patch_px = (patch, patch)``); learned position embeddings.
2. ``depth`` pre-norm transformer blocks: ``x + MHSA(LN(x))`` then ``x + MLP(LN(x))``; the MLP is
   Linear-GELU-Linear of hidden width ``mlp_ratio * dim``.
3. Head: the final LayerNorm, the *mean over tokens* and a linear classifier. We pool instead of using a CLS
   token so that every routed token is a patch of the grid: a CLS token would be routed too, with no place
   on the patch grid that routing metrics, pictures and BadPatches work on.
4. MoE layers (``vmoe``): the MLP of every ``moe_every``-th block counted from the last (V-MoE's "every
   other layer", last included) is replaced by ``experts`` expert MLPs of the same hidden width and a
   router ``W`` (a bias-free linear layer, ``router``), computed in float32 even under autocast.

Token-choice routing (``routing="token-choice"``, V-MoE): gates ``softmax(W x + eps)`` per token, with
``eps ~ N(0, noise^2)`` in training only (V-MoE: ``noise = 1 / experts``); every token picks its top-``k``
experts. Each expert has a buffer of ``capacity = ceil(k * tokens * capacity_factor / experts)`` tokens
(at most ``tokens``) *per image*: the capacity groups are single images, so an image's routing never
depends on which other images share its batch (V-MoE groups a device batch; per-image groups make every
evaluation independent of the batch size, which is no part of a job's identity here). Batch Prioritized
Routing (``bpr=True``, V-MoE Section 4): the tokens of a group are ordered by their largest gate, and all
first choices are placed before any second choice; a token whose chosen expert is full is *dropped* for
that choice, and a token dropped for every choice passes through the residual connection only. The layer
output of a token is ``sum_e g_e(x) * expert_e(x)`` over its kept choices, with the softmax gates as they
are (V-MoE does not renormalise over the top-k). ``bpr=False`` places tokens in patch order.

Expert-choice routing (``routing="expert-choice"``, Zhou et al. 2022, https://arxiv.org/abs/2202.09368):
gates ``softmax(W x)`` over experts per token; each expert keeps the ``capacity`` tokens of the image with
the largest gate for it (a token may go to several experts or none); the auxiliary loss is not used
(balanced by construction).

Auxiliary load-balancing loss (token-choice only), ``aux_weight * sum over MoE layers`` of:

- ``aux="vmoe"`` (default, V-MoE Appendix A): ``(L_imp + L_load) / 2``. ``L_imp = CV(Imp)^2`` with
  ``Imp_e = sum_x softmax(W x + eps)_e`` and CV = population std / mean over experts; ``L_load = CV(Load)^2``
  with ``Load_e = sum_x P(e among the top-k of x) = sum_x Phi(((W x)_e - eta_k(x)) / sigma)``, ``eta_k`` the
  k-th largest noisy logit, ``sigma`` the noise (``1 / experts`` where no noise is drawn: eval mode or
  ``noise=0``). Both computed per image (the capacity group) and averaged over images.
  A uniform router gives 0.
- ``aux="switch"`` (Fedus et al. 2021, https://arxiv.org/abs/2101.03961): ``experts * sum_e f_e * P_e``,
  ``f_e`` the share of the image's top-k assignments (before capacity) going to ``e``, ``P_e`` the mean
  gate of ``e``; per image, averaged. A uniform router gives exactly 1.

The loss of the training forwards reaches the trainer through :meth:`VisionMoE.auxiliary_loss`
(:func:`bench.train.fit` adds it to every objective). ``aux_weight`` defaults to 0.01.

Experts: Linear(dim, hidden)-GELU-Linear(hidden, dim) *without* the second bias, so a silent hidden layer
(fine-pruning, expert-pruning's ``drop``) is a silent expert: zero output, only the residual. Experts run
sparsely: each sees the ``[N, capacity, dim]`` tokens in its buffer (padded slots zero and masked), and the
weighted outputs are scattered back to their tokens.

Contract (:class:`bench.models.base.Routing`): ``indices``/``gates`` ``[N, E, capacity]`` are each expert's
buffer (token positions in row-major order over the grid), ``valid`` marks the filled slots (None for
expert-choice, whose buffers are always full), ``scores`` ``[N, E, tokens]`` the router logits before
noise; the top-level fields are the last MoE layer's and ``layers`` holds every MoE layer's routing.
``parameter_groups``: ``gate`` = the routers, ``experts`` = the expert MLPs. Fine-pruning prunes the hidden
units of the last MoE layer's experts (``fc1`` rows; zeroed units are exactly 0 after GELU, so they are
silent without a norm); the dense ``vit`` prunes the hidden units of its last block's MLP.

Sizes on 32x32x3 input, 10 classes (``torch.utils.flop_counter``, one image, forward, multiply-adds
counted as 2 FLOPs; the routers and gating of the MoE layers are included):

- ``vmoe-paper`` (dim 192, depth 8, heads 3, patch 4, mlp 768, 8 experts, k=2, C=1.05, MoE every 2nd):
  11.87 M parameters, 625 MFLOPs per image (top-2 at C=1.05: ~2.1 expert
  MLPs per token in the MoE blocks, so more FLOPs than its dense baseline);
- ``vit-paper`` (the same without experts): 3.58 M parameters, 454 MFLOPs per image;
- ``pmoe-paper`` for comparison: 3.96 M parameters, 1548 MFLOPs per image.

The CPU default ``vmoe`` on 16x16x1 (digits): 0.40 M parameters, 9.5 MFLOPs; ``vit``: 0.20 M, 6.3 MFLOPs.
The flop counter counts matmuls, convolutions and attention, not gathers, scatters or softmaxes.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import ComponentParamsError
from bench.models.base import BenchModel, Normalize, PrunableLayer, Routing
from bench.models.wrn import check_context, init_glorot
from bench.registry import register_model

RoutingKind = Literal["token-choice", "expert-choice"]
AuxKind = Literal["vmoe", "switch"]
ROUTINGS = ("token-choice", "expert-choice")
AUX_KINDS = ("vmoe", "switch")
#: Standard deviation of the learned position embeddings at initialisation (ViT).
POS_INIT_STD = 0.02


class Hidden(nn.Module):
    """GELU of an MLP's hidden layer, padded buffer slots set to 0 (what fine-pruning's activation reads)."""

    def forward(self, h: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        out = F.gelu(h)
        return out if valid is None else out * valid[..., None].to(out.dtype)


class MLP(nn.Module):
    """Linear-GELU-Linear on ``[N, tokens, dim]``; ``bias_out=False`` for experts (see the module docstring)."""

    def __init__(self, dim: int, hidden: int, bias_out: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = Hidden()
        self.fc2 = nn.Linear(hidden, dim, bias=bias_out)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x), valid))


class Attention(nn.Module):
    """Multi-head self-attention (its own linear layers, so quantization and QAT see plain ``nn.Linear``)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class MoELayer(nn.Module):
    """Sparse MoE MLP (see the module docstring). ``forward`` gives the output and the layer's routing:
    ``(y, indices, gates, valid, scores, aux)``; ``last_dropped`` ``[N]`` counts the token choices the
    capacity dropped in the last forward (0 for expert-choice)."""

    def __init__(self, dim: int, hidden: int, experts: int, topk: int, capacity_factor: float,
                 routing: RoutingKind, bpr: bool, noise: float, aux: AuxKind) -> None:
        super().__init__()
        self.router = nn.Linear(dim, experts, bias=False)
        self.experts = nn.ModuleList(MLP(dim, hidden, bias_out=False) for _ in range(experts))
        self.topk = topk
        self.capacity_factor = capacity_factor
        self.routing = routing
        self.bpr = bpr
        self.noise = noise
        self.aux = aux
        self.last_dropped: torch.Tensor | None = None

    def capacity(self, tokens: int) -> int:
        """Slots per expert per image: ``ceil(k * tokens * C / E)``, between 1 and ``tokens``."""
        cap = math.ceil(self.topk * tokens * self.capacity_factor / len(self.experts))
        return max(1, min(tokens, cap))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n, t, d = x.shape
        e = len(self.experts)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = self.router(x.float())  # [N, T, E]
            noisy = logits
            if self.training and self.noise > 0:
                noisy = logits + torch.randn_like(logits) * self.noise
            probs = noisy.softmax(dim=-1)
            cap = self.capacity(t)
            if self.routing == "expert-choice":
                slot_gate, slot_tok = probs.transpose(1, 2).topk(cap, dim=-1)  # [N, E, cap]
                valid = None
                aux = None
                self.last_dropped = torch.zeros(n, dtype=torch.long, device=x.device)
            else:
                slot_tok, slot_gate, valid = self._token_choice(probs, cap)
                aux = self._aux_loss(logits, noisy, probs)
        flat_tok = slot_tok.reshape(n, e * cap)
        gathered = x.gather(1, flat_tok[..., None].expand(-1, -1, d)).view(n, e, cap, d)
        outs = []
        for i, expert in enumerate(self.experts):
            xin = gathered[:, i]
            mask = None if valid is None else valid[:, i]
            if mask is not None:
                xin = xin * mask[..., None].to(xin.dtype)
            outs.append(expert(xin, mask))
        out = torch.stack(outs, dim=1) * slot_gate[..., None].to(x.dtype)
        y = torch.zeros_like(x).scatter_add(1, flat_tok[..., None].expand(-1, -1, d), out.reshape(n, e * cap, d))
        return y, slot_tok, slot_gate, valid, logits.transpose(1, 2), aux

    def _token_choice(self, probs: torch.Tensor, cap: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each token's top-k experts placed into per-image buffers of ``cap`` slots, in BPR order."""
        n, t, e = probs.shape
        k = self.topk
        top_g, top_e = probs.topk(k, dim=-1)  # [N, T, k]
        if self.bpr:  # Batch Prioritized Routing: tokens by their largest gate, first choices first
            order = top_g[..., 0].argsort(dim=1, descending=True, stable=True)
        else:
            order = torch.arange(t, device=probs.device).expand(n, t)
        ek = top_e.gather(1, order[..., None].expand(-1, -1, k)).transpose(1, 2).reshape(n, k * t)
        gk = top_g.gather(1, order[..., None].expand(-1, -1, k)).transpose(1, 2).reshape(n, k * t)
        tok = order[:, None, :].expand(n, k, t).reshape(n, k * t)
        onehot = F.one_hot(ek, e)  # [N, kT, E], in placement order
        position = ((onehot.cumsum(dim=1) - 1) * onehot).sum(dim=2)  # slot within the chosen expert
        keep = position < cap
        self.last_dropped = (~keep).sum(dim=1).detach()
        slot = torch.where(keep, ek * cap + position, torch.full_like(ek, e * cap))  # dropped: a spare column
        slot_tok = torch.zeros(n, e * cap + 1, dtype=torch.long, device=probs.device).scatter(1, slot, tok)
        slot_gate = torch.zeros(n, e * cap + 1, dtype=probs.dtype, device=probs.device).scatter(1, slot, gk)
        valid = torch.zeros(n, e * cap + 1, dtype=torch.bool, device=probs.device).scatter(1, slot, keep)
        view = (n, e, cap)
        return (slot_tok[:, : e * cap].reshape(view), slot_gate[:, : e * cap].reshape(view),
                valid[:, : e * cap].reshape(view))

    def _aux_loss(self, logits: torch.Tensor, noisy: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """The load-balancing loss of the module docstring, ``[]`` float32, averaged over images."""
        e, k = probs.shape[-1], self.topk
        if self.aux == "switch":
            top_e = probs.topk(k, dim=-1).indices
            share = F.one_hot(top_e, e).float().sum(dim=(1, 2)) / (top_e.shape[1] * k)  # [N, E]
            return (e * (share * probs.mean(dim=1)).sum(dim=1)).mean()
        sigma = self.noise if self.training and self.noise > 0 else 1.0 / e
        eta = noisy.topk(k, dim=-1).values[..., -1:]  # the k-th largest noisy logit of each token
        normal = torch.distributions.Normal(torch.zeros((), device=logits.device), torch.ones((), device=logits.device))
        load = normal.cdf((logits - eta) / sigma).sum(dim=1)  # [N, E]
        importance = probs.sum(dim=1)
        return 0.5 * (_cv_squared(importance) + _cv_squared(load)).mean()


def _cv_squared(values: torch.Tensor) -> torch.Tensor:
    """``[N]``: squared coefficient of variation (population std / mean) over the last dimension."""
    return values.var(dim=-1, correction=0) / values.mean(dim=-1).pow(2).clamp(min=1e-12)


class Block(nn.Module):
    """Pre-norm transformer block; its MLP is an :class:`MLP` or a :class:`MoELayer`."""

    def __init__(self, dim: int, heads: int, mlp: nn.Module) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = mlp

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        h = h + self.attn(self.norm1(h))
        if isinstance(self.mlp, MoELayer):
            out, *routing = self.mlp(self.norm2(h))
            return h + out, tuple(routing)
        return h + self.mlp(self.norm2(h)), None


class VisionMoE(BenchModel):
    """ViT with sparse MoE MLPs (``vmoe``), or without (``moe_every=0``: the dense ``vit``)."""

    def __init__(
        self,
        *,
        input_shape: tuple[int, int, int],
        num_classes: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        patch: int = 4,
        mlp_ratio: float = 4.0,
        moe_every: int = 2,
        experts: int = 4,
        topk: int = 2,
        capacity_factor: float = 1.25,
        routing: RoutingKind = "token-choice",
        bpr: bool = True,
        noise: float | None = None,
        aux: AuxKind = "vmoe",
        aux_weight: float = 0.01,
        name: str = "vmoe",
    ) -> None:
        super().__init__()
        c_in, h_in, w_in = check_context(name, input_shape, num_classes, mean, std)
        _check(patch >= 1 and h_in % patch == 0 and w_in % patch == 0, "patch",
               f"must divide the {h_in}x{w_in} input", patch)
        _check(dim >= 1 and heads >= 1 and dim % heads == 0, "heads", f"must divide dim ({dim})", heads)
        _check(depth >= 1, "depth", "must be >= 1 (transformer blocks)", depth)
        _check(mlp_ratio > 0, "mlp_ratio", "must be > 0", mlp_ratio)
        _check(moe_every >= 0, "moe_every", "must be >= 0 (0: no MoE layer, the dense ViT)", moe_every)
        _check(experts >= 1, "experts", "must be >= 1", experts)
        _check(1 <= topk <= experts, "topk", f"must be in [1, {experts}] (experts per token)", topk)
        _check(capacity_factor > 0, "capacity_factor", "must be > 0", capacity_factor)
        _check(routing in ROUTINGS, "routing", f"must be one of {', '.join(ROUTINGS)}", routing)
        _check(aux in AUX_KINDS, "aux", f"must be one of {', '.join(AUX_KINDS)}", aux)
        _check(aux_weight >= 0, "aux_weight", "must be >= 0", aux_weight)
        noise = 1.0 / experts if noise is None else noise
        _check(noise >= 0, "noise", "must be >= 0 (router noise std in training; None: 1 / experts)", noise)
        grid = (h_in // patch, w_in // patch)
        hidden = max(1, round(mlp_ratio * dim))
        self.input_shape = (c_in, h_in, w_in)
        self.moe_blocks = [i for i in range(depth) if moe_every and (depth - 1 - i) % moe_every == 0]
        if self.moe_blocks:
            self.patch_grid = grid
            self.patch_px = (patch, patch)
        self.grid = grid
        self.aux_weight = aux_weight
        self.config: dict[str, Any] = {
            "dim": dim, "depth": depth, "heads": heads, "patch": patch, "mlp_ratio": mlp_ratio, "hidden": hidden,
            "moe_every": moe_every, "moe_blocks": list(self.moe_blocks),
        }
        if self.moe_blocks:
            self.config.update({"experts": experts, "topk": topk, "capacity_factor": capacity_factor,
                                "routing": routing, "bpr": bpr, "noise": noise, "aux": aux, "aux_weight": aux_weight})
        self.normalize = Normalize(tuple(mean), tuple(std))
        self.patch_embed = nn.Conv2d(c_in, dim, kernel_size=patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], dim))
        self.blocks = nn.ModuleList(
            Block(dim, heads, MoELayer(dim, hidden, experts, topk, capacity_factor, routing, bpr, noise, aux)
                  if i in self.moe_blocks else MLP(dim, hidden))
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        init_glorot(self)
        nn.init.normal_(self.pos_embed, std=POS_INIT_STD)
        self._aux: list[torch.Tensor] = []
        self.last_aux: torch.Tensor | None = None

    def forward_routing(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing | None]:
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"{type(self).__name__} built for inputs {self.input_shape}, got {tuple(x.shape)}")
        h = self.patch_embed(self.normalize(x)).flatten(2).transpose(1, 2) + self.pos_embed
        layers: list[Routing] = []
        aux_terms: list[torch.Tensor] = []
        for block in self.blocks:
            h, routed = block(h)
            if routed is not None:
                indices, gates, valid, scores, aux = routed
                layers.append(Routing(indices, gates, scores, self.grid, self.patch_px, valid))  # type: ignore[arg-type]
                if aux is not None:
                    aux_terms.append(aux)
        logits = self.head(self.norm(h).mean(dim=1))
        if aux_terms:
            total = self.aux_weight * torch.stack(aux_terms).sum()
            self.last_aux = total.detach()
            if self.training and torch.is_grad_enabled():
                self._aux = [*self._aux[-7:], total]  # bounded: forwards outside a training step never pile up
        if not layers:
            return logits, None
        last = layers[-1]
        routing = Routing(last.indices, last.gates, last.scores, last.grid, last.patch_px, last.valid,
                          tuple(layers) if len(layers) > 1 else ())
        return logits, routing

    def auxiliary_loss(self) -> torch.Tensor | None:
        """The weighted load-balancing loss of the training forwards since the last call (their mean), or
        None (no training forward, expert-choice routing, or the dense ViT); clears the record."""
        terms, self._aux = self._aux, []
        if not terms:
            return None
        return terms[0] if len(terms) == 1 else torch.stack(terms).mean()

    def moe_layers(self) -> list[tuple[str, MoELayer]]:
        """``(qualified name, layer)`` of every MoE layer, first to last."""
        return [(f"blocks.{i}.mlp", self.blocks[i].mlp) for i in self.moe_blocks]  # type: ignore[misc]

    def parameter_groups(self) -> dict[str, list[str]]:
        """``gate``: the router of every MoE layer; ``experts``: every parameter of every expert MLP."""
        names = [n for n, _ in self.named_parameters()]
        prefixes = [name for name, _ in self.moe_layers()]
        return {
            "gate": [n for n in names if any(n.startswith(f"{p}.router.") for p in prefixes)],
            "experts": [n for n in names if any(n.startswith(f"{p}.experts.") for p in prefixes)],
        }

    def prunable_convs(self) -> list[tuple[str, nn.Module]]:  # type: ignore[override]
        """The hidden layer (``fc1``) of every expert of the last MoE layer; for the dense ViT, of the last
        block's MLP."""
        if not self.moe_blocks:
            last = len(self.blocks) - 1
            return [(f"blocks.{last}.mlp.fc1", self.blocks[last].mlp.fc1)]  # type: ignore[union-attr]
        name, layer = self.moe_layers()[-1]
        return [(f"{name}.experts.{e}.fc1", expert.fc1) for e, expert in enumerate(layer.experts)]

    def prunable_layers(self) -> list[PrunableLayer]:
        """Hidden units of those layers: a zeroed ``fc1`` row and bias give GELU(0) = 0, silent by itself
        (no norm); the ``activation`` criterion reads the GELU (``act``, padded slots 0)."""
        out = []
        for name, fc1 in self.prunable_convs():
            mlp = self.get_submodule(name.rpartition(".")[0])
            out.append(PrunableLayer(name, fc1, act=mlp.act))  # type: ignore[arg-type]
        return out


def _check(ok: bool, field: str, what: str, value: object) -> None:
    if not ok:
        raise ComponentParamsError(f"{field}: {what}, got {value!r}")


@register_model("vmoe")
def vmoe(
    *,
    input_shape: tuple[int, int, int],
    num_classes: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    dim: int = 64,
    depth: int = 4,
    heads: int = 4,
    patch: int = 4,
    mlp_ratio: float = 4.0,
    moe_every: int = 2,
    experts: int = 4,
    topk: int = 2,
    capacity_factor: float = 1.25,
    routing: RoutingKind = "token-choice",
    bpr: bool = True,
    noise: float | None = None,
    aux: AuxKind = "vmoe",
    aux_weight: float = 0.01,
) -> VisionMoE:
    """V-MoE (Riquelme et al. 2021): a ViT whose every ``moe_every``-th MLP (last included) is a sparse MoE.

    Defaults (CPU-sized, 16x16 digits or 28x28 MNIST in minutes): dim 64, depth 4 (MoE in blocks 2 and 4),
    4 heads, 4x4 patches, MLP/expert hidden 256, 4 experts, token-choice top-2, capacity factor 1.25 per
    image, Batch Prioritized Routing, router noise 1/experts in training, V-MoE's importance + load loss at
    weight 0.01. ``routing: expert-choice`` lets each expert pick its tokens (Zhou et al. 2022);
    ``aux: switch`` uses the Switch Transformer's loss. See :mod:`bench.models.vit`.
    """
    return VisionMoE(input_shape=input_shape, num_classes=num_classes, mean=mean, std=std, dim=dim, depth=depth,
                     heads=heads, patch=patch, mlp_ratio=mlp_ratio, moe_every=moe_every, experts=experts, topk=topk,
                     capacity_factor=capacity_factor, routing=routing, bpr=bpr, noise=noise, aux=aux,
                     aux_weight=aux_weight, name="vmoe")


@register_model("vit")
def vit(
    *,
    input_shape: tuple[int, int, int],
    num_classes: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    dim: int = 64,
    depth: int = 4,
    heads: int = 4,
    patch: int = 4,
    mlp_ratio: float = 4.0,
) -> VisionMoE:
    """Dense ViT baseline of ``vmoe``: the same network with a single MLP of the same hidden width in every
    block (no routing, no patch grid, like ``dense``). Defaults as ``vmoe``'s."""
    return VisionMoE(input_shape=input_shape, num_classes=num_classes, mean=mean, std=std, dim=dim, depth=depth,
                     heads=heads, patch=patch, mlp_ratio=mlp_ratio, moe_every=0, name="vit")


#: ``vmoe-paper``: a ViT-Ti-width V-MoE for 32x32 CIFAR-10 / GTSRB (V-MoE's recipe at small scale).
VMOE_PAPER_CONFIG: dict[str, Any] = {
    "dim": 192, "depth": 8, "heads": 3, "patch": 4, "mlp_ratio": 4.0, "moe_every": 2, "experts": 8, "topk": 2,
    "capacity_factor": 1.05, "routing": "token-choice", "bpr": True, "noise": None, "aux": "vmoe",
    "aux_weight": 0.01,
}
VIT_PAPER_CONFIG: dict[str, Any] = {k: VMOE_PAPER_CONFIG[k] for k in ("dim", "depth", "heads", "patch", "mlp_ratio")}


def _preset(name: str, config: dict[str, Any], moe: bool, **context: Any) -> VisionMoE:
    try:
        return VisionMoE(**context, **config, **({} if moe else {"moe_every": 0}), name=name)
    except ComponentParamsError as exc:
        base = "vmoe" if moe else "vit"
        raise ComponentParamsError(
            f"model '{name}' is fixed at {config}; for other inputs use '{base}'. {exc}"
        ) from None


@register_model("vmoe-paper")
def vmoe_paper(
    *, input_shape: tuple[int, int, int], num_classes: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> VisionMoE:
    """V-MoE preset for 32x32 input: dim 192, depth 8, 3 heads, 4x4 patches (8x8 grid), 8 experts of hidden
    768 in blocks 2, 4, 6, 8, top-2, capacity factor 1.05, BPR (sizes in :mod:`bench.models.vit`)."""
    return _preset("vmoe-paper", VMOE_PAPER_CONFIG, True, input_shape=input_shape, num_classes=num_classes,
                   mean=mean, std=std)


@register_model("vit-paper")
def vit_paper(
    *, input_shape: tuple[int, int, int], num_classes: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> VisionMoE:
    """The dense baseline of ``vmoe-paper``: the same ViT with one MLP of hidden 768 per block."""
    return _preset("vit-paper", VIT_PAPER_CONFIG, False, input_shape=input_shape, num_classes=num_classes,
                   mean=mean, std=std)

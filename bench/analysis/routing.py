"""Routing metrics: which expert sees the trigger, how evenly experts spread over the patch grid, and how
much a trigger moves each expert's choice (BadPatches paper, Sections 3.5 and 5.3).

Every metric is a pure function of selection masks ``[N, E, rows, cols]`` (``Routing.selection_mask()``)
and, for the trigger, of the patches it touches; :class:`RoutingTally` sums them over batches and
:func:`routing_metrics` drives a model over a test set. Definitions (all in the returned flat dict):

- ``route_rate_e{i}``: share of triggered images on which expert ``i``'s top-k holds at least one patch
  the trigger touched; ``route_rate_any``: on which *some* expert holds one (the paper's second
  hypothesis: where this is low, no expert ever processes the trigger). ``route_rate_clean_any``: the
  same on the clean images, the baseline of routers that keep those positions anyway.
  ``route_touched_patches``: how many patches the trigger touches (every one for BadPatches, so the
  rate is 1 there by construction); ``route_trigger_patch_share``: that count over all patches of the
  grid (the same for every image: the touched patches are the trigger's, not the image's). At 1 (BadPatches,
  blend, WaNet) ``route_rate_any`` is 1 by construction and says nothing; reports show it as such.
- ``route_jaccard_e{i}``: mean over images of ``|S_clean & S_trig| / |S_clean | S_trig|`` of expert
  ``i``'s kept patch sets on an image and on the same image triggered (1 = the trigger leaves that
  expert's routing alone, 0 = it moves every kept patch); ``route_jaccard_mean`` averages experts.
- ``route_expert_overlap``: mean over clean images and expert pairs of the Jaccard overlap of two
  experts' kept sets (how much experts share patches; only with two or more experts).
- ``load_cv_e{i}``: coefficient of variation (population std / mean) of how often expert ``i`` keeps
  each patch over the clean images: 0 = every patch equally often (no positional preference),
  ``sqrt(n / k - 1)`` = always the same ``k`` of the ``n`` patches. ``load_cv_mean`` / ``load_cv_std``:
  mean and spread over experts; ``load_cv_triggered_mean``: the mean on the triggered images.
- ``route_n_images``: how many images (pairs) the numbers are over.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from bench.attacks.base import Trigger
from bench.errors import BenchError


class NoRoutingError(BenchError):
    """A model without routing (e.g. ``dense``) was given to an analysis that needs it."""


def patch_touch_mask(
    trigger: Trigger, input_shape: tuple[int, int, int], grid: tuple[int, int]
) -> torch.Tensor:
    """``[rows, cols]`` bool: patches of ``grid`` holding at least one pixel ``trigger`` can change."""
    _, h, w = input_shape
    rows, cols = grid
    if h % rows or w % cols:
        raise ValueError(f"a {rows}x{cols} patch grid does not divide a {h}x{w} image")
    touched = trigger.touched_mask(tuple(input_shape)).bool().cpu()
    return touched.reshape(rows, h // rows, cols, w // cols).any(dim=3).any(dim=1)


def trigger_hits(selection: torch.Tensor, touch: torch.Tensor) -> torch.Tensor:
    """``[N, E]`` bool: whether each expert kept a touched patch, from ``selection`` ``[N, E, r, c]``."""
    return (selection & touch.to(selection.device)).flatten(2).any(dim=2)


def selection_jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[N, E]`` Jaccard overlap of two selections ``[N, E, r, c]`` (1 where both are empty)."""
    a, b = a.flatten(2), b.flatten(2)
    inter = (a & b).sum(dim=2).double()
    union = (a | b).sum(dim=2).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def expert_overlap(selection: torch.Tensor) -> torch.Tensor:
    """``[N]`` mean Jaccard overlap over all pairs of experts of their kept sets (needs two experts)."""
    flat = selection.flatten(2).double()
    n, e, _ = flat.shape
    if e < 2:
        raise ValueError("expert overlap needs at least two experts")
    inter = flat @ flat.transpose(1, 2)
    sizes = flat.sum(dim=2)
    union = sizes[:, :, None] + sizes[:, None, :] - inter
    pair = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    upper = torch.triu(torch.ones(e, e, dtype=torch.bool, device=flat.device), diagonal=1)
    return pair[:, upper].mean(dim=1)


def selection_counts(selection: torch.Tensor) -> torch.Tensor:
    """``[E, r, c]`` long: on how many images each expert kept each patch."""
    return selection.sum(dim=0, dtype=torch.long)


def load_cv(counts: torch.Tensor) -> torch.Tensor:
    """``[E]`` coefficient of variation (population std / mean) of each expert's per-patch counts."""
    flat = counts.flatten(1).double()
    mean = flat.mean(dim=1)
    std = flat.std(dim=1, correction=0)
    return torch.where(mean > 0, std / mean.clamp(min=1e-12), torch.zeros_like(mean))


@dataclass
class RoutingTally:
    """Sums of the routing metrics over batches, so a caller that already runs the model (an evaluation
    loop) can feed the routing it has; :meth:`result` gives the flat dict of the module docstring.

    The sums live on the device of the first batch and :meth:`update` never reads a value back to the
    host (no synchronisation per batch); :meth:`result` transfers them once, at the end.

    ``touch``: ``[rows, cols]`` patches the trigger touches, or None when there is no trigger.
    """

    experts: int
    grid: tuple[int, int]
    touch: torch.Tensor | None = None
    n: int = 0
    hits: torch.Tensor = field(init=False)
    hits_any: torch.Tensor = field(init=False)
    clean_hits_any: torch.Tensor = field(init=False)
    jaccard: torch.Tensor = field(init=False)
    overlap: torch.Tensor = field(init=False)
    counts_clean: torch.Tensor = field(init=False)
    counts_triggered: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self._allocate(torch.device("cpu"))

    def _allocate(self, device: torch.device) -> None:
        """Zeroed sums on ``device``."""
        self.hits = torch.zeros(self.experts, dtype=torch.long, device=device)
        self.hits_any = torch.zeros((), dtype=torch.long, device=device)
        self.clean_hits_any = torch.zeros((), dtype=torch.long, device=device)
        self.jaccard = torch.zeros(self.experts, dtype=torch.float64, device=device)
        self.overlap = torch.zeros((), dtype=torch.float64, device=device)
        self.counts_clean = torch.zeros(self.experts, *self.grid, dtype=torch.long, device=device)
        self.counts_triggered = torch.zeros(self.experts, *self.grid, dtype=torch.long, device=device)
        if self.touch is not None:
            self.touch = self.touch.to(device)

    def update(self, clean: torch.Tensor, triggered: torch.Tensor | None = None) -> None:
        """Add a batch: selections ``[B, E, r, c]`` of clean images and of the same images triggered."""
        if clean.shape[1:] != (self.experts, *self.grid):
            raise ValueError(f"selection of shape {tuple(clean.shape)} does not match {self.experts} experts "
                             f"on a {self.grid[0]}x{self.grid[1]} grid")
        if triggered is not None and triggered.shape != clean.shape:
            raise ValueError(f"clean and triggered selections differ: {tuple(clean.shape)} vs "
                             f"{tuple(triggered.shape)}")
        if self.n == 0 and self.hits.device != clean.device:
            self._allocate(clean.device)
        self.n += int(clean.shape[0])
        self.counts_clean += selection_counts(clean)
        if self.experts > 1:
            self.overlap += expert_overlap(clean).sum()
        if triggered is None:
            return
        self.counts_triggered += selection_counts(triggered)
        self.jaccard += selection_jaccard(clean, triggered).sum(dim=0)
        if self.touch is not None:
            hits = trigger_hits(triggered, self.touch)
            self.hits += hits.sum(dim=0)
            self.hits_any += hits.any(dim=1).sum()
            self.clean_hits_any += trigger_hits(clean, self.touch).any(dim=1).sum()

    def _on_host(self) -> dict[str, torch.Tensor]:
        """Every sum on the CPU, in one device-to-host transfer (float64 holds the counts exactly)."""
        names = ("hits", "hits_any", "clean_hits_any", "jaccard", "overlap", "counts_clean", "counts_triggered")
        parts = [getattr(self, name) for name in names]
        flat = torch.cat([p.reshape(-1).double() for p in parts]).cpu()
        out, offset = {}, 0
        for name, part in zip(names, parts, strict=True):
            out[name] = flat[offset : offset + part.numel()].reshape(part.shape)
            offset += part.numel()
        return out

    def result(self) -> dict[str, float]:
        """The flat metrics dict (empty before any update)."""
        if self.n == 0:
            return {}
        host = self._on_host()
        n = float(self.n)
        out: dict[str, float] = {"route_n_images": n}
        if self.touch is not None:
            touch = self.touch.cpu()
            out["route_touched_patches"] = float(touch.sum())
            out["route_trigger_patch_share"] = float(touch.sum()) / touch.numel()
            out["route_rate_any"] = float(host["hits_any"]) / n
            out.update({f"route_rate_e{i}": float(v) / n for i, v in enumerate(host["hits"])})
            out["route_rate_clean_any"] = float(host["clean_hits_any"]) / n
        triggered = float(host["counts_triggered"].sum()) > 0
        if triggered:
            jac = host["jaccard"] / n
            out["route_jaccard_mean"] = float(jac.mean())
            out.update({f"route_jaccard_e{i}": float(v) for i, v in enumerate(jac)})
        if self.experts > 1:
            out["route_expert_overlap"] = float(host["overlap"]) / n
        cv = load_cv(host["counts_clean"])
        out["load_cv_mean"] = float(cv.mean())
        out["load_cv_std"] = float(cv.std(correction=0))
        out.update({f"load_cv_e{i}": float(v) for i, v in enumerate(cv)})
        if triggered:
            out["load_cv_triggered_mean"] = float(load_cv(host["counts_triggered"]).mean())
        return out


def has_routing(model: nn.Module) -> bool:
    """Whether ``model`` routes patches (declares a patch grid), as pMoE models do."""
    return getattr(model, "patch_grid", None) is not None and hasattr(model, "forward_routing")


@torch.no_grad()
def selection_masks(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """``[N, E, rows, cols]`` bool selection of ``model`` (eval mode, restored after) on images ``x``: its
    last MoE layer's (:func:`layer_selection_masks`)."""
    return layer_selection_masks(model, x, batch_size)[-1]


@torch.no_grad()
def layer_selection_masks(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> list[torch.Tensor]:
    """Per MoE layer of ``model``, first to last (``Routing.per_layer()``), the ``[N, E, rows, cols]`` bool
    selection on images ``x`` (eval mode, restored after); the last equals :func:`selection_masks`."""
    if not has_routing(model):
        raise NoRoutingError(f"model {type(model).__name__} has no routing; analysis needs a pMoE model")
    parts: list[list[torch.Tensor]] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, x.shape[0], batch_size):
            routing = model.forward_routing(x[start : start + batch_size])[1]
            if routing is None:
                raise NoRoutingError(f"model {type(model).__name__} returned no routing")
            parts.append([layer.selection_mask() for layer in routing.per_layer()])
    finally:
        model.train(was_training)
    if not parts:
        rows, cols = model.patch_grid
        return [torch.zeros(0, 0, rows, cols, dtype=torch.bool, device=x.device)]
    return [torch.cat(layer) for layer in zip(*parts, strict=True)]


@torch.no_grad()
def routing_metrics(
    model: nn.Module,
    clean_x: torch.Tensor,
    triggered_x: torch.Tensor | None = None,
    trigger: Trigger | None = None,
    batch_size: int = 512,
) -> dict[str, float]:
    """The routing metrics of the module docstring on paired images, in batches (eval mode, restored).

    ``clean_x`` and ``triggered_x`` ``[N, C, H, W]`` must be the same images without and with the
    trigger (e.g. the ASR set and its clean originals). Without ``triggered_x`` only the load metrics
    are computed; without ``trigger`` the trigger routing rates are left out. Returns ``{}`` for a model
    without routing (dense) or for no images.
    """
    if not has_routing(model) or clean_x.shape[0] == 0:
        return {}
    if triggered_x is not None and triggered_x.shape != clean_x.shape:
        raise ValueError(f"clean_x {tuple(clean_x.shape)} and triggered_x {tuple(triggered_x.shape)} must be "
                         "the same images")
    grid = tuple(model.patch_grid)
    touch = None
    if trigger is not None and triggered_x is not None:
        touch = patch_touch_mask(trigger, tuple(clean_x.shape[1:]), grid)
    tally: RoutingTally | None = None
    was_training = model.training
    model.eval()
    try:
        for start in range(0, clean_x.shape[0], batch_size):
            routing = model.forward_routing(clean_x[start : start + batch_size])[1]
            if routing is None:
                return {}
            clean = routing.selection_mask()
            triggered = None
            if triggered_x is not None:
                triggered = model.forward_routing(triggered_x[start : start + batch_size])[1].selection_mask()
            if tally is None:
                tally = RoutingTally(routing.num_experts, grid, touch)
            tally.update(clean, triggered)
    finally:
        model.train(was_training)
    return tally.result() if tally is not None else {}

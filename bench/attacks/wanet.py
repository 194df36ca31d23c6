"""WaNet trigger: a fixed, smooth warping field that moves pixels by a fraction of a pixel.

Paper: Nguyen & Tran, "WaNet - Imperceptible Warping-based Backdoor Attack", ICLR 2021,
https://arxiv.org/abs/2102.10369. We follow the definition of the authors' release
(github.com/VinAIResearch/Warping-based_Backdoor_Attack-release, ``train.py``) step by step. The BadPatches
paper (Section 3.3.3) uses WaNet's warp; its published notebooks (github.com/geefmegeld/pMoE-backdoor) build
it with k = 2, s = 0.25 and sample without interpolation (``sampling="nearest-truncate"``).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from bench.attacks.base import Trigger
from bench.errors import ComponentParamsError
from bench.registry import register_trigger

Sampling = Literal["bilinear", "nearest-truncate"]


@register_trigger("wanet")
class WaNet(Trigger):
    r"""Warping-based trigger (Nguyen & Tran, ICLR 2021, https://arxiv.org/abs/2102.10369).

    The original method, exactly:

    1. a ``k`` x ``k`` grid of offsets ``P`` (two planes: x, then y) uniform in [-1, 1], divided by the
       mean of ``|P|``;
    2. ``P`` upsampled to ``H`` x ``W`` (bicubic, ``align_corners=True``): the noise field;
    3. sampling grid = ``(identity + s * noise / H) * grid_rescale``, clamped to [-1, 1], where identity
       is ``linspace(-1, 1)`` along each axis;
    4. ``x' = grid_sample(x, grid, bilinear, align_corners=True)``.

    Our only departures: ``P`` comes from a generator seeded with ``seed`` (the release uses the global
    RNG and stores the field in the checkpoint), so the same seed gives the same warp at every size
    (BadPatches warps each patch with the same field, resized to the patch). The offset is divided by
    ``H`` for both axes as the release does (it only had square images). With ``s = 0`` and
    ``grid_rescale = 1`` the grid is the identity and we return the images unchanged rather than resample
    them (``grid_sample`` on the identity grid is exact only up to float rounding).

    Sampling (``sampling``): ``"bilinear"`` is step 4, WaNet's own. ``"nearest-truncate"`` is what the
    BadPatches paper's published notebooks do instead: each normalised coordinate ``g`` becomes the pixel
    index ``trunc((g + 1) / 2 * (size - 1))``, clamped to the image, and the pixel there is copied. With a
    sub-pixel offset the index is the pixel itself where the offset is positive and its neighbour one pixel
    up (rows) or left (columns) where it is negative: a blocky one-pixel shift instead of a smooth warp.
    (The notebooks also clip the upsampled field to [-1, 1]; with truncation only the offset's sign
    matters while it stays under one pixel, which holds for ``s * max|field| < 2`` (k = 2, s = 0.25: any
    field), so we do not clip.)

    Noise mode (the release's "cross" samples, ``cross_ratio`` > 0 there by default): besides the backdoor
    samples, training adds ``cross_ratio`` times as many samples warped by the trigger's grid *plus*
    per-sample random noise ``U[-1, 1] / H``, keeping their true labels, so the network learns this exact
    warp rather than any warp. :meth:`noise` makes such samples; ``cross_ratio`` only matters for training.
    The release redraws them every batch; :func:`bench.attacks.poison.poison_training_set` draws them once
    from the poisoning seed (a frozen poisoned set, like every other attack here).

    Arguments:
        k (int): side of the control grid; larger means a more detailed field. Default: 4.
        s (float): warping strength (>= 0); 0 leaves images unchanged. Default: 0.5.
        seed (int): seed of the random field. Default: 0.
        grid_rescale (float): scale of the whole grid (the release's ``--grid-rescale``, e.g. 0.98 keeps
            samples inside the image). Default: 1.0.
        noise_mode (bool): also train on noise ("cross") samples. Default: False.
        cross_ratio (float): number of cross samples per backdoor sample in noise mode (>= 0). Default: 2.0
            (the release's default).
        sampling (str): "bilinear" (WaNet's ``grid_sample``) or "nearest-truncate" (the BadPatches
            notebooks: coordinates truncated to pixel indices). Default: "bilinear".

    Shape:
        images: ``[N, C, H, W]`` in [0, 1], any ``H, W``.
        output: ``[N, C, H, W]`` in [0, 1].

    Examples::

        >>> trigger = WaNet(k=4, s=0.5, seed=0)
        >>> poisoned = trigger(images)
        >>> notebooks = WaNet(k=2, s=0.25, sampling="nearest-truncate")  # the BadPatches notebooks' warp
    """

    strength_param: ClassVar[str] = "s"

    def __init__(
        self,
        k: int = 4,
        s: float = 0.5,
        seed: int = 0,
        grid_rescale: float = 1.0,
        noise_mode: bool = False,
        cross_ratio: float = 2.0,
        sampling: Sampling = "bilinear",
    ) -> None:
        if k < 1:
            raise ComponentParamsError(f"wanet.k: must be at least 1 (side of the control grid), got {k}")
        if s < 0:
            raise ComponentParamsError(f"wanet.s: the warping strength must be >= 0, got {s}")
        if grid_rescale <= 0:
            raise ComponentParamsError(f"wanet.grid_rescale: must be > 0, got {grid_rescale}")
        if cross_ratio < 0:
            raise ComponentParamsError(f"wanet.cross_ratio: must be >= 0, got {cross_ratio}")
        self.k = k
        self.s = s
        self.seed = seed
        self.grid_rescale = grid_rescale
        self.noise_mode = noise_mode
        self.cross_ratio = cross_ratio
        self.sampling: Sampling = sampling
        gen = torch.Generator().manual_seed(seed)
        offsets = torch.rand(1, 2, k, k, generator=gen) * 2 - 1
        #: ``[1, 2, k, k]``: the control offsets (x plane, y plane), normalised by their mean magnitude.
        self.field = offsets / offsets.abs().mean()
        self._grids: dict[tuple[int, int, torch.device, torch.dtype], torch.Tensor] = {}

    @property
    def is_identity(self) -> bool:
        return self.s == 0 and self.grid_rescale == 1

    def identity_grid(self, height: int, width: int) -> torch.Tensor:
        """``[1, H, W, 2]`` sampling grid that reproduces the image (x first, as grid_sample wants)."""
        ys = torch.linspace(-1, 1, height)
        xs = torch.linspace(-1, 1, width)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack((gx, gy), dim=-1)[None]

    def grid(
        self, height: int, width: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """``[1, H, W, 2]`` warped sampling grid for images of this size (cached per size and device)."""
        key = (height, width, torch.device(device), dtype)
        if key not in self._grids:
            noise = F.interpolate(self.field, size=(height, width), mode="bicubic", align_corners=True)
            noise = noise.permute(0, 2, 3, 1)
            warped = (self.identity_grid(height, width) + self.s * noise / height) * self.grid_rescale
            self._grids[key] = warped.clamp(-1, 1).to(device=device, dtype=dtype)
        return self._grids[key]

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        if self.is_identity:
            return images.clone()
        n, _, h, w = images.shape
        if self.sampling == "nearest-truncate":
            return _take(images, *truncated_indices(self.grid(h, w, images.device)))
        grid = self.grid(h, w, images.device, images.dtype).expand(n, h, w, 2)
        return _sample(images, grid)

    def noise(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Noise-mode ("cross") samples: the trigger's grid plus per-sample ``U[-1, 1] / H``, clamped.

        Randomness comes from ``generator`` (a CPU generator; the default RNG when None).
        """
        n, _, h, w = images.shape
        jitter = torch.rand(n, h, w, 2, generator=generator) * 2 - 1
        if self.sampling == "nearest-truncate":
            grid = (self.grid(h, w, images.device) + jitter.to(images.device) / h).clamp(-1, 1)
            return _take(images, *truncated_indices(grid))
        jitter = jitter.to(device=images.device, dtype=images.dtype)
        grid = (self.grid(h, w, images.device, images.dtype) + jitter / h).clamp(-1, 1)
        return _sample(images, grid)

    def touched_mask(self, shape: tuple[int, int, int]) -> torch.Tensor:
        """Pixels whose sampling position the field moves (warping leaves constant images unchanged, so
        the default probe on constant images would miss them)."""
        _, h, w = shape
        if self.is_identity:
            return torch.zeros(h, w, dtype=torch.bool)
        if self.sampling == "nearest-truncate":
            rows, cols = truncated_indices(self.grid(h, w))
            return ((rows != torch.arange(h)[:, None]) | (cols != torch.arange(w)[None, :]))[0]
        moved = (self.grid(h, w) - self.identity_grid(h, w)).abs().amax(dim=-1)[0]
        return moved > 0


def truncated_indices(grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column pixel indices ``[B, H, W]`` of a ``[B, H, W, 2]`` grid (x first) as the BadPatches
    notebooks compute them: ``trunc((g + 1) / 2 * (size - 1))`` in float32, clamped to the image."""
    _, h, w, _ = grid.shape
    g = grid.float()
    cols = ((g[..., 0] + 1.0) * 0.5 * (w - 1)).to(torch.long).clamp(0, w - 1)
    rows = ((g[..., 1] + 1.0) * 0.5 * (h - 1)).to(torch.long).clamp(0, h - 1)
    return rows, cols


def _take(images: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``out[n, c, i, j] = images[n, c, rows[b, i, j], cols[b, i, j]]`` (``b`` = n, or 0 for one grid)."""
    n, c, h, w = images.shape
    flat = (rows * w + cols).reshape(rows.shape[0], 1, h * w).expand(n, c, h * w)
    return images.reshape(n, c, h * w).gather(2, flat).reshape(n, c, h, w)


def _sample(images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.clamp(0.0, 1.0)

"""BadPatches: apply any trigger to every patch of a grid, as if each patch were an image.

Paper: "BadPatches: Backdoor Attacks Against Patch-based Mixture of Experts Architectures", Section 3.3.4
(the paper's code: github.com/geefmegeld/pMoE-backdoor). A patch-level router may never route the one
patch that holds an image-level trigger, and splits a whole-image trigger into pieces; stamping the whole
trigger into every patch guarantees that every expert sees all of it, whatever the router picks.

The grid is the model's routing grid unless the attack names its own ``trigger_grid``: the paper's worked
example splits a 32x32 image into 16 patches of 8x8 (``trigger_grid: 4``) while its pMoE routes 64 patches
of 4x4, and a 4x4 square stamped into every 4x4 routing patch would paint the whole image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from bench.attacks.base import Trigger
from bench.errors import ComponentParamsError

Apply = Literal["image", "badpatches"]
APPLY_MODES: tuple[str, ...] = ("image", "badpatches")


class BadPatches(Trigger):
    r"""Patch-level application of an inner trigger (BadPatches paper, Section 3.3.4).

    Images are split into a ``rows`` x ``cols`` grid (the model's routing grid, or the attack's own
    ``trigger_grid``), the inner trigger is called on
    the ``N * rows * cols`` patches as one batch (each patch as an image), and the patches are stitched
    back. So a blend pattern is resized to the patch with the same alpha, a BadNets square is stamped in
    every patch at its position, and WaNet warps every patch with the same field. The strength is the
    inner trigger's (``strength_param`` names the inner parameter).

    Arguments:
        inner (Trigger): the trigger applied to each patch.
        grid (tuple[int, int]): ``(rows, cols)`` of the trigger grid: the model's routing grid
            (``model.patch_grid``) or the attack's ``trigger_grid`` (see :func:`build_attack_trigger`).

    Shape:
        images: ``[N, C, H, W]`` in [0, 1] with ``H`` divisible by ``rows`` and ``W`` by ``cols``.
        output: ``[N, C, H, W]`` in [0, 1].

    Examples::

        >>> trigger = BadPatches(Blend(alpha=0.5), grid=model.patch_grid)
        >>> poisoned = trigger(images)
    """

    def __init__(self, inner: Trigger, grid: tuple[int, int]) -> None:
        rows, cols = (int(g) for g in grid)
        if getattr(inner, "poison_images", None) is not None:  # planned n/a; this guards direct use
            raise ComponentParamsError(
                f"badpatches: trigger {type(inner).__name__} makes its own poisoned training images (poison_images) "
                "on whole images and has no per-patch form; use apply: image"
            )
        if rows < 1 or cols < 1:
            raise ComponentParamsError(f"badpatches.grid: rows and cols must be >= 1, got {tuple(grid)}")
        self.inner = inner
        self.grid = (rows, cols)
        self.strength_param = inner.strength_param  # type: ignore[misc]

    @property
    def noise_mode(self) -> bool:
        return bool(getattr(self.inner, "noise_mode", False))

    @property
    def cross_ratio(self) -> float:
        return float(getattr(self.inner, "cross_ratio", 0.0))

    def patch_size(self, height: int, width: int) -> tuple[int, int]:
        """``(height, width)`` of one patch; a clear error when the grid does not divide the image."""
        rows, cols = self.grid
        if height % rows or width % cols:
            raise ComponentParamsError(
                f"badpatches: a {height}x{width} image cannot be split into a {rows}x{cols} patch grid "
                f"({height} % {rows} = {height % rows}, {width} % {cols} = {width % cols}); the trigger "
                "grid (the attack's trigger_grid, else the model's patch grid) must divide the input size"
            )
        return height // rows, width // cols

    def split(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` -> ``[N * rows * cols, C, H / rows, W / cols]``, patches in row-major order."""
        n, c, h, w = images.shape
        rows, cols = self.grid
        ph, pw = self.patch_size(h, w)
        patches = images.reshape(n, c, rows, ph, cols, pw).permute(0, 2, 4, 1, 3, 5)
        return patches.reshape(n * rows * cols, c, ph, pw)

    def stitch(self, patches: torch.Tensor, n: int) -> torch.Tensor:
        """Inverse of :meth:`split`."""
        rows, cols = self.grid
        _, c, ph, pw = patches.shape
        images = patches.reshape(n, rows, cols, c, ph, pw).permute(0, 3, 1, 4, 2, 5)
        return images.reshape(n, c, rows * ph, cols * pw)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return self.stitch(self.inner(self.split(images)), images.shape[0])

    def noise(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The inner trigger's noise-mode samples, made per patch (only for an inner trigger with noise)."""
        inner_noise = getattr(self.inner, "noise", None)
        if inner_noise is None:
            raise ComponentParamsError(
                f"badpatches: the inner trigger {type(self.inner).__name__} has no noise mode"
            )
        return self.stitch(inner_noise(self.split(images), generator), images.shape[0])

    def touched_mask(self, shape: tuple[int, int, int]) -> torch.Tensor:
        """The inner trigger's mask on one patch, tiled over the grid."""
        c, h, w = shape
        ph, pw = self.patch_size(h, w)
        return self.inner.touched_mask((c, ph, pw)).repeat(*self.grid)


def normalize_grid(trigger_grid: int | Sequence[int] | None) -> tuple[int, int] | None:
    """``trigger_grid`` as ``(rows, cols)``: an int ``n`` is ``n`` x ``n``, ``[rows, cols]`` as given,
    None stays None (the routing grid). Refuses anything else with a message naming ``trigger_grid``."""
    if trigger_grid is None:
        return None
    values = [trigger_grid] if isinstance(trigger_grid, int) else list(trigger_grid)
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
        raise ComponentParamsError(
            f"attack.trigger_grid: an int n (n x n patches) or [rows, cols], each >= 1, got {trigger_grid!r}"
        )
    return values[0], values[1]


def build_attack_trigger(
    name: str,
    params: dict[str, Any],
    apply: str = "image",
    patch_grid: tuple[int, int] | None = None,
    trigger_grid: int | Sequence[int] | None = None,
) -> Trigger:
    """The registered trigger ``name`` built from ``params``, wrapped in :class:`BadPatches` when
    ``apply == "badpatches"``.

    BadPatches splits images into ``trigger_grid`` (an int ``n`` = ``n`` x ``n`` patches, or
    ``[rows, cols]``: fixed patches, so it also runs on a model without routing) or, when it is None, into
    the model's routing grid ``patch_grid`` (then a model without one is refused). ``trigger_grid`` is
    ignored for ``apply == "image"``. Parameters are validated by the registry (unknown keys, wrong types,
    allowed choices).
    """
    from bench.registry import get

    if apply not in APPLY_MODES:
        raise ComponentParamsError(f"attack.apply: must be one of {', '.join(APPLY_MODES)}, got {apply!r}")
    grid = normalize_grid(trigger_grid)
    trigger = get("trigger", name).create(**params)
    if apply == "image":
        return trigger
    grid = grid if grid is not None else patch_grid
    if grid is None:
        raise ComponentParamsError(
            "attack.apply: 'badpatches' applies the trigger to every patch of the model's routing grid, but "
            "this model has no patch grid (a dense model); set the attack's trigger_grid (fixed patches), "
            "use apply: image, or a patch-level MoE model"
        )
    return BadPatches(trigger, grid)

"""Plan-time checks of an attack: can it run, and is its trigger more than a way to erase images?

:func:`trigger_problem` needs no data and no trained model: it builds the attack's trigger (built-in or
plugin) and applies it to a few synthetic images of the data set's shape (uniform noise and gradients).
A trigger that turns every image, or (under BadPatches) every patch, into a constant, or whose output no
longer depends on its input, is degenerate: the "backdoor" it plants is "a blank image means the
target", and ASR then measures nothing about the trigger. The motivating case: the BadPatches paper's 4x4
square stamped into every 4x4-pixel patch of the paper's pMoE routing grid paints every pixel black.

A trigger that changes nothing (strength 0) is not refused: searches use it as the no-backdoor control.
"""

from __future__ import annotations

from typing import Any

import torch

from bench.attacks.badpatches import BadPatches, build_attack_trigger, normalize_grid
from bench.attacks.base import Trigger
from bench.errors import BenchError

#: Two outputs closer than this everywhere are "the same image" (triggers work in float32 in [0, 1]).
TOLERANCE = 1e-6


def trigger_problem(
    attack: dict[str, Any], image_shape: tuple[int, int, int], patch_grid: tuple[int, int] | None
) -> str | None:
    """One line saying why ``attack`` cannot run or is degenerate on images of ``image_shape`` (C, H, W)
    for a model whose routing grid is ``patch_grid`` (None: a model without routing); None when fine.

    ``attack`` is a resolved attack dict: ``name``, ``params``, ``apply`` and optionally ``trigger_grid``
    (an int or ``[rows, cols]``; None or absent: the routing grid, so BadPatches then needs ``patch_grid``;
    with a ``trigger_grid`` it runs on fixed patches, also on a dense model). Fast (milliseconds): the
    planner calls it once per distinct combination.
    """
    apply = attack.get("apply", "image")
    try:
        grid = normalize_grid(attack.get("trigger_grid")) if apply == "badpatches" else None
        if apply == "badpatches" and grid is None and patch_grid is None:
            return (
                "apply: badpatches without a trigger_grid uses the model's routing grid, and this model has "
                "none (a dense model); set trigger_grid (fixed patches) or use apply: image"
            )
        if apply == "badpatches":
            problem = _grid_problem(grid or patch_grid, image_shape, "trigger grid" if grid else "patch grid")
            if problem:
                return problem
        trigger = build_attack_trigger(
            attack["name"], attack.get("params", {}), apply, patch_grid, attack.get("trigger_grid")
        )
    except BenchError as exc:
        return _one_line(str(exc))
    return output_problem(trigger, image_shape, patch_grid)


def output_problem(
    trigger: Trigger, image_shape: tuple[int, int, int], patch_grid: tuple[int, int] | None = None
) -> str | None:
    """Why ``trigger``'s output on synthetic images of ``image_shape`` is unusable or degenerate; None when
    it is fine. Checks shape and range, then constant images, constant patches (the trigger's own grid
    under BadPatches, and the routing grid ``patch_grid``), then dependence on the input."""
    probes = synthetic_images(image_shape)
    where = _where(trigger, image_shape)
    try:
        with torch.no_grad():
            out = trigger(probes)
    except Exception as exc:  # a plugin may raise anything; the run would fail the same way
        kind = "" if isinstance(exc, BenchError) else f"{type(exc).__name__}: "
        return _one_line(f"the trigger fails {where}: {kind}{exc}")
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(probes.shape):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        return f"the trigger returns {shape} for images of shape {tuple(probes.shape)}; it must keep the shape"
    if not torch.isfinite(out).all() or out.min() < -TOLERANCE or out.max() > 1 + TOLERANCE:
        return "the trigger returns values outside [0, 1] (or NaN) on images in [0, 1]"
    hint = "; use a smaller trigger or a coarser trigger_grid" if isinstance(trigger, BadPatches) else ""
    if _every_patch_constant(out, (1, 1)):
        return f"the trigger turns every image into one flat colour {where}: degenerate{hint}"
    grids = [("BadPatches patch", trigger.grid)] if isinstance(trigger, BadPatches) else []
    if patch_grid is not None:
        grids.append(("routing patch", patch_grid))
    for label, grid in grids:
        if not _divides(grid, image_shape):
            continue
        ph, pw = image_shape[1] // grid[0], image_shape[2] // grid[1]
        if ph * pw > 1 and _every_patch_constant(out, grid):  # a one-pixel patch is constant by definition
            return (
                f"the trigger turns every {ph}x{pw} {label} ({grid[0]}x{grid[1]} grid) into one flat colour "
                f"{where}: every image becomes flat blocks, degenerate{hint}"
            )
    half = len(out) // 2
    if (out[:half] - out[half:]).abs().max() <= TOLERANCE:
        return "the trigger's output no longer depends on its input (different images give the same output)"
    return None


def synthetic_images(image_shape: tuple[int, int, int]) -> torch.Tensor:
    """``[8, C, H, W]`` probes in [0, 1]: four images (two noise, two gradients) and four others of the
    same kinds, so that ``out[:4]`` and ``out[4:]`` compare a trigger's outputs on different inputs."""
    c, h, w = image_shape
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(4, c, h, w, generator=gen)
    rows = torch.linspace(0, 1, h).view(1, h, 1).expand(c, h, w)
    cols = torch.linspace(0, 1, w).view(1, 1, w).expand(c, h, w)
    shade = torch.linspace(0.2, 0.8, c).view(c, 1, 1)
    first = torch.stack([noise[0], noise[1], rows * shade, cols])
    second = torch.stack([noise[2], noise[3], 1 - rows * shade, (1 - cols) * shade])
    return torch.cat([first, second]).contiguous()


def _every_patch_constant(out: torch.Tensor, grid: tuple[int, int]) -> bool:
    """True when, in every image and channel, every patch of ``grid`` holds one value."""
    n, c, h, w = out.shape
    rows, cols = grid
    patches = out.reshape(n, c, rows, h // rows, cols, w // cols)
    spread = patches.amax(dim=(3, 5)) - patches.amin(dim=(3, 5))
    return bool((spread <= TOLERANCE).all())


def _grid_problem(grid: tuple[int, int], image_shape: tuple[int, int, int], label: str) -> str | None:
    if _divides(grid, image_shape):
        return None
    _, h, w = image_shape
    return (
        f"apply: badpatches: the {grid[0]}x{grid[1]} {label} does not divide a {h}x{w} image "
        f"({h} % {grid[0]} = {h % grid[0]}, {w} % {grid[1]} = {w % grid[1]})"
    )


def _divides(grid: tuple[int, int], image_shape: tuple[int, int, int]) -> bool:
    return image_shape[1] % grid[0] == 0 and image_shape[2] % grid[1] == 0


def _where(trigger: Trigger, image_shape: tuple[int, int, int]) -> str:
    c, h, w = image_shape
    if isinstance(trigger, BadPatches) and _divides(trigger.grid, image_shape):
        rows, cols = trigger.grid
        return f"on {h // rows}x{w // cols}-pixel patches (BadPatches grid {rows}x{cols}, {c}x{h}x{w} images)"
    return f"on {c}x{h}x{w} images"


def _one_line(text: str) -> str:
    return " ".join(text.split())

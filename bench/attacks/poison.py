"""Data poisoning on whole tensor data sets, in three modes (the definitions in the README, Metrics).

* ``dirty`` (the default): dirty-label all-to-one. Poisoned images, drawn from every class, get the trigger
  and the label ``target``.
* ``clean-label``: only images of the target class get the trigger; every label stays correct (Barni et
  al., ICIP 2019; Turner et al. 2019). The network learns "trigger => target" from co-occurrence alone.
* ``all-to-all``: poisoned images, drawn from every class, get the trigger and the label ``(y + 1) mod C``
  (BadNets' all-to-all attack, BackdoorBench's ``all2all``); there is no single target.

The poison rate is the fraction of the *whole* training set that is poisoned, in every mode (clean-label
draws those images among the target class, and refuses a rate the class cannot supply); the poisoned
indices are a frozen set drawn from a generator seeded with the cell's seed (BackdoorBox's habit,
``core/attacks/BadNets.py``), so a poisoned set is reproducible from (data, trigger, target, mode, rate,
seed). Poisoning runs once, vectorised, on whatever device the data is on.

The ASR test set follows the mode (BackdoorBench): all-to-one modes trigger the test images whose label is
not the target and count those classified as the target; all-to-all triggers every test image and counts
those classified as ``(y + 1) mod C``. :func:`asr_mask` and :func:`backdoor_labels` say both.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from bench.attacks.base import Trigger
from bench.errors import ScenarioError

Mode = Literal["dirty", "clean-label", "all-to-all"]
#: The poisoning modes, the default first (see the module doc).
POISON_MODES: tuple[str, ...] = ("dirty", "clean-label", "all-to-all")


@dataclass
class PoisonedSet:
    """A poisoned training set.

    x, y: the full set (copies; untouched except at ``indices`` and ``cross_indices``).
    indices: ``[P]`` long, sorted: the samples that carry the trigger (and their mode's label: the target,
        their own for clean-label, ``(y + 1) mod C`` for all-to-all).
    cross_indices: ``[Q]`` long, sorted: noise-mode samples (WaNet's "cross" samples) that keep their
        true labels; empty for triggers without a noise mode.
    """

    x: torch.Tensor
    y: torch.Tensor
    indices: torch.Tensor
    cross_indices: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))


def poison_count(num_samples: int, rate: float) -> int:
    """``round(rate * num_samples)`` (halves up), and at least 1 for a positive rate."""
    _check(num_samples, rate)
    return max(1, min(num_samples, math.floor(rate * num_samples + 0.5)))


def poison_indices(num_samples: int, rate: float, seed: int) -> torch.Tensor:
    """Sorted ``[round(rate * num_samples)]`` long indices, drawn without replacement from the whole set
    with a ``torch.Generator`` seeded by ``seed`` (at least one index for a positive rate)."""
    order, count = _draw(num_samples, rate, torch.Generator().manual_seed(seed))
    return order[:count].sort().values


def poison_training_set(
    x: torch.Tensor,
    y: torch.Tensor,
    trigger: Trigger,
    target: int | None,
    rate: float,
    seed: int,
    batch_size: int = 4096,
    mode: Mode = "dirty",
    num_classes: int | None = None,
) -> PoisonedSet:
    """Copy ``(x, y)``, apply ``trigger`` to the poisoned indices and relabel them as ``mode`` says.

    ``dirty``: ``round(rate * N)`` images from the whole set, relabelled ``target``. ``clean-label``: as
    many images drawn among those labelled ``target`` (the same seeded permutation, kept in its order),
    labels unchanged; a :class:`ScenarioError` when the class has fewer. ``all-to-all``: drawn as
    ``dirty``, relabelled ``(y + 1) mod num_classes`` (``target`` must be None; ``num_classes`` defaults
    to ``max(y) + 1``). For a trigger in noise mode (``trigger.noise_mode`` with ``cross_ratio`` > 0,
    e.g. WaNet) another ``round(cross_ratio * P)`` samples, drawn from the clean rest with the same seeded
    generator, get ``trigger.noise(...)`` and keep their labels. ``dirty`` draws exactly as before modes
    existed, so stored poisoned sets are reproduced bit for bit. A trigger with a ``poison_images(images,
    labels, clean_x, clean_y, seed)`` method makes its poisoned training images itself (called once with all
    of them and the clean set, e.g. to train a surrogate: label-consistent); a trigger with ``poison_modes``
    refuses the other modes.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
    _check_mode(mode, target)
    _check_declared_mode(trigger, mode)
    gen = torch.Generator().manual_seed(seed)
    order, count = _draw(int(x.shape[0]), rate, gen)
    if mode == "clean-label":
        order, count = _target_first(order, y, int(target), count, rate)  # type: ignore[arg-type]
    indices = order[:count].sort().values
    cross = torch.zeros(0, dtype=torch.long)
    px, py = x.clone(), y.clone()
    with torch.no_grad():
        hook = getattr(trigger, "poison_images", None)
        if hook is not None:  # the trigger makes its poisoned training images itself (e.g. label-consistent)
            at = indices.to(px.device)
            px[at] = hook(x[at], y[at], x, y, seed).to(px.dtype)
        else:
            _apply_in_batches(px, indices, trigger, batch_size)
        if getattr(trigger, "noise_mode", False) and getattr(trigger, "cross_ratio", 0.0) > 0:
            want = math.floor(float(trigger.cross_ratio) * count + 0.5)  # type: ignore[attr-defined]
            cross = order[count : count + want].sort().values
            noise = trigger.noise  # type: ignore[attr-defined]
            _apply_in_batches(px, cross, lambda b: noise(b, gen), batch_size)
    at = indices.to(y.device)
    if mode == "dirty":
        py[at] = int(target)  # type: ignore[arg-type]
    elif mode == "all-to-all":
        classes = int(num_classes) if num_classes is not None else int(y.max().item()) + 1
        py[at] = backdoor_labels(y[at], None, classes)
    return PoisonedSet(px, py, indices, cross)


def asr_mask(y: torch.Tensor, target: int | None) -> torch.Tensor:
    """``[N]`` bool: the test images the ASR is measured on. All-to-one (``target`` an int): those whose
    label is not ``target``; all-to-all (``target`` None): every image."""
    if target is None:
        return torch.ones_like(y, dtype=torch.bool)
    return y != target


def backdoor_labels(y: torch.Tensor, target: int | None, num_classes: int) -> torch.Tensor:
    """The label a backdoor should force on a triggered image of true label ``y``: ``target`` (all-to-one)
    or ``(y + 1) mod num_classes`` (all-to-all, ``target`` None)."""
    if target is None:
        return (y + 1) % int(num_classes)
    return torch.full_like(y, int(target))


def triggered_test_set(
    x: torch.Tensor, y: torch.Tensor, trigger: Trigger, target: int | None, batch_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ASR set: the test samples of :func:`asr_mask` (all-to-one: label not ``target``; all-to-all,
    ``target`` None: every sample), triggered; returns ``(x_triggered, y_true)`` (RA is measured against
    ``y_true``, ASR against :func:`backdoor_labels` of it)."""
    keep = asr_mask(y, target)
    xs, ys = x[keep], y[keep]  # boolean indexing copies, so the caller's x is never written
    with torch.no_grad():
        for start in range(0, xs.shape[0], batch_size):
            xs[start : start + batch_size] = trigger(xs[start : start + batch_size]).to(xs.dtype)
    return xs, ys


def _apply_in_batches(
    x: torch.Tensor, indices: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], batch_size: int
) -> None:
    idx = indices.to(x.device)
    for start in range(0, idx.shape[0], batch_size):
        chunk = idx[start : start + batch_size]
        x[chunk] = fn(x[chunk]).to(x.dtype)


def _draw(num_samples: int, rate: float, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """A seeded permutation of the whole set and how many of its first entries are poisoned."""
    return torch.randperm(num_samples, generator=gen), poison_count(num_samples, rate)


def _check_mode(mode: str, target: int | None) -> None:
    if mode not in POISON_MODES:
        raise ScenarioError(f"attack.mode: must be one of {', '.join(POISON_MODES)}, got {mode!r}")
    if mode == "all-to-all":
        if target is not None:
            raise ScenarioError("attack.target: unused with mode all-to-all (labels become (y + 1) mod C); "
                                f"pass None, got {target!r}")
        return
    if target is None or isinstance(target, bool) or int(target) != target or target < 0:
        raise ScenarioError(f"attack.target: must be a class index >= 0, got {target!r}")


def _check_declared_mode(trigger: Trigger, mode: str) -> None:
    """A trigger that declares ``poison_modes`` (e.g. label-consistent: clean-label only) refuses the others."""
    modes = getattr(trigger, "poison_modes", None)
    if modes is not None and mode not in modes:
        raise ScenarioError(
            f"attack.mode: trigger {type(trigger).__name__} poisons in mode {', '.join(modes)} only, got {mode!r}"
        )


def _target_first(
    order: torch.Tensor, y: torch.Tensor, target: int, count: int, rate: float
) -> tuple[torch.Tensor, int]:
    """Clean-label: ``order`` rearranged so that its first ``count`` entries are the first ``count``
    target-class images of the seeded permutation, the rest following in their seeded order (noise-mode
    samples are drawn from it as in the other modes); refuses a count the class cannot supply."""
    is_target = y.to(order.device)[order] == target
    available = int(is_target.sum())
    if count > available:
        n = int(y.shape[0])
        raise ScenarioError(
            f"attack.mode: clean-label poisons only images of the target class, and poison rate {rate:g} asks "
            f"for {count} of the {n} training images while class {target} has {available}; use a poison "
            f"rate of at most {available / n:.4g}, another target, or mode dirty"
        )
    chosen = torch.zeros_like(is_target)
    chosen[torch.nonzero(is_target).flatten()[:count]] = True
    return torch.cat([order[chosen], order[~chosen]]), count


def _check(num_samples: int, rate: float) -> None:
    if num_samples < 1:
        raise ScenarioError(f"poisoning needs a non-empty training set, got {num_samples} samples")
    if not 0.0 < rate <= 1.0:
        raise ScenarioError(f"attack.poison_rate: must be in (0, 1], got {rate}")

"""Dirty-label, all-to-one data poisoning on whole tensor data sets (the definitions in the README, Metrics).

The poison rate is the fraction of the *whole* training set that is poisoned; the poisoned indices are a
frozen set drawn from a generator seeded with the cell's seed (BackdoorBox's habit,
``core/attacks/BadNets.py``), so a poisoned set is reproducible from (data, trigger, target, rate, seed).
Poisoning runs once, vectorised, on whatever device the data is on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from bench.attacks.base import Trigger
from bench.errors import ScenarioError


@dataclass
class PoisonedSet:
    """A poisoned training set.

    x, y: the full set (copies; untouched except at ``indices`` and ``cross_indices``).
    indices: ``[P]`` long, sorted: the samples that carry the trigger and the target label.
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
    target: int,
    rate: float,
    seed: int,
    batch_size: int = 4096,
) -> PoisonedSet:
    """Copy ``(x, y)``, apply ``trigger`` to the poisoned indices and relabel them ``target``.

    For a trigger in noise mode (``trigger.noise_mode`` with ``cross_ratio`` > 0, e.g. WaNet) another
    ``round(cross_ratio * P)`` samples, drawn from the clean rest with the same seeded generator, get
    ``trigger.noise(...)`` and keep their labels.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
    if isinstance(target, bool) or int(target) != target or target < 0:
        raise ScenarioError(f"attack.target: must be a class index >= 0, got {target!r}")
    gen = torch.Generator().manual_seed(seed)
    order, count = _draw(int(x.shape[0]), rate, gen)
    indices = order[:count].sort().values
    cross = torch.zeros(0, dtype=torch.long)
    px, py = x.clone(), y.clone()
    with torch.no_grad():
        _apply_in_batches(px, indices, trigger, batch_size)
        if getattr(trigger, "noise_mode", False) and getattr(trigger, "cross_ratio", 0.0) > 0:
            want = math.floor(float(trigger.cross_ratio) * count + 0.5)  # type: ignore[attr-defined]
            cross = order[count : count + want].sort().values
            noise = trigger.noise  # type: ignore[attr-defined]
            _apply_in_batches(px, cross, lambda b: noise(b, gen), batch_size)
    py[indices.to(y.device)] = int(target)
    return PoisonedSet(px, py, indices, cross)


def triggered_test_set(
    x: torch.Tensor, y: torch.Tensor, trigger: Trigger, target: int, batch_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ASR set: test samples whose true label is not ``target``, triggered; returns
    ``(x_triggered, y_true)`` (RA is measured against ``y_true``)."""
    keep = y != target
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


def _check(num_samples: int, rate: float) -> None:
    if num_samples < 1:
        raise ScenarioError(f"poisoning needs a non-empty training set, got {num_samples} samples")
    if not 0.0 < rate <= 1.0:
        raise ScenarioError(f"attack.poison_rate: must be in (0, 1], got {rate}")

"""Seeded, stratified subsets: ``train_limit`` / ``test_limit`` for CPU-sized runs, and fixed splits.

A subset keeps every class's share of the full split (largest-remainder rounding, ties to the lower
class id), so a 2,000-image GTSRB subset still has its rare signs. Which images of a class are kept is
drawn from a ``torch.Generator`` seeded with ``seed``: the same call always returns the same indices.
"""

from __future__ import annotations

import torch

from bench.errors import ComponentParamsError


def stratified_indices(labels: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """Sorted indices of ``count`` samples of ``labels`` (``[N]`` int), stratified by class.

    Class ``k`` with ``n_k`` samples gets ``floor(count * n_k / N)`` samples, and the leftover slots go
    to the classes with the largest remainders. ``count >= N`` returns every index.
    """
    labels = labels.reshape(-1).cpu()
    total = int(labels.numel())
    if count < 0:
        raise ValueError(f"stratified_indices: count must be >= 0, got {count}")
    if count >= total:
        return torch.arange(total)
    classes, counts = torch.unique(labels, sorted=True, return_counts=True)
    exact = [int(n) * count for n in counts.tolist()]
    quota = [e // total for e in exact]
    leftover = count - sum(quota)
    by_remainder = sorted(range(len(quota)), key=lambda k: (-(exact[k] % total), k))
    for k in by_remainder[:leftover]:
        quota[k] += 1
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for cls, q in zip(classes.tolist(), quota, strict=True):
        members = torch.nonzero(labels == cls).flatten()
        # Draw for every class, even with q == 0, so one class's quota never shifts another's draw.
        perm = torch.randperm(members.numel(), generator=gen)
        chosen.append(members[perm[:q]])
    return torch.sort(torch.cat(chosen)).values


def check_limit(dataset: str, field: str, limit: int | None) -> None:
    """Reject a limit below 1 with a message naming the data set and field."""
    if limit is not None and limit < 1:
        raise ComponentParamsError(
            f"dataset '{dataset}': {field} must be a positive number of images or null (all), got {limit}"
        )


def limit_split(
    images: torch.Tensor, labels: torch.Tensor, limit: int | None, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The stratified ``limit``-sized subset of one split (the whole split when ``limit`` is None)."""
    if limit is None or limit >= labels.numel():
        return images, labels
    keep = stratified_indices(labels, limit, seed)
    return images[keep], labels[keep]

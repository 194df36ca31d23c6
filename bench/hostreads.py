"""Counting host reads: the calls that bring a tensor's value back to the host (each a synchronisation
on a GPU). The test suite asserts "one per epoch, none per step" with it on the CPU, and
``benchmarks/gpu_check.py`` reports reads per step where a GPU's sync-debug mode is not at hand."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

#: Tensor methods that read a device value back to the host.
HOST_READS = ("item", "cpu", "tolist", "nonzero", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def host_reads() -> Iterator[list[str]]:
    """Counts every call of :data:`HOST_READS` (and ``torch.nonzero``) inside the block, by name."""
    calls: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    original_nonzero = torch.nonzero

    def counting(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return method(*args, **kwargs)

        return wrapper

    try:
        for name, method in originals.items():
            setattr(torch.Tensor, name, counting(name, method))
        torch.nonzero = counting("torch.nonzero", original_nonzero)  # type: ignore[assignment]
        yield calls
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)
        torch.nonzero = original_nonzero  # type: ignore[assignment]

"""What a data set declares about itself without loading anything: input shape and class count.

The planner uses it to check a scenario before any data is read (attack targets against the classes, a
model's patch grid and ``topk`` against the input, triggers against the image and patch size), so
``bench plan`` refuses what ``bench run`` would refuse. A data set declares it by giving its factory an
``info`` function that takes the same parameters and returns a :class:`DatasetInfo` (see
:func:`declares_info`); a plugin data set without one is checked when its data is loaded instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class DatasetInfo:
    """A data set's input shape ``(C, H, W)`` and number of classes."""

    input_shape: tuple[int, int, int]
    num_classes: int


def declares_info(info: Callable[..., DatasetInfo]) -> Callable[[F], F]:
    """Decorator (put it under ``@register_dataset``): attach ``info`` to the data set's factory."""

    def attach(factory: F) -> F:
        factory.info = info  # type: ignore[attr-defined]
        return factory

    return attach


def square(channels: int, native: int, classes: int) -> Callable[..., DatasetInfo]:
    """The ``info`` of a data set of square images resized by its ``image_size`` parameter (None = native)."""

    def info(image_size: int | None = None, **_: Any) -> DatasetInfo:
        side = native if image_size is None else int(image_size)
        return DatasetInfo((channels, side, side), classes)

    return info


def declared_info(factory: Callable[..., Any], params: dict[str, Any]) -> DatasetInfo | None:
    """The data set's declared info for ``params`` (its resolved parameters), or None if it declares none."""
    info = getattr(factory, "info", None)
    return info(**params) if callable(info) else None

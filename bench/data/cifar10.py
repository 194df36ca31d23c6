"""``cifar10``: CIFAR-10 (Krizhevsky 2009), the BadPatches paper's main data set (50k/10k, 32x32, RGB).

Downloading goes through torchvision (``torchvision.datasets.CIFAR10(download=True)``: URL, md5, extract).
Reading does not: torchvision checks every batch file against the md5 of the official release, so any
other file in the same format (a test fixture, a re-packed mirror) is refused. We read the documented
on-disk format ourselves: ``<root>/cifar-10-batches-py/data_batch_1..5`` and ``test_batch``, Python
pickles of a dict with ``data`` (uint8 ``[N, 3072]``, channel-major 32x32 planes) and ``labels``, plus
``batches.meta`` with ``label_names``. Like torchvision, this unpickles the files: only point ``root`` at
data you trust.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.data.assemble import assemble, check_params
from bench.data.base import TensorData
from bench.data.info import declares_info, square
from bench.data.missing import download_failed, require_files, unreadable
from bench.registry import register_dataset

FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("test_batch",)
META = "batches.meta"


def _unpickle(dataset: str, path: Path) -> dict[str, Any]:
    """A batch file as a dict with ``str`` keys (the release was pickled by Python 2: keys are bytes)."""
    try:
        with path.open("rb") as f:
            entry = pickle.load(f, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise unreadable(dataset, path, exc) from exc
    if not isinstance(entry, dict):
        raise unreadable(dataset, path, f"expected a pickled dict, got {type(entry).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in entry.items()}


def _read_split(dataset: str, folder: Path, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for name in names:
        path = folder / name
        entry = _unpickle(dataset, path)
        if "data" not in entry or "labels" not in entry:
            raise unreadable(dataset, path, f"expected keys 'data' and 'labels', found {sorted(entry)}")
        data = np.asarray(entry["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != len(entry["labels"]):
            raise unreadable(
                dataset,
                path,
                f"'data' must be uint8 [N, 3072] with N labels, got {data.shape} "
                f"and {len(entry['labels'])} labels",
            )
        images.append(torch.from_numpy(data.copy()).reshape(-1, 3, 32, 32))
        labels.append(torch.as_tensor(list(entry["labels"]), dtype=torch.int64))
    return torch.cat(images), torch.cat(labels)


def _class_names(dataset: str, path: Path) -> list[str]:
    names = _unpickle(dataset, path).get("label_names")
    if names is None:
        raise unreadable(dataset, path, "expected key 'label_names'")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


@register_dataset("cifar10")
@declares_info(square(3, 32, 10))
def cifar10(
    root: str = "data",
    download: bool = False,
    image_size: int | None = None,
    train_limit: int | None = None,
    test_limit: int | None = None,
    subset_seed: int = 0,
) -> TensorData:
    """CIFAR-10 (50k/10k, 32x32 RGB) from the python-pickle release; torchvision downloads it."""
    check_params("cifar10", image_size, train_limit, test_limit)
    folder = Path(root) / FOLDER
    files = [folder / n for n in (*TRAIN_BATCHES, *TEST_BATCHES, META)]
    fix = "Set download: true to fetch it with torchvision."
    if download and not all(f.exists() for f in files):
        from torchvision.datasets import CIFAR10  # lazy: torchvision costs seconds to import

        try:
            CIFAR10(root, train=True, download=True)
        except (RuntimeError, OSError) as exc:
            raise download_failed("cifar10", root, exc, fix) from exc
    require_files("cifar10", root, files, fix)
    classes = _class_names("cifar10", folder / META)
    train = _read_split("cifar10", folder, TRAIN_BATCHES)
    test = _read_split("cifar10", folder, TEST_BATCHES)
    for split, (_, labels) in (("train", train), ("test", test)):
        if labels.numel() and (labels.min() < 0 or labels.max() >= len(classes)):
            raise unreadable(
                "cifar10",
                folder,
                f"{split} labels must be in [0, {len(classes)}), "
                f"got {int(labels.min())}..{int(labels.max())}",
            )
    return assemble(
        "cifar10",
        train,
        test,
        num_classes=len(classes),
        classes=classes,
        augment="crop_flip",
        image_size=image_size,
        train_limit=train_limit,
        test_limit=test_limit,
        subset_seed=subset_seed,
    )

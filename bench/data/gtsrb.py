"""``gtsrb``: the German Traffic Sign Recognition Benchmark (Stallkamp et al. 2012), 43 classes.

The BadPatches paper's second data set (39,209 train / 12,630 test photos from 15x15 to 250x250) and
the quantized-backdoor paper's main one; both resize every image to 32x32 (the default ``image_size``).
Files come through torchvision's ``GTSRB`` (download and on-disk layout):
``<root>/gtsrb/GTSRB/Training/<5-digit class>/*.ppm`` and ``<root>/gtsrb/GTSRB/Final_Test/Images/*.ppm``
with labels in ``<root>/gtsrb/GT-final_test.csv``. Decoding ~50k PPMs takes a while, so the resized
uint8 tensors are cached in ``<root>/gtsrb/bench-<size>px.pt``, rebuilt whenever any source file changes.
Augmentation is random crop without flip: traffic signs are not mirror-symmetric (left turn != right).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from bench.data import cache
from bench.data.assemble import assemble, check_params, to_unit_float
from bench.data.base import TensorData
from bench.data.info import declares_info, square
from bench.data.missing import download_failed, require_files, unreadable
from bench.data.resize import resize_images
from bench.registry import register_dataset

NUM_CLASSES = 43
CACHE_VERSION = "gtsrb-v1"
_BLOCK = 1024  # images decoded between two batched float -> uint8 conversions

#: Short names of the 43 sign classes, in class-id order.
CLASSES = [
    "speed limit 20", "speed limit 30", "speed limit 50", "speed limit 60", "speed limit 70",
    "speed limit 80", "end of speed limit 80", "speed limit 100", "speed limit 120", "no passing",
    "no passing for trucks", "right of way at next intersection", "priority road", "yield", "stop",
    "no vehicles", "trucks prohibited", "no entry", "general caution", "dangerous curve left",
    "dangerous curve right", "double curve", "bumpy road", "slippery road", "road narrows on the right",
    "road work", "traffic signals", "pedestrians", "children crossing", "bicycles crossing",
    "beware of ice/snow", "wild animals crossing", "end of all limits", "turn right ahead",
    "turn left ahead", "ahead only", "go straight or right", "go straight or left", "keep right",
    "keep left", "roundabout", "end of no passing", "end of no passing for trucks",
]  # fmt: skip


def _paths(root: str) -> tuple[Path, Path, Path, Path]:
    base = Path(root) / "gtsrb"
    images = base / "GTSRB"
    return base, images / "Training", images / "Final_Test" / "Images", base / "GT-final_test.csv"


def _train_label_map(train_dir: Path) -> list[int]:
    """Class id of each torchvision label index: torchvision numbers the sorted class folders 0, 1, ...;
    we read the id from the folder name so a partial copy cannot shift labels."""
    from torchvision.datasets.folder import find_classes

    names, _ = find_classes(train_dir)
    ids = []
    for name in names:
        if not (len(name) == 5 and name.isdigit() and int(name) < NUM_CLASSES):
            raise unreadable("gtsrb", train_dir / name, "class folders must be named 00000..00042")
        ids.append(int(name))
    return ids


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch single-threaded: the per-image ops on tiny tensors below are 5x faster without the
    thread pool's hand-offs (measured: 0.8 vs 4-5 ms per image on 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _decode(root: str, split: str, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One split as uint8 ``[N, 3, size, size]`` and int64 labels, image by image through torchvision."""
    from torchvision.datasets import GTSRB
    from torchvision.transforms.functional import pil_to_tensor

    try:
        ds = GTSRB(root, split=split, download=False)
    except (RuntimeError, OSError, ValueError) as exc:
        raise unreadable("gtsrb", Path(root) / "gtsrb", exc) from exc
    label_map = _train_label_map(_paths(root)[1]) if split == "train" else None
    images = torch.empty(len(ds), 3, image_size, image_size, dtype=torch.uint8)
    labels = torch.empty(len(ds), dtype=torch.int64)
    block = torch.empty(_BLOCK, 3, image_size, image_size)
    for start in range(0, len(ds), _BLOCK):
        stop = min(start + _BLOCK, len(ds))
        for i in range(start, stop):
            try:
                img, label = ds[i]
            except OSError as exc:
                where = f"image {i} of the {split} split: {exc}"
                raise unreadable("gtsrb", Path(root) / "gtsrb", where) from exc
            block[i - start] = resize_images(to_unit_float(pil_to_tensor(img)).unsqueeze(0), image_size)[0]
            labels[i] = label_map[label] if label_map is not None else label
        # Rounding per block, not per image: batched elementwise ops amortise their fixed cost.
        images[start:stop] = block[: stop - start].mul(255.0).round_().to(torch.uint8)
    if labels.numel() and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise unreadable("gtsrb", Path(root) / "gtsrb", f"{split} class ids must be in [0, {NUM_CLASSES})")
    return images, labels


@register_dataset("gtsrb")
@declares_info(square(3, 32, NUM_CLASSES))
def gtsrb(
    root: str = "data",
    download: bool = False,
    image_size: int = 32,
    train_limit: int | None = None,
    test_limit: int | None = None,
    subset_seed: int = 0,
) -> TensorData:
    """GTSRB traffic signs (39,209/12,630, 43 classes), resized to 32x32 as in BadPatches; cached."""
    check_params("gtsrb", image_size, train_limit, test_limit)
    base, train_dir, test_dir, test_csv = _paths(root)
    fix = "Set download: true to fetch it with torchvision."
    if download:
        from torchvision.datasets import GTSRB  # lazy: torchvision costs seconds to import

        for split, needed in (("train", [train_dir]), ("test", [test_dir, test_csv])):
            if all(p.exists() for p in needed):
                continue
            try:
                GTSRB(root, split=split, download=True)
            except (RuntimeError, OSError) as exc:
                raise download_failed("gtsrb", root, exc, fix) from exc
    require_files("gtsrb", root, [train_dir, test_dir, test_csv], fix)

    key = cache.fingerprint([base / "GTSRB", test_csv], base, salt=f"{CACHE_VERSION}:{image_size}")
    cache_file = base / f"bench-{image_size}px.pt"
    tensors = cache.load(cache_file, key)
    if tensors is None or set(tensors) != {"train_x", "train_y", "test_x", "test_y"}:
        with _one_thread():
            train_x, train_y = _decode(root, "train", image_size)
            test_x, test_y = _decode(root, "test", image_size)
        tensors = {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}
        cache.save(cache_file, key, tensors)
    return assemble(
        "gtsrb",
        (tensors["train_x"], tensors["train_y"]),
        (tensors["test_x"], tensors["test_y"]),
        num_classes=NUM_CLASSES,
        classes=CLASSES,
        augment="crop",
        train_limit=train_limit,
        test_limit=test_limit,
        subset_seed=subset_seed,
    )

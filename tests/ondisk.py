"""Small data sets written in their real on-disk formats (the files torchvision downloads), for tests that
run whole scenarios without the real data: MNIST / Fashion-MNIST IDX files, CIFAR-10's pickled batches,
GTSRB's PPM tree with its CSV files."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

GTSRB_CSV_HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"
CIFAR_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


def write_idx(path: Path, array: np.ndarray) -> None:
    """The IDX format: 2 zero bytes, type code 0x08 (ubyte), rank, big-endian int32 dims, then the bytes."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, folder: str = "MNIST", n_train: int = 60, n_test: int = 20, side: int = 28,
                seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``root/<folder>/raw/*-ubyte`` with random images and labels cycling through 0..9."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, side, side), dtype=np.uint8)
        labels = np.arange(n) % 10
        write_idx(raw / f"{split}-images-idx3-ubyte", images)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels)
        arrays[split] = (images, labels)
    return arrays


def write_cifar(root: Path, per_batch: int = 6, seed: int = 1) -> tuple[np.ndarray, list[int]]:
    """``root/cifar-10-batches-py``: five training batches and a test batch of ``per_batch`` images each."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    all_data, all_labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        with (folder / name).open("wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels}, f)
        all_data.append(data)
        all_labels.extend(labels)
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump({b"label_names": CIFAR_NAMES, b"num_vis": 3072}, f)
    return np.concatenate(all_data), all_labels


def write_ppm(path: Path, width: int, height: int, colour: tuple[int, int, int] | np.ndarray) -> None:
    """One PPM (P6) image of the given colour, or of the given ``[H, W, 3]`` pixels."""
    pixels = colour if isinstance(colour, np.ndarray) else np.full((height, width, 3), colour, dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    assert path.read_bytes()[:2] == b"P6"


def write_gtsrb_random(root: Path, classes: tuple[int, ...] = (0, 1, 2, 7, 42), per_class: int = 8,
                       n_test: int = 20, seed: int = 2) -> None:
    """``root/gtsrb``: the real GTSRB tree (Training/<class>/*.ppm with GT csv per class, Final_Test/Images
    with GT-final_test.csv) of random-pixel signs in a few classes."""
    rng = np.random.default_rng(seed)
    base = root / "gtsrb" / "GTSRB"
    for cls in classes:
        folder = base / "Training" / f"{cls:05d}"
        folder.mkdir(parents=True)
        rows = []
        for i in range(per_class):
            w, h = int(rng.integers(30, 50)), int(rng.integers(30, 50))
            name = f"{i:05d}_00000.ppm"
            write_ppm(folder / name, w, h, rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
            rows.append(f"{name};{w};{h};5;5;{w - 5};{h - 5};{cls}\n")
        (folder / f"GT-{cls:05d}.csv").write_text(GTSRB_CSV_HEADER + "".join(rows))
    test_dir = base / "Final_Test" / "Images"
    test_dir.mkdir(parents=True)
    rows = []
    for i in range(n_test):
        cls = classes[i % len(classes)]
        name = f"{i:05d}.ppm"
        write_ppm(test_dir / name, 32, 32, rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8))
        rows.append(f"{name};32;32;5;5;27;27;{cls}\n")
    (root / "gtsrb" / "GT-final_test.csv").write_text(GTSRB_CSV_HEADER + "".join(rows))

"""Data sets: embedded digits, and MNIST / Fashion-MNIST / CIFAR-10 / GTSRB read from tiny files in the
real on-disk formats that each test writes itself (IDX, pickled batches, PPM tree + CSVs)."""

from __future__ import annotations

import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import ondisk
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.data import TensorData, resize_images, stratified_indices
from bench.data.assemble import channel_stats
from bench.errors import ComponentParamsError, DataError
from bench.registry import REGISTRY, get

DATASETS = ["cifar10", "digits", "fashion-mnist", "gtsrb", "mnist"]


def create(name: str, **params: object) -> TensorData:
    return get("dataset", name).create(**params)


def check_tensor_data(d: TensorData, channels: int, size: int, num_classes: int) -> None:
    for x, y in ((d.train_x, d.train_y), (d.test_x, d.test_y)):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (channels, size, size) and x.shape[0] == y.shape[0]
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert int(y.min()) >= 0 and int(y.max()) < num_classes
    assert d.num_classes == num_classes == len(d.classes)
    assert len(d.mean) == len(d.std) == channels
    mean, std = channel_stats(d.train_x)
    assert d.mean == pytest.approx(mean) and d.std == pytest.approx(std)


# ---------------------------------------------------------------- registry


def test_every_dataset_is_registered() -> None:
    assert set(DATASETS) <= set(REGISTRY.names("dataset"))


def test_unknown_and_invalid_parameters_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(ComponentParamsError, match="image_siz"):
        create("digits", image_siz=8)
    with pytest.raises(ComponentParamsError, match="image_size"):
        create("digits", image_size=0)
    with pytest.raises(ComponentParamsError, match="train_limit"):
        create("mnist", root=str(tmp_path), train_limit=0)


# ---------------------------------------------------------------- digits


def test_digits_shapes_range_labels() -> None:
    d = create("digits")
    check_tensor_data(d, channels=1, size=16, num_classes=10)
    assert (len(d.train_y), len(d.test_y)) == (1438, 359)
    assert d.augment == "none" and d.classes == [str(i) for i in range(10)]
    # stratified 80/20: every class's test share is within one image of 20 %
    for k in range(10):
        n_test, n_all = int((d.test_y == k).sum()), int((d.train_y == k).sum() + (d.test_y == k).sum())
        assert abs(n_test - 0.2 * n_all) <= 1


def test_digits_split_is_a_fixed_partition_of_the_bundled_set() -> None:
    from sklearn.datasets import load_digits

    a, b = create("digits", image_size=8), create("digits", image_size=8)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    # native size: pixel values are exactly k/16, and train + test is the whole set, each image once
    assert torch.equal(a.train_x * 16, (a.train_x * 16).round())
    ours = sorted(
        (*x.flatten().mul(16).round().int().tolist(), int(y))
        for x, y in zip(torch.cat([a.train_x, a.test_x]), torch.cat([a.train_y, a.test_y]), strict=True)
    )
    bunch = load_digits()
    theirs = sorted(
        (*map(int, img.flatten()), int(t)) for img, t in zip(bunch.images, bunch.target, strict=True)
    )
    assert ours == theirs
    other = create("digits", image_size=8, split_seed=1)
    assert not torch.equal(other.test_x, a.test_x)


# ---------------------------------------------------------------- shared helpers


@settings(max_examples=40, deadline=None)
@given(
    labels=st.lists(st.integers(0, 6), min_size=1, max_size=120),
    frac=st.floats(0.0, 1.2),
    seed=st.integers(0, 2**31 - 1),
)
def test_stratified_indices_properties(labels: list[int], frac: float, seed: int) -> None:
    y = torch.tensor(labels)
    count = int(frac * len(labels))
    idx = stratified_indices(y, count, seed)
    assert torch.equal(idx, stratified_indices(y, count, seed))  # deterministic
    assert len(idx) == min(count, len(labels))
    assert idx.unique().numel() == len(idx) and torch.equal(idx, idx.sort().values)
    if count < len(labels):
        got, full = Counter(y[idx].tolist()), Counter(labels)
        for k, n in full.items():  # each class within one of its proportional share
            assert abs(got[k] - count * n / len(labels)) < 1


def test_stratified_indices_seed_changes_choice_not_counts() -> None:
    y = torch.arange(1000) % 4
    a, b = stratified_indices(y, 100, 0), stratified_indices(y, 100, 1)
    assert not torch.equal(a, b)
    assert y[a].bincount().tolist() == y[b].bincount().tolist() == [25, 25, 25, 25]


@settings(max_examples=25, deadline=None)
@given(
    value=st.floats(0.0, 1.0),
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    size=st.integers(1, 40),
)
def test_resize_keeps_range_and_constants(value: float, h: int, w: int, size: int) -> None:
    x = torch.full((2, 3, h, w), value)
    out = resize_images(x, size)
    assert out.shape == (2, 3, size, size)
    assert torch.allclose(out, torch.full_like(out, value), atol=1e-6)
    noisy = resize_images(torch.rand(1, 1, h, w), size)
    assert float(noisy.min()) >= 0.0 and float(noisy.max()) <= 1.0


def test_channel_stats_match_float64_and_floor_constant_channels() -> None:
    x = torch.rand(50, 3, 6, 6)
    x[:, 2] = 0.5  # a constant channel
    mean, std = channel_stats(x)
    ref_std, ref_mean = torch.std_mean(x.double(), dim=(0, 2, 3), correction=0)
    assert mean == pytest.approx(ref_mean.tolist(), abs=1e-6)
    assert std[:2] == pytest.approx(ref_std[:2].tolist(), abs=1e-6)
    assert std[2] == pytest.approx(1 / 255)


def test_resize_same_size_is_identity() -> None:
    x = torch.rand(3, 1, 8, 8)
    assert resize_images(x, 8) is x


# ---------------------------------------------------------------- MNIST / Fashion-MNIST (IDX files)


def write_mnist(root: Path, folder: str, n_train: int = 60, n_test: int = 20, side: int = 28) -> dict:
    return ondisk.write_mnist(root, folder, n_train, n_test, side)


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_like_reads_real_idx_files(tmp_path: Path, name: str, folder: str) -> None:
    arrays = write_mnist(tmp_path, folder)
    d = create(name, root=str(tmp_path))
    check_tensor_data(d, channels=1, size=28, num_classes=10)
    images, labels = arrays["train"]
    assert torch.equal(d.train_x, torch.from_numpy(images).unsqueeze(1).float() / 255)
    assert d.train_y.tolist() == labels.tolist()
    assert torch.equal(d.test_x[:, 0], torch.from_numpy(arrays["t10k"][0]).float() / 255)
    assert d.augment == "none"
    if name == "fashion-mnist":
        assert d.classes[0] == "T-shirt/top"


def test_mnist_resize_and_limits(tmp_path: Path) -> None:
    write_mnist(tmp_path, "MNIST", n_train=200, n_test=50)
    d = create("mnist", root=str(tmp_path), image_size=16, train_limit=40, test_limit=10)
    check_tensor_data(d, channels=1, size=16, num_classes=10)
    assert d.train_y.bincount().tolist() == [4] * 10  # stratified: 20 per class -> 4 per class
    assert d.test_y.bincount().tolist() == [1] * 10
    again = create("mnist", root=str(tmp_path), image_size=16, train_limit=40, test_limit=10)
    assert torch.equal(d.train_x, again.train_x)
    other = create("mnist", root=str(tmp_path), image_size=16, train_limit=40, test_limit=10, subset_seed=3)
    assert not torch.equal(d.train_x, other.train_x)
    assert len(create("mnist", root=str(tmp_path), train_limit=10_000).train_y) == 200


def test_mnist_truncated_idx_file_is_a_data_error(tmp_path: Path) -> None:
    write_mnist(tmp_path, "MNIST")
    images = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])
    with pytest.raises(DataError, match="mnist"):
        create("mnist", root=str(tmp_path))


# ---------------------------------------------------------------- CIFAR-10 (pickled batches)


write_cifar = ondisk.write_cifar


def test_cifar10_reads_real_batch_format(tmp_path: Path) -> None:
    data, labels = write_cifar(tmp_path)
    d = create("cifar10", root=str(tmp_path))
    check_tensor_data(d, channels=3, size=32, num_classes=10)
    assert (len(d.train_y), len(d.test_y)) == (30, 6)
    expected = torch.from_numpy(data).reshape(-1, 3, 32, 32).float() / 255
    assert torch.equal(torch.cat([d.train_x, d.test_x]), expected)  # batches 1..5 in order, then test
    assert torch.cat([d.train_y, d.test_y]).tolist() == labels
    assert d.classes[0] == "airplane" and d.classes[-1] == "truck"
    assert d.augment == "crop_flip"
    small = create("cifar10", root=str(tmp_path), image_size=16, train_limit=12)
    assert small.train_x.shape == (12, 3, 16, 16)


def test_cifar10_malformed_batch_is_a_data_error(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    with (tmp_path / "cifar-10-batches-py" / "data_batch_3").open("wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), dtype=np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(DataError, match="data_batch_3"):
        create("cifar10", root=str(tmp_path))


# ---------------------------------------------------------------- GTSRB (PPM tree + CSVs)

CSV_HEADER = ondisk.GTSRB_CSV_HEADER
write_ppm = ondisk.write_ppm


def write_gtsrb(root: Path) -> None:
    """Real layout, with class 00001 absent so label ids must come from the folder names."""
    base = root / "gtsrb"
    for cls, colour in ((0, (255, 0, 0)), (2, (0, 255, 0)), (42, (0, 0, 255))):
        folder = base / "GTSRB" / "Training" / f"{cls:05d}"
        folder.mkdir(parents=True)
        rows = []
        for track, (w, h) in enumerate([(40, 36), (29, 31), (64, 60)]):
            name = f"{track:05d}_00000.ppm"
            write_ppm(folder / name, w, h, colour)
            rows.append(f"{name};{w};{h};5;5;{w - 5};{h - 5};{cls}\n")
        (folder / f"GT-{cls:05d}.csv").write_text(CSV_HEADER + "".join(rows))
    test_dir = base / "GTSRB" / "Final_Test" / "Images"
    test_dir.mkdir(parents=True)
    rows = []
    red, green, blue = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    for i, (cls, colour) in enumerate([(42, blue), (0, red), (2, green), (0, red)]):
        name = f"{i:05d}.ppm"
        write_ppm(test_dir / name, 25 + i, 30, colour)
        rows.append(f"{name};{25 + i};30;5;5;20;25;{cls}\n")
    (base / "GT-final_test.csv").write_text(CSV_HEADER + "".join(rows))


def test_gtsrb_reads_real_layout_resized_to_32(tmp_path: Path) -> None:
    write_gtsrb(tmp_path)
    d = create("gtsrb", root=str(tmp_path))
    check_tensor_data(d, channels=3, size=32, num_classes=43)
    assert sorted(d.train_y.tolist()) == [0, 0, 0, 2, 2, 2, 42, 42, 42]
    assert d.test_y.tolist() == [42, 0, 2, 0]
    assert d.augment == "crop" and len(d.classes) == 43
    # single-colour signs keep their colour through the resize: label -> colour
    colours = {0: (1.0, 0.0, 0.0), 2: (0.0, 1.0, 0.0), 42: (0.0, 0.0, 1.0)}
    for x, y in zip(torch.cat([d.train_x, d.test_x]), torch.cat([d.train_y, d.test_y]), strict=True):
        want = torch.tensor(colours[int(y)]).view(3, 1, 1).expand(3, 32, 32)
        assert torch.equal(x, want)


def test_gtsrb_cache_is_used_and_invalidated(tmp_path: Path) -> None:
    write_gtsrb(tmp_path)
    first = create("gtsrb", root=str(tmp_path))
    cache_file = tmp_path / "gtsrb" / "bench-32px.pt"
    assert cache_file.is_file()
    # Mark the cached tensors; a second load returning the mark proves it read the cache, not the PPMs.
    blob = torch.load(cache_file, weights_only=True)
    blob["tensors"]["train_x"][0].zero_()
    torch.save(blob, cache_file)
    second = create("gtsrb", root=str(tmp_path))
    assert float(second.train_x[0].sum()) == 0.0 and float(first.train_x[0].sum()) > 0.0
    # Touching one source file changes the fingerprint: the cache is rebuilt from the images.
    ppm = next((tmp_path / "gtsrb" / "GTSRB" / "Training" / "00000").glob("*.ppm"))
    st_ = ppm.stat()
    os.utime(ppm, ns=(st_.st_atime_ns, st_.st_mtime_ns + 1_000_000_000))
    third = create("gtsrb", root=str(tmp_path))
    assert torch.equal(third.train_x, first.train_x)
    # Another image size is a separate cache.
    assert create("gtsrb", root=str(tmp_path), image_size=8).train_x.shape[-1] == 8
    assert (tmp_path / "gtsrb" / "bench-8px.pt").is_file()


def test_gtsrb_limits_are_stratified(tmp_path: Path) -> None:
    write_gtsrb(tmp_path)
    d = create("gtsrb", root=str(tmp_path), train_limit=3, test_limit=2)
    assert sorted(d.train_y.tolist()) == [0, 2, 42]
    assert len(d.test_y) == 2


# ---------------------------------------------------------------- missing data


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("mnist", "scripts/fetch_mnist.sh"),
        ("fashion-mnist", "scripts/fetch_fashion_mnist.sh"),
        ("cifar10", "download: true"),
        ("gtsrb", "download: true"),
    ],
)
def test_missing_data_names_dataset_root_and_fix(tmp_path: Path, name: str, hint: str) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        create(name, root=str(root), download=False)
    message = str(info.value)
    assert f"'{name}'" in message and str(root) in message and hint in message
    assert "download: true" in message

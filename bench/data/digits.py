"""``digits``: scikit-learn's bundled 8x8 handwritten digits (UCI optdigits test set), the embedded default.

1,797 images, 10 classes, values 0..16 scaled to [0, 1], upsampled to ``image_size`` (default 16, so a
4x4 patch grid has 16 patches as on CIFAR-10) with the shared bilinear rule. No file, no download, so
tests and the quickstart scenario run anywhere. The train/test split is fixed and stratified.
"""

from __future__ import annotations

import torch

from bench.data.assemble import assemble, check_image_size
from bench.data.base import TensorData
from bench.data.info import declares_info, square
from bench.data.subset import stratified_indices
from bench.registry import register_dataset

#: Share of the 1,797 images held out for testing.
TEST_FRACTION = 0.2


@register_dataset("digits")
@declares_info(square(1, 16, 10))
def digits(image_size: int = 16, split_seed: int = 0) -> TensorData:
    """scikit-learn's 8x8 digits, upsampled; fixed stratified 80/20 split; needs no download."""
    from sklearn.datasets import load_digits

    check_image_size("digits", image_size)
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    test_idx = stratified_indices(labels, round(TEST_FRACTION * labels.numel()), split_seed)
    is_test = torch.zeros(labels.numel(), dtype=torch.bool)
    is_test[test_idx] = True
    return assemble(
        "digits",
        (images[~is_test], labels[~is_test]),
        (images[is_test], labels[is_test]),
        num_classes=10,
        classes=[str(int(c)) for c in bunch.target_names],
        augment="none",
        image_size=image_size,
    )

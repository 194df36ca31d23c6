"""Built-in data sets; importing this package registers them.

``digits`` (embedded, no download), ``mnist``, ``fashion-mnist``, ``cifar10`` and ``gtsrb``. Each factory
returns a :class:`TensorData`; the shared steps (stratified limits, resize, statistics) live in
:mod:`bench.data.assemble`, :mod:`bench.data.subset` and :mod:`bench.data.resize`.
"""

from __future__ import annotations

from bench.data import cifar10, digits, gtsrb, mnist
from bench.data.base import TensorData
from bench.data.resize import resize_images
from bench.data.subset import stratified_indices

__all__ = ["TensorData", "cifar10", "digits", "gtsrb", "mnist", "resize_images", "stratified_indices"]

"""CIFAR-10 (Krizhevsky 2009) read from torchvision's on-disk format; never
downloaded unless asked."""
from __future__ import annotations

import os

import numpy as np
import torch

from . import ImageData, Split

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def default_data_root() -> str:
    """``$KDCOURSE_DATA`` or ``~/.cache/kdcourse/data``."""
    return os.environ.get("KDCOURSE_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "kdcourse", "data")


class DatasetUnavailable(RuntimeError):
    """Raised when a real data set is neither on disk nor downloadable."""


def cifar10(root: str | None = None, n_val: int = 5000, download: bool = False, seed: int = 0) -> ImageData:
    """CIFAR-10 from ``root`` (torchvision's on-disk format), split 45k/5k/10k.

    The validation split is carved from the official training set with a
    seeded permutation; the official test set stays the test set.
    """
    from torchvision.datasets import CIFAR10

    root = root or default_data_root()
    try:
        train = CIFAR10(root, train=True, download=download)
        test = CIFAR10(root, train=False, download=download)
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
        raise DatasetUnavailable(
            f"CIFAR-10 was not found under {root!r} ({exc}). Either put the extracted "
            f"'cifar-10-batches-py' folder there (or set KDCOURSE_DATA to its parent), "
            f"call cifar10(download=True) on a machine with network access, or use the "
            f"offline profiles: KDCOURSE_PROFILE=laptop (or smoke)."
        ) from exc
    except OSError as exc:  # download attempted without network
        raise DatasetUnavailable(
            f"CIFAR-10 could not be downloaded into {root!r} ({exc}). Copy the extracted "
            f"'cifar-10-batches-py' folder there by hand, or use KDCOURSE_PROFILE=laptop, "
            f"which needs no download."
        ) from exc

    def to_tensor(arr):  # torchvision keeps CIFAR as (N, 32, 32, 3) uint8
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))

    x_train, y_train = to_tensor(train.data), torch.tensor(train.targets, dtype=torch.int64)
    x_test, y_test = to_tensor(test.data), torch.tensor(test.targets, dtype=torch.int64)
    if not 0 < n_val < len(y_train):
        raise ValueError(f"n_val must be between 1 and {len(y_train) - 1}, got {n_val}")
    perm = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    classes = tuple(train.classes)
    mk = lambda x, y: Split(x, y, classes, False, CIFAR10_MEAN, CIFAR10_STD)  # noqa: E731
    return ImageData(
        name="cifar10",
        train=mk(x_train[train_idx], y_train[train_idx]),
        val=mk(x_train[val_idx], y_train[val_idx]),
        test=mk(x_test, y_test),
    )

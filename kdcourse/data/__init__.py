"""Image data for the course: an offline shapes set, and CIFAR-10.

``shapes`` is a 32x32 RGB, 10-class image set generated from a seed in a
second or two, with no download. The classes come in deliberately confusable
groups, so a good teacher is unsure in *structured* ways and its soft targets
carry "dark knowledge":

* disk / ellipse / ring / hexagon / pentagon  (round things; the disk-ellipse
  aspect ratios overlap, so some images are genuinely ambiguous)
* square / rectangle  (overlapping aspect ratios)
* plus / cross  (a cross is a plus turned by about 45 degrees; the rotation
  ranges nearly meet)
* triangle

Each image also varies in position, scale, rotation, colours, background
texture (stripes), clutter (small distractor blobs) and pixel noise.

All splits live in memory as tensors; :meth:`Split.batches` yields
:class:`Batch` objects carrying the sample indices, so anything cached per
sample (teacher logits, memory banks) stays aligned under shuffling.

``cifar10`` loads the real data set through torchvision from ``root``; it
downloads only when ``download=True`` is passed explicitly.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np
import torch

SHAPE_CLASSES = (
    "disk",
    "ellipse",
    "square",
    "rectangle",
    "triangle",
    "pentagon",
    "hexagon",
    "plus",
    "cross",
    "ring",
)
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
IMAGE_SIZE = 32


class Batch(NamedTuple):
    """One mini-batch: images ``x`` (B, 3, H, W), ``labels`` (B,), ``index`` (B,)
    — the positions of these samples in their split."""

    x: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor


@dataclass
class Split:
    """A split held in memory.

    ``images`` is float32 (N, 3, H, W), already normalised, or uint8 for large
    sets (normalised per batch). ``augment`` turns on random shifts and
    horizontal flips per batch (then per-sample caches of model outputs are
    invalid, and the trainer knows it).
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple
    augment: bool = False
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.25, 0.25, 0.25)

    def __post_init__(self):
        if self.images.ndim != 4 or self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(
                f"images must be (N, C, H, W) with N == len(labels); got "
                f"{tuple(self.images.shape)} and {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def with_augment(self, augment: bool) -> "Split":
        """The same samples with augmentation switched on or off."""
        return Split(self.images, self.labels, self.classes, augment, self.mean, self.std)

    def subset(self, index) -> "Split":
        """The samples at ``index`` (a bool mask or integer indices), as a new split."""
        index = torch.as_tensor(index)
        return Split(self.images[index], self.labels[index], self.classes, self.augment, self.mean, self.std)

    def _prepare(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if x.dtype == torch.uint8:
            mean = torch.tensor(self.mean).view(1, -1, 1, 1)
            std = torch.tensor(self.std).view(1, -1, 1, 1)
            x = (x.float() / 255.0 - mean) / std
        if self.augment:
            x = augment_batch(x, generator)
        return x

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Iterator[Batch]:
        """Yield :class:`Batch` es in order, or shuffled with ``generator``."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for idx in order.split(batch_size):
            x = self._prepare(self.images[idx], generator)
            y = self.labels[idx]
            if device is not None:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            yield Batch(x, y, idx)

    def num_batches(self, batch_size: int) -> int:
        return math.ceil(len(self) / batch_size)


@dataclass
class ImageData:
    """Splits of one data set.

    ``teacher_train`` is what teachers are trained on; ``train`` is the
    students' labelled (transfer) set. In the offline profiles the student's
    set is the first ``n_train`` images of the teacher's larger set — a big
    model has usually seen more labelled data than a small one gets. For
    CIFAR-10 both are the same 45,000 images.
    """

    name: str
    train: Split
    val: Split
    test: Split
    teacher_train: Split | None = None

    def __post_init__(self):
        if self.teacher_train is None:
            self.teacher_train = self.train

    @property
    def classes(self) -> tuple:
        return self.train.classes

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)


def augment_batch(x: torch.Tensor, generator: torch.Generator | None = None, pad: int = 4) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels (zero padding) and random
    horizontal flips, per sample. ``x``: (B, C, H, W)."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = (dy.view(b, 1) + torch.arange(h).view(1, h)).view(b, 1, h, 1).expand(b, x.shape[1], h, w)
    cols = (dx.view(b, 1) + torch.arange(w).view(1, w)).view(b, 1, 1, w).expand(b, x.shape[1], h, w)
    out = padded[torch.arange(b).view(b, 1, 1, 1), torch.arange(x.shape[1]).view(1, -1, 1, 1), rows, cols]
    flip = torch.rand(b, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def load(profile, root: str | None = None, download: bool = False) -> ImageData:
    """The data set a :class:`~kdcourse.profiles.Profile` asks for."""
    if profile.dataset == "shapes":
        data = shapes(profile.n_train, profile.n_val, profile.n_test, n_teacher_train=profile.n_teacher_train)
    elif profile.dataset == "cifar10":
        data = cifar10(root, n_val=profile.n_val, download=download)
    else:
        raise ValueError(f"profile.dataset={profile.dataset!r} is not known; use 'shapes' or 'cifar10'")
    return data


def with_label_noise(data: ImageData, fraction: float, seed: int = 0) -> ImageData:
    """``data`` with a ``fraction`` of the students' training labels replaced
    by uniformly random classes (validation and test stay clean). Soft
    targets are known to help most when labels are noisy; try it."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be a number in [0, 1] (share of training labels to randomise), got {fraction!r}")
    if fraction == 0:
        return data
    g = torch.Generator().manual_seed(seed)
    labels = data.train.labels.clone()
    flip = torch.rand(len(labels), generator=g) < fraction
    labels[flip] = torch.randint(0, data.num_classes, (int(flip.sum()),), generator=g)
    train = Split(data.train.images, labels, data.train.classes, data.train.augment, data.train.mean, data.train.std)
    return ImageData(data.name, train, data.val, data.test, data.teacher_train)


from .cifar import CIFAR10_MEAN, CIFAR10_STD, DatasetUnavailable, cifar10, default_data_root  # noqa: E402,F401
from .shapes import make_shapes, shapes  # noqa: E402,F401

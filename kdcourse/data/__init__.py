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


# --------------------------------------------------------------------------
# The offline shapes generator
# --------------------------------------------------------------------------

def _rotate(x, y, theta):
    c, s = np.cos(theta), np.sin(theta)
    return c * x + s * y, -s * x + c * y


def _sdf_polygon(x, y, n_sides, apothem):
    """Signed distance (approximately) to a regular n-gon with given apothem."""
    d = np.full_like(x, -np.inf)
    for k in range(n_sides):
        a = 2 * np.pi * k / n_sides
        d = np.maximum(d, x * np.cos(a) + y * np.sin(a))
    return d - apothem


def _sdf_box(x, y, half_w, half_h):
    return np.maximum(np.abs(x) - half_w, np.abs(y) - half_h)


def _shape_sdf(cls: int, x, y, size, aspect, hole):
    """Signed distance (in pixels, negative inside) for class ``cls``.

    ``x``, ``y``: (n, H, W) coordinates relative to the shape centre and
    already rotated; ``size``, ``aspect``, ``hole``: (n, 1, 1).
    """
    name = SHAPE_CLASSES[cls]
    if name in ("disk", "ellipse"):
        a, b = size * np.sqrt(aspect), size / np.sqrt(aspect)
        r = np.sqrt((x / a) ** 2 + (y / b) ** 2)
        return (r - 1.0) * np.minimum(a, b)
    if name in ("square", "rectangle"):
        a, b = 0.85 * size * np.sqrt(aspect), 0.85 * size / np.sqrt(aspect)
        return _sdf_box(x, y, a, b)
    if name == "triangle":
        return _sdf_polygon(x, y, 3, 0.55 * size)
    if name == "pentagon":
        return _sdf_polygon(x, y, 5, 0.85 * size)
    if name == "hexagon":
        return _sdf_polygon(x, y, 6, 0.88 * size)
    if name in ("plus", "cross"):
        arm = 0.28 * size
        return np.minimum(_sdf_box(x, y, size, arm), _sdf_box(x, y, arm, size))
    if name == "ring":
        r = np.sqrt(x ** 2 + y ** 2)
        inner = hole * size
        return np.abs(r - (size + inner) / 2) - (size - inner) / 2
    raise ValueError(f"unknown class {cls}")


def _class_params(cls: np.ndarray, rng: np.random.Generator, max_rotation: float = np.pi / 12):
    """Per-image aspect ratio, hole size and rotation (uniform in
    +-``max_rotation`` radians); this is where the confusable pairs overlap."""
    n = cls.shape[0]
    names = np.array(SHAPE_CLASSES)[cls]
    aspect = np.ones(n)
    aspect[names == "disk"] = rng.uniform(1.0, 1.4, (names == "disk").sum())
    aspect[names == "ellipse"] = rng.uniform(1.25, 2.2, (names == "ellipse").sum())
    aspect[names == "square"] = rng.uniform(1.0, 1.4, (names == "square").sum())
    aspect[names == "rectangle"] = rng.uniform(1.25, 2.2, (names == "rectangle").sum())
    hole = rng.uniform(0.35, 0.65, n)
    theta = rng.uniform(-max_rotation, max_rotation, n)
    for name, base in (("plus", 0.0), ("cross", np.pi / 4)):
        m = names == name
        theta[m] = base + rng.uniform(-np.pi / 7.2, np.pi / 7.2, m.sum())  # +-25 deg: the ranges meet
    return aspect, hole, theta


def make_shapes(n: int, seed: int, image_size: int = IMAGE_SIZE, noise: float = 0.05, clutter: int = 2,
                texture: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``n`` images (uint8, (n, 3, H, W)) and labels (int64, (n,)).

    ``noise`` is the pixel noise std, ``clutter`` the maximum number of
    distractor blobs, ``texture`` scales the background gradient and stripes.
    Deterministic for a given ``seed``; about 0.5 s per 1,000 images.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    rng = np.random.default_rng(seed)
    h = w = image_size
    labels = rng.integers(0, len(SHAPE_CLASSES), n)
    size = rng.uniform(0.3, 0.46, n) * h  # "radius" in pixels
    margin = size * 0.6
    cx = rng.uniform(margin, w - margin)
    cy = rng.uniform(margin, h - margin)
    aspect, hole, theta = _class_params(labels, rng)

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    x = xx[None] - cx[:, None, None]
    y = yy[None] - cy[:, None, None]
    x, y = _rotate(x, y, theta[:, None, None])
    sdf = np.empty((n, h, w))
    for c in range(len(SHAPE_CLASSES)):
        m = labels == c
        if m.any():
            sdf[m] = _shape_sdf(c, x[m], y[m], size[m, None, None], aspect[m, None, None], hole[m, None, None])
    alpha = np.clip(0.5 - sdf, 0.0, 1.0)  # one-pixel anti-aliased edge

    # Background: a base colour, a soft gradient and faint stripes (texture).
    bg = rng.uniform(0.0, 1.0, (n, 3, 1, 1))
    fg = rng.uniform(0.0, 1.0, (n, 3, 1, 1))
    low_contrast = np.abs(fg - bg).mean(axis=1, keepdims=True) < 0.25
    fg = np.where(low_contrast, 1.0 - bg, fg)
    grad_dir = rng.uniform(0, 2 * np.pi, n)[:, None, None]
    grad = (np.cos(grad_dir) * xx[None] + np.sin(grad_dir) * yy[None]) / w - 0.5
    freq = rng.uniform(0.3, 1.2, n)[:, None, None]
    phase = rng.uniform(0, 2 * np.pi, n)[:, None, None]
    stripes = np.sin(freq * (xx[None] * np.cos(grad_dir) - yy[None] * np.sin(grad_dir)) + phase)
    img = bg + texture * (0.15 * grad + 0.06 * rng.uniform(0, 1, (n, 1, 1)) * stripes)[:, None]

    # Clutter: up to three small blobs in random colours.
    for _ in range(clutter):
        present = rng.uniform(0, 1, n) < 0.5
        bx = rng.uniform(0, w, n)[:, None, None]
        by = rng.uniform(0, h, n)[:, None, None]
        br = rng.uniform(1.0, 2.5, n)[:, None, None]
        blob = np.clip(br - np.sqrt((xx[None] - bx) ** 2 + (yy[None] - by) ** 2), 0, 1) * present[:, None, None]
        colour = rng.uniform(0, 1, (n, 3, 1, 1))
        img = img * (1 - blob[:, None]) + colour * blob[:, None]

    img = img * (1 - alpha[:, None]) + fg * alpha[:, None]
    img = img + rng.normal(0, noise, img.shape)
    img = np.clip(img, 0, 1)
    return (img * 255 + 0.5).astype(np.uint8), labels.astype(np.int64)


def _shapes_split(n: int, seed: int, augment: bool = False) -> Split:
    images, labels = make_shapes(n, seed)
    x = torch.from_numpy(images).float().div_(255.0)
    mean = (0.5, 0.5, 0.5)
    std = (0.25, 0.25, 0.25)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return Split(x.contiguous(), torch.from_numpy(labels), SHAPE_CLASSES, augment, mean, std)


def shapes(n_train: int, n_val: int, n_test: int, seed: int = 0, n_teacher_train: int | None = None) -> ImageData:
    """The offline shapes data set; each split has its own derived seed.

    ``n_teacher_train`` (>= ``n_train``) images are generated for teachers;
    the students' ``train`` split is the first ``n_train`` of them.
    """
    n_teacher_train = max(n_train, n_teacher_train or n_train)
    teacher_train = _shapes_split(n_teacher_train, seed * 1000 + 1)
    return ImageData(
        name="shapes",
        train=teacher_train.subset(torch.arange(n_train)) if n_teacher_train > n_train else teacher_train,
        val=_shapes_split(n_val, seed * 1000 + 2),
        test=_shapes_split(n_test, seed * 1000 + 3),
        teacher_train=teacher_train,
    )


# --------------------------------------------------------------------------
# CIFAR-10 through torchvision
# --------------------------------------------------------------------------

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

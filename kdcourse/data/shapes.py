"""The offline shapes set: 32x32 RGB images of 10 confusable classes, generated
from a seed in a second or two (see :mod:`kdcourse.data` for the classes)."""
from __future__ import annotations

import math

import numpy as np
import torch

from . import IMAGE_SIZE, SHAPE_CLASSES, ImageData, Split

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

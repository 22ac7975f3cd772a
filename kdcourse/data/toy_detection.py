"""A toy detection task, to run the detection-distillation losses end to end.

Images of 1-2 objects (square / disk / bar) on a noisy background; a grid of
G x G anchors (one per cell of the last feature map); the anchor whose cell
holds an object's centre is positive for it. A detector predicts per anchor
C + 1 class logits (0 = background) and 4 box values
(dx, dy = centre offset within the cell in [0, 1], log(w / cell), log(h / cell)).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import Split

TOY_CLASSES = ("square", "disk", "bar")


@dataclass
class ToyDetection:
    """A toy detection split: ``split`` (images; ``labels`` = class of the
    first object, unused by the losses), per-anchor targets ``cls`` (N, A)
    with 0 = background and ``box`` (N, A, 4), and ``grid`` (G, A = G * G)."""

    split: Split
    cls: torch.Tensor
    box: torch.Tensor
    grid: int
    classes: tuple = TOY_CLASSES


def toy_detection_data(n: int, seed: int, image_size: int = 32, grid: int = 4) -> ToyDetection:
    """``n`` images with 1-2 objects each, deterministic for ``seed`` (no download)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    g = torch.Generator().manual_seed(seed)
    s, cell = image_size, image_size // grid
    yy, xx = torch.meshgrid(torch.arange(s) + 0.5, torch.arange(s) + 0.5, indexing="ij")
    img = torch.rand(n, 3, 1, 1, generator=g) * 0.5 + 0.05 * torch.randn(n, 3, s, s, generator=g)
    cls = torch.zeros(n, grid * grid, dtype=torch.long)
    box = torch.zeros(n, grid * grid, 4)
    first = torch.zeros(n, dtype=torch.long)
    for i in range(n):
        cells = torch.randperm(grid * grid, generator=g)[: 1 + int(torch.rand(1, generator=g) < 0.5)]
        for j, a in enumerate(cells.tolist()):
            k = int(torch.randint(0, len(TOY_CLASSES), (1,), generator=g))
            cx = (a % grid + torch.rand(1, generator=g).item()) * cell
            cy = (a // grid + torch.rand(1, generator=g).item()) * cell
            r = 3.0 + 4.0 * torch.rand(1, generator=g).item()
            w, h = (2 * r, 2 * r) if k < 2 else (2.6 * r, 0.9 * r)
            if k == 1:
                m = ((xx - cx) ** 2 + (yy - cy) ** 2) <= r * r
            else:
                m = ((xx - cx).abs() <= w / 2) & ((yy - cy).abs() <= h / 2)
            colour = 0.5 + 0.5 * torch.rand(3, 1, generator=g)
            img[i][:, m] = colour
            cls[i, a] = k + 1
            box[i, a] = torch.tensor([cx / cell - a % grid, cy / cell - a // grid,
                                      torch.log(torch.tensor(w / cell)), torch.log(torch.tensor(h / cell))])
            if j == 0:
                first[i] = k
    x = (img.clamp(0, 1) - 0.5) / 0.25
    return ToyDetection(Split(x.contiguous(), first, TOY_CLASSES), cls, box, grid)

"""A small dense detector for :mod:`kdcourse.data.toy_detection`, and its metrics."""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import runtime
from ..data.toy_detection import TOY_CLASSES, ToyDetection


class ToyDetector(nn.Module):
    """A small dense detector: stride-2 stem, ``p3`` (8x8) and ``p4`` (4x4)
    levels, and a 1x1 head on ``p4``. ``forward(x)`` returns
    ``(cls_logits (B, A, C + 1), box (B, A, 4))``."""

    def __init__(self, widths=(16, 32), num_classes: int = len(TOY_CLASSES)):
        super().__init__()
        c3, c4 = (int(w) for w in widths)

        def block(ci, co):
            return nn.Sequential(nn.Conv2d(ci, co, 3, 2, 1, bias=False), nn.BatchNorm2d(co), nn.ReLU(),
                                 nn.Conv2d(co, co, 3, 1, 1, bias=False), nn.BatchNorm2d(co), nn.ReLU())
        self.stem = nn.Sequential(nn.Conv2d(3, c3, 3, 2, 1, bias=False), nn.BatchNorm2d(c3), nn.ReLU())
        self.p3 = block(c3, c3)
        self.p4 = block(c3, c4)
        self.cls_head = nn.Conv2d(c4, num_classes + 1, 1)
        self.box_head = nn.Conv2d(c4, 4, 1)

    def forward(self, x):
        f = self.p4(self.p3(self.stem(x)))
        cls = self.cls_head(f).flatten(2).transpose(1, 2)
        box = self.box_head(f).flatten(2).transpose(1, 2)
        return cls, box


def box_iou_cells(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of boxes in the per-cell encoding (dx, dy, log w, log h) of the
    same cell (the cell offset cancels): (..., 4) -> (...)."""
    def corners(b):
        w, h = b[..., 2].exp(), b[..., 3].exp()
        return b[..., 0] - w / 2, b[..., 1] - h / 2, b[..., 0] + w / 2, b[..., 1] + h / 2
    px0, py0, px1, py1 = corners(pred)
    tx0, ty0, tx1, ty1 = corners(target)
    iw = (torch.minimum(px1, tx1) - torch.maximum(px0, tx0)).clamp_min(0)
    ih = (torch.minimum(py1, ty1) - torch.maximum(py0, ty0)).clamp_min(0)
    inter = iw * ih
    union = (px1 - px0) * (py1 - py0) + (tx1 - tx0) * (ty1 - ty0) - inter
    return inter / union.clamp_min(1e-12)


@torch.no_grad()
def detection_scores(model: nn.Module, data: ToyDetection, batch_size: int = 256) -> dict:
    """``recall@0.5``: objects whose anchor predicts the right class with IoU >= 0.5;
    ``class_acc`` on object anchors; ``mean_iou`` on object anchors; ``false_pos``:
    background anchors predicted as an object."""
    was = model.training
    model.eval()
    dev = runtime.device_of(model)
    cls, box = [], []
    for b in data.split.batches(batch_size, device=dev):
        c, bx = model(b.x)
        cls.append(c.cpu())
        box.append(bx.cpu())
    model.train(was)
    cls, box = torch.cat(cls), torch.cat(box)
    pos = data.cls > 0
    pred = cls.argmax(-1)
    iou = box_iou_cells(box[pos], data.box[pos])
    right = pred[pos] == data.cls[pos]
    return {"recall@0.5": float((right & (iou >= 0.5)).float().mean()), "class_acc": float(right.float().mean()),
            "mean_iou": float(iou.mean()), "false_pos": float((pred[~pos] > 0).float().mean())}

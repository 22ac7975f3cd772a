"""Distillation pieces for dense object detectors.

A detector predicts, at every *anchor* (a position of a feature map, or a
proposal), class scores and four box-regression values, on top of a
multi-scale feature pyramid (FPN). Three terms are distilled here, after
Chen et al., "Learning Efficient Object Detection Models with Knowledge
Distillation" (NeurIPS 2017) and the FPN imitation line of work (e.g. Wang
et al., "Distilling Object Detectors with Fine-grained Feature Imitation",
CVPR 2019):

* :func:`classification_kd` — soft targets per anchor with a temperature:
  independent sigmoids (one-vs-all heads such as RetinaNet's) or a softmax
  over classes incl. background (two-stage heads); scaled by T^2;
* :func:`masked_box_regression` — smooth-L1 between student and teacher box
  outputs on the anchors of a mask (e.g. where the teacher is confident, or
  the positive anchors), averaged over the **masked** anchors. Averaging
  over all anchors (as a reference chapter does) makes the loss shrink when
  an image has few objects;
* :func:`multiscale_feature_loss` with :class:`FeatureAdapters` — squared
  error between adapted student and teacher features at every pyramid level,
  weighted by the teacher's spatial importance ``mean_c |t|`` normalised to
  [0, 1] per image. Where the channels differ, a learned 1x1 convolution
  adapts the student (the reference chapter leaves this branch as ``pass``,
  so its loss crashes or silently compares mismatched tensors).

Shapes: class logits (B, A, C), box outputs (B, A, 4), mask (B, A) with A
anchors per image; features: dict level -> (B, C, H, W).
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _validate


def _check(name: str, x, ndim: int, last: int | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point torch.Tensor")
    if x.ndim != ndim or (last is not None and x.shape[-1] != last):
        want = {3: "(B, A, C)" if last is None else f"(B, A, {last})", 4: "(B, C, H, W)"}[ndim]
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    return _validate.batch(name, x)


def _check_T(T) -> float:
    return _validate.temperature(T, typical="1-4")


def _check_mask(mask, shape) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(shape):
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a (B, A) tensor = {tuple(shape)} of 0/1 (or weights), got {got}")
    return mask.to(torch.float32 if not mask.is_floating_point() else mask.dtype)


def classification_kd(student_cls: torch.Tensor, teacher_cls: torch.Tensor, T: float = 2.0, kind: str = "sigmoid",
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """Soft-target loss on a detector's per-anchor class logits.

    ``kind="sigmoid"`` (one binary classifier per class):
        q = sigmoid(z_t / T), p = sigmoid(z_s / T)
        L = T^2 * mean_anchors sum_c [ q log(q/p) + (1-q) log((1-q)/(1-p)) ]
    ``kind="softmax"`` (classes incl. background, one distribution per anchor):
        L = T^2 * mean_anchors KL( softmax(z_t/T) || softmax(z_s/T) )

    The binary KL equals the binary cross-entropy of the reference chapter
    minus the teacher's own entropy (a constant): same gradients, but 0 when
    the student matches. Computed from logits (``logsigmoid``), so large
    logits cannot produce log(0).

    Args:
        student_cls, teacher_cls: (B, A, C) logits (teacher detached).
        T: temperature > 0.
        mask: optional (B, A) anchor weights (e.g. 1 for anchors to distil);
            the loss is then ``sum(w * L_anchor) / max(1, sum(w))``: for a
            0/1 mask the mean over the masked anchors, and 0 when no anchor
            is masked (weights summing to less than 1 are not renormalised).
    Returns:
        scalar tensor.

    Source: after Chen, Choi, Yu, Han & Chandraker, "Learning Efficient Object Detection Models with Knowledge
        Distillation", NeurIPS 2017.
    """
    _check("student_cls", student_cls, 3)
    _check("teacher_cls", teacher_cls, 3)
    if student_cls.shape != teacher_cls.shape:
        raise ValueError(f"student_cls {tuple(student_cls.shape)} and teacher_cls {tuple(teacher_cls.shape)} "
                         f"must have the same shape (B, A, C)")
    T = _check_T(T)
    zs, zt = student_cls / T, teacher_cls.detach() / T
    if kind == "sigmoid":
        q = torch.sigmoid(zt)
        per_anchor = (q * (F.logsigmoid(zt) - F.logsigmoid(zs))
                      + (1 - q) * (F.logsigmoid(-zt) - F.logsigmoid(-zs))).sum(-1)
    elif kind == "softmax":
        per_anchor = F.kl_div(F.log_softmax(zs, -1), F.log_softmax(zt, -1), reduction="none", log_target=True).sum(-1)
    else:
        raise ValueError(f"kind must be 'sigmoid' (one-vs-all heads) or 'softmax' (with a background class), got {kind!r}")
    if mask is None:
        return T * T * per_anchor.mean()
    w = _check_mask(mask, per_anchor.shape)
    return T * T * (per_anchor * w).sum() / w.sum().clamp_min(1.0)


def masked_box_regression(student_box: torch.Tensor, teacher_box: torch.Tensor, mask: torch.Tensor,
                          beta: float = 1.0) -> torch.Tensor:
    """Smooth-L1 between student and teacher box outputs on masked anchors.

        L = sum_{b,a} mask[b,a] * sum_k huber_beta(s[b,a,k] - t[b,a,k]) / max(1, sum mask)

    Args:
        student_box, teacher_box: (B, A, 4) box regression outputs (teacher detached).
        mask: (B, A) 0/1 (or weights): which anchors to distil.
        beta: the smooth-L1 transition point (PyTorch's ``beta``).
    Returns:
        scalar tensor (0, with a gradient path, when the mask is empty).

    Source: after Chen, Choi, Yu, Han & Chandraker, "Learning Efficient Object Detection Models with Knowledge
        Distillation", NeurIPS 2017.
    """
    _check("student_box", student_box, 3, 4)
    _check("teacher_box", teacher_box, 3, 4)
    if student_box.shape != teacher_box.shape:
        raise ValueError(f"student_box {tuple(student_box.shape)} and teacher_box {tuple(teacher_box.shape)} differ")
    w = _check_mask(mask, student_box.shape[:2])
    per_anchor = F.smooth_l1_loss(student_box, teacher_box.detach(), reduction="none", beta=beta).sum(-1)
    return (per_anchor * w).sum() / w.sum().clamp_min(1.0)


class FeatureAdapters(nn.ModuleDict):
    """One learned 1x1 convolution per pyramid level whose channels differ
    (identity elsewhere): student C_s -> teacher C_t.

    Args:
        student_channels, teacher_channels: dicts level -> channels.

    Source: the adaptation layer of Chen, Choi, Yu, Han & Chandraker, "Learning Efficient Object Detection
        Models with Knowledge Distillation", NeurIPS 2017.
    """

    def __init__(self, student_channels: Mapping[str, int], teacher_channels: Mapping[str, int]):
        missing = set(student_channels) ^ set(teacher_channels)
        if missing:
            raise ValueError(f"student and teacher must list the same levels; unmatched: {sorted(missing)}")
        super().__init__({
            level: (nn.Conv2d(cs, teacher_channels[level], 1) if cs != teacher_channels[level] else nn.Identity())
            for level, cs in student_channels.items()
        })


def importance_map(teacher: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) importance = mean_c |t|, divided by its maximum in each
    image (so each image's most active position has weight 1)."""
    imp = teacher.detach().abs().mean(dim=1, keepdim=True)
    return imp / imp.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)


def multiscale_feature_loss(student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor],
                            adapters: Mapping[str, nn.Module] | None = None) -> torch.Tensor:
    """Importance-weighted feature imitation over pyramid levels.

        for each level l:  s' = adapt_l(s_l)  (1x1 conv when channels differ),
                           s' pooled to the teacher's H x W if larger (or the teacher to s' size),
                           w = importance_map(t_l)
                           L_l = mean_{b,c,h,w} ( w * s' - w * t_l )^2
        L = mean_l L_l

    Args:
        student, teacher: dicts level -> (B, C, H, W) with the same levels.
        adapters: dict level -> module (e.g. :class:`FeatureAdapters`); needed
            for every level whose channels differ — train it with the student.
    Returns:
        scalar tensor.

    Source: after Chen, Choi, Yu, Han & Chandraker, "Learning Efficient Object Detection Models with Knowledge
        Distillation", NeurIPS 2017. and the FPN imitation line of work, e.g. Wang, Yuan, Zhang & Feng,
        "Distilling Object Detectors with Fine-grained Feature Imitation", CVPR 2019.
    """
    if not isinstance(student, Mapping) or not isinstance(teacher, Mapping) or not student:
        raise ValueError("student and teacher must be non-empty dicts level -> (B, C, H, W) tensor")
    if set(student) != set(teacher):
        raise ValueError(f"student levels {sorted(student)} and teacher levels {sorted(teacher)} must be the same")
    total = 0.0
    for level in student:
        s = _check(f"student[{level!r}]", student[level], 4)
        t = _check(f"teacher[{level!r}]", teacher[level], 4).detach()
        if adapters is not None and level in adapters:
            s = adapters[level](s)
        if s.shape[1] != t.shape[1]:
            raise ValueError(
                f"level {level!r}: student has {s.shape[1]} channels, teacher {t.shape[1]}; pass "
                f"adapters=FeatureAdapters(student_channels, teacher_channels) and train it with the student"
            )
        if s.shape[-2:] != t.shape[-2:]:
            if s.shape[-2] * s.shape[-1] > t.shape[-2] * t.shape[-1]:
                s = F.adaptive_avg_pool2d(s, t.shape[-2:])
            else:
                t = F.adaptive_avg_pool2d(t, s.shape[-2:])
        w = importance_map(t)
        total = total + F.mse_loss(s * w, t * w)
    return total / len(student)

"""Feature-based distillation: match what the networks compute *inside*.

Notation: a student feature map ``s`` (B, C_s, H_s, W_s), a teacher feature
map ``t`` (B, C_t, H_t, W_t) taken at layers you pair up. Two mismatches are
common and each has one fix here:

* **spatial size** (H_s != H_t): the larger map is average-pooled to the
  smaller's size (:func:`match_spatial`; the convention of RepDistiller,
  Tian et al. 2020);
* **channels** (C_s != C_t): a learned regressor maps the student's channels
  to the teacher's (:class:`HintRegressor`, a 1x1 convolution, or a linear
  layer for (B, D) vectors). Its parameters must be trained with the
  student — the objectives in :mod:`kdcourse.feature_kd` own it for that.

Losses (each returns a scalar):

* :func:`hint_loss` — FitNets (Romero et al. 2015, arXiv:1412.6550):
  ``mean((r(s) - t)^2)`` over every element, with ``r`` the regressor. The
  paper writes ``1/2 ||t - r(s)||^2``; the mean over elements differs by a
  constant factor (folded into the loss weight). No normalisation of either
  side: normalising each position's channel vector (as a reference chapter
  does) turns FitNets into a cosine-type loss.
* :func:`feature_stats_loss` — the channel-mean statistics loss of the lab
  handout: ``mean((mean_hw r(s) - mean_hw t)^2)``; it matches only the
  spatial average of every channel.
* :func:`attention_map` / :func:`attention_transfer_loss` — Zagoruyko &
  Komodakis 2017 (arXiv:1612.03928): the activation-based spatial attention
  map ``a = vec(mean_c |A_c|^p)`` with ``p = 2``, L2-normalised over the
  H*W positions, and the loss ``mean_{b,j} (a_s[b,j] - a_t[b,j])^2`` — the
  squared L2 distance of the normalised maps divided by (B * H * W). This is
  the authors' code (``(at(x) - at(y)).pow(2).mean()``); their paper writes
  the (unsquared) p-norm of the difference, weighted by beta/2 with
  beta = 1000 — use that weight in the objective. The map needs no
  regressor: it is a mean over channels, so C_s != C_t is fine.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _validate


def _check_feature(name: str, x, ndims=(2, 4)) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.ndim not in ndims:
        want = " or ".join({2: "(B, D)", 4: "(B, C, H, W)"}[d] for d in ndims)
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    _validate.batch(name, x)
    return x


def _check_batch(s: torch.Tensor, t: torch.Tensor) -> None:
    if s.shape[0] != t.shape[0]:
        raise ValueError(
            f"student and teacher features must share the batch size, got {s.shape[0]} and {t.shape[0]}; "
            f"pass features of the same images"
        )


def match_spatial(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger of two (B, C, H, W) maps to the other's H x W.

    Returns ``(student, teacher)`` with equal spatial size (channels untouched).
    Both must be 4-D; the sizes must divide for pooling to be an exact mean
    of blocks (adaptive pooling is used otherwise).
    """
    _check_feature("student", student, (4,))
    _check_feature("teacher", teacher, (4,))
    hs, ws = student.shape[-2:]
    ht, wt = teacher.shape[-2:]
    if (hs, ws) == (ht, wt):
        return student, teacher
    if hs * ws > ht * wt:
        return F.adaptive_avg_pool2d(student, (ht, wt)), teacher
    return student, F.adaptive_avg_pool2d(teacher, (hs, ws))


class HintRegressor(nn.Module):
    """FitNets' regressor: maps student features to the teacher's channels.

    Args:
        student_channels: C_s (or D_s for (B, D) features).
        teacher_channels: C_t (or D_t).
        kind: ``"conv"`` — a 1x1 convolution for (B, C, H, W) maps (a linear
            map applied at every position, so it commutes with average
            pooling); ``"linear"`` — for (B, D) vectors.

    ``forward(s)`` returns (B, C_t, H_s, W_s) or (B, D_t).

    Source: Romero, Ballas, Kahou, Chassang, Gatta & Bengio, "FitNets: Hints for Thin Deep Nets", ICLR 2015
        (arXiv:1412.6550).
    """

    def __init__(self, student_channels: int, teacher_channels: int, kind: str = "conv"):
        super().__init__()
        for arg, v in (("student_channels", student_channels), ("teacher_channels", teacher_channels)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{arg} must be a positive int, got {v!r}")
        if kind not in ("conv", "linear"):
            raise ValueError(f"kind must be 'conv' (for (B, C, H, W) maps) or 'linear' (for (B, D)), got {kind!r}")
        self.kind = kind
        self.student_channels, self.teacher_channels = student_channels, teacher_channels
        self.proj = nn.Conv2d(student_channels, teacher_channels, 1) if kind == "conv" else \
            nn.Linear(student_channels, teacher_channels)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        want = 4 if self.kind == "conv" else 2
        if not isinstance(s, torch.Tensor) or s.ndim != want or s.shape[1] != self.student_channels:
            shape = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(
                f"HintRegressor({self.student_channels}->{self.teacher_channels}, kind={self.kind!r}) expects "
                f"{'(B, %d, H, W)' % self.student_channels if want == 4 else '(B, %d)' % self.student_channels}, got {shape}"
            )
        return self.proj(s)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


def _regress(student: torch.Tensor, teacher: torch.Tensor, regressor) -> torch.Tensor:
    if regressor is not None:
        student = regressor(student)
    if student.shape[1] != teacher.shape[1]:
        raise ValueError(
            f"student has {student.shape[1]} channels but teacher has {teacher.shape[1]}: pass "
            f"regressor=HintRegressor({student.shape[1]}, {teacher.shape[1]}) (trained with the student) "
            f"to map the student's channels to the teacher's"
        )
    return student


def hint_loss(student: torch.Tensor, teacher: torch.Tensor, regressor: nn.Module | None = None) -> torch.Tensor:
    """FitNets hint loss: mean squared error between r(student) and teacher.

        L = mean_{b,c,h,w} ( r(s)[b,c,h,w] - t[b,c,h,w] )^2

    Args:
        student: (B, C_s, H_s, W_s) (or (B, D_s)) student feature (the "guided" layer).
        teacher: (B, C_t, H_t, W_t) (or (B, D_t)) teacher feature (the "hint"),
            treated as a constant (detached).
        regressor: maps C_s -> C_t (required when they differ), e.g.
            :class:`HintRegressor`; applied before spatial matching (a 1x1
            convolution commutes with average pooling).
    Spatial sizes are matched by average-pooling the larger map
    (:func:`match_spatial`).
    Returns:
        scalar tensor.
    Reference: Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015.

    Source: Romero, Ballas, Kahou, Chassang, Gatta & Bengio, "FitNets: Hints for Thin Deep Nets", ICLR 2015
        (arXiv:1412.6550).
    """
    _check_feature("student", student)
    _check_feature("teacher", teacher)
    _check_batch(student, teacher)
    teacher = teacher.detach()
    student = _regress(student, teacher, regressor)
    if student.ndim != teacher.ndim:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must both be 4-D or both 2-D")
    if student.ndim == 4:
        student, teacher = match_spatial(student, teacher)
    return F.mse_loss(student, teacher)


def feature_stats_loss(student: torch.Tensor, teacher: torch.Tensor, regressor: nn.Module | None = None) -> torch.Tensor:
    """The handout's statistics loss: match each channel's spatial mean.

        L = mean_{b,c} ( mean_{h,w} r(s)[b,c] - mean_{h,w} t[b,c] )^2

    Args:
        student: (B, C_s, H_s, W_s); teacher: (B, C_t, H_t, W_t) (any H, W:
            the spatial mean removes them).
        regressor: maps C_s -> C_t when they differ (a 1x1 conv on the map, or
            equivalently a linear map on the means). The handout compares
            ResNet-18 and ResNet-50 stages directly, whose channel counts
            differ (128 vs 512 at layer2): that cannot run without one.
    Returns:
        scalar tensor.

    Source: this course's lab handout (no paper).
    """
    _check_feature("student", student, (4,))
    _check_feature("teacher", teacher, (4,))
    _check_batch(student, teacher)
    teacher = teacher.detach()
    student = _regress(student, teacher, regressor)
    return F.mse_loss(student.mean(dim=(2, 3)), teacher.mean(dim=(2, 3)))


def attention_map(feature: torch.Tensor, p: float = 2.0, eps: float = 1e-12) -> torch.Tensor:
    """Activation-based spatial attention map (Zagoruyko & Komodakis 2017).

        a = vec( mean_c |A_c|^p ) / || vec( mean_c |A_c|^p ) ||_2

    Args:
        feature: (B, C, H, W) activations A.
        p: exponent, 2 by default (the paper's F^p_sum sums over channels,
            its code takes the mean: after normalising both give the same
            map; larger p puts more weight on the most active positions).
        eps: floor of the norm (an all-zero map stays zero).
    Returns:
        (B, H*W) maps, each of unit L2 norm. Mean and sum over channels give
        the same normalised map; the *square root* of the sum of squares (an
        L2 norm over channels) does not.

    Source: Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of
        Convolutional Neural Networks via Attention Transfer", ICLR 2017 (arXiv:1612.03928).
    """
    _check_feature("feature", feature, (4,))
    if not isinstance(p, (int, float)) or isinstance(p, bool) or p <= 0:
        raise ValueError(f"p must be a positive number (the paper uses 2), got {p!r}")
    a = feature.abs().pow(p).mean(dim=1).flatten(1)
    return F.normalize(a, p=2, dim=1, eps=eps)


def attention_transfer_loss(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Attention transfer (AT) between one pair of layers.

        L = mean_{b,j} ( a_s[b,j] - a_t[b,j] )^2 = (1 / (B*H*W)) sum_b || a_s[b] - a_t[b] ||_2^2

    with ``a = attention_map(., p)``. When spatial sizes differ, the larger
    *feature map* is average-pooled to the smaller size first (as RepDistiller
    does). Channels may differ (no regressor needed).

    Args:
        student: (B, C_s, H_s, W_s); teacher: (B, C_t, H_t, W_t), detached.
        p: the exponent of the attention map, default 2.
    Returns:
        scalar tensor. Multiply by beta/2 (the paper: beta = 1000) in the
        objective.
    Reference: Zagoruyko & Komodakis, "Paying More Attention to Attention",
    ICLR 2017, eq. (2) and their code.

    Source: Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of
        Convolutional Neural Networks via Attention Transfer", ICLR 2017 (arXiv:1612.03928).
    """
    _check_feature("student", student, (4,))
    _check_feature("teacher", teacher, (4,))
    _check_batch(student, teacher)
    student, teacher = match_spatial(student, teacher.detach())
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()

"""Lab 2 checks, the similarity part: the handout's channel-statistics loss
(a contrast to FitNets' hint), probabilistic knowledge transfer (PKT, a
relation loss on the pooled embeddings) and linear CKA (the measure of how
alike two networks' representations are).

Each check runs the exercise's probe (what the grader runs) through
:func:`kdcourse.checks.probing.probe_check`. References and variants are
private copies here (the grading kernel refuses declared references; a
planted variant must still run there). :mod:`kdcourse.checks.lab2` declares
these exercises and re-exports the checks.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..contract import draw_int
from ...losses import feature
from ...recipes.lab2 import pkt_loss as _recipe_pkt
from .. import contract
from ..probing import INPLACE, number, probe_check
from ._common import _Counting, _loss_data


def _ex(name: str) -> contract.Exercise:
    from .. import lab2

    return next(e for e in lab2.EXERCISES if e.name == name)


def _guarded(fn, args: dict):
    before = {k: v.detach().clone() for k, v in args.items()}
    out, raised = contract.attempt(fn, *args.values())
    changed = [k for k, v in args.items() if not torch.equal(v.detach(), before[k])]
    return out, raised, changed


# --------------------------------------------------------------------------
# The handout's channel-statistics loss
# --------------------------------------------------------------------------

def reference_stats_loss(student: torch.Tensor, teacher: torch.Tensor, regressor: nn.Module) -> torch.Tensor:
    """mean_{b,c} (mean_{h,w} regressor(student) − mean_{h,w} teacher)², the teacher a constant."""
    return F.mse_loss(regressor(student).mean(dim=(2, 3)), teacher.detach().mean(dim=(2, 3)))


STATS_VARIANTS = {
    "no_regressor": (lambda s, t, r: F.mse_loss(s.mean((2, 3)), t.detach().mean((2, 3))),
                     "the regressor is never applied: the student's channels (C_s) must first be mapped to the "
                     "teacher's (C_t) — the handout's ResNet-18 vs ResNet-50 stages (128 vs 512) cannot even be compared."),
    "teacher_not_detached": (lambda s, t, r: F.mse_loss(r(s).mean((2, 3)), t.mean((2, 3))),
                             "the loss sends gradients into the teacher's features: use teacher.detach()."),
    "channel_mean": (lambda s, t, r: F.mse_loss(r(s).mean(1), t.detach().mean(1)),
                     "the mean runs over the channels: the statistic is each CHANNEL's mean over the positions, "
                     "mean(dim=(2, 3)), one number per (sample, channel)."),
    "whole_map": (lambda s, t, r: F.mse_loss(F.adaptive_avg_pool2d(r(s), t.shape[-2:]), t.detach()),
                  "this compares the whole maps (FitNets' hint); the handout's loss compares only each channel's "
                  "spatial mean, mean(dim=(2, 3))."),
    "sum": (lambda s, t, r: F.mse_loss(r(s).mean((2, 3)), t.detach().mean((2, 3)), reduction="sum"),
            "reduction='sum' grows with the batch and the channels: average over (b, c) (F.mse_loss's default)."),
}


def probe_stats_loss(fn: Callable, seed: int) -> dict:
    """Maps (B, C_s, H_s, W_s) and (B, C_t, H_t, W_t) with sizes that differ
    (teacher larger, student larger, not square) or agree, channels that
    differ (equal on every fourth seed); a 1x1-conv regressor. The loss and
    its gradients w.r.t. the student's features, the regressor's weights and
    the teacher's features (zero: the teacher is detached)."""
    g = contract.generator(seed)
    b, cs = 1 + draw_int(g, 0, 4), 2 + draw_int(g, 0, 6)
    ct = cs if seed % 4 == 3 else cs + 1 + draw_int(g, 0, 8)
    (hs, ws), (ht, wt) = [((8, 8), (4, 4)), ((4, 4), (8, 8)), ((6, 4), (3, 2)), ((5, 5), (5, 5))][seed % 4]
    s = torch.randn(b, cs, hs, ws, generator=g, dtype=torch.float64).clamp_min(0).requires_grad_(True)
    t = (torch.randn(b, ct, ht, wt, generator=g, dtype=torch.float64) * 2 + 0.5).requires_grad_(True)
    torch.manual_seed(seed)
    reg = _Counting(feature.HintRegressor(cs, ct, kind="conv").double())
    out, raised, changed = _guarded(lambda a, c: fn(a, c, reg), {"student": s, "teacher": t})
    case = f"student {tuple(s.shape)}, teacher {tuple(t.shape)}"
    if raised:
        return {"case": case, **raised, INPLACE: changed}
    data = _loss_data("feature_stats_loss", out, {"student": s, "teacher": t, **dict(reg.inner.named_parameters())}, seed)
    return {"case": case, INPLACE: changed, **data}


def check_stats_loss(fn: Callable) -> bool:
    """``fn(student, teacher, regressor)`` → mean_{b,c}(mean_hw r(s) − mean_hw t)², teacher detached."""
    return probe_check(_ex("feature_stats_loss"), fn)


# --------------------------------------------------------------------------
# PKT: probabilistic knowledge transfer
# --------------------------------------------------------------------------

def reference_pkt(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Passalis & Tefas (ECCV 2018), as RepDistiller computes it: cosine
    kernels (K + 1) / 2 of each side's (B, D) features, rows normalised to
    conditional probabilities, mean over all B² entries of
    p_t log((p_t + eps) / (p_s + eps))."""
    def cond(f):
        u = F.normalize(f.flatten(1), dim=1)
        k = (u @ u.t() + 1) / 2
        return k / k.sum(dim=1, keepdim=True)

    p_s, p_t = cond(student), cond(teacher.detach())
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def _pkt_with(kernel=lambda u: (u @ u.t() + 1) / 2, norm=lambda k: k / k.sum(1, keepdim=True),
              unit=lambda f: F.normalize(f.flatten(1), dim=1), kl=None, reduce=torch.mean, detach=True):
    def pkt_loss(student, teacher, eps=1e-7):
        p_s = norm(kernel(unit(student)))
        p_t = norm(kernel(unit(teacher.detach() if detach else teacher)))
        terms = kl(p_s, p_t, eps) if kl else p_t * torch.log((p_t + eps) / (p_s + eps))
        return reduce(terms)
    return pkt_loss


PKT_VARIANTS = {
    "reversed": (_pkt_with(kl=lambda p_s, p_t, eps: p_s * torch.log((p_s + eps) / (p_t + eps))),
                 "the KL divergence runs the wrong way: the teacher's conditional probabilities are the target, "
                 "p_t * log(p_t / p_s)."),
    "raw_features": (_pkt_with(unit=lambda f: f.flatten(1)),
                     "the features are not L2-normalised: the kernel is the COSINE similarity (F.normalize each row "
                     "first), so that it lies in [-1, 1] and (K + 1) / 2 in [0, 1]."),
    "no_shift": (_pkt_with(kernel=lambda u: u @ u.t()),
                 "the cosine similarities are used as they are: negative ones make negative 'probabilities'. "
                 "Map them to [0, 1] with (K + 1) / 2 before normalising."),
    "softmax": (_pkt_with(kernel=lambda u: u @ u.t(), norm=lambda k: torch.softmax(k, 1)),
                "a softmax of the cosines is not PKT's kernel: take (K + 1) / 2 and divide each row by its sum."),
    "sum": (_pkt_with(reduce=torch.sum), "summed over all B² entries: take the mean, as RepDistiller does."),
    "teacher_not_detached": (_pkt_with(detach=False), "the loss sends gradients into the teacher: use teacher.detach()."),
}


def probe_pkt(fn: Callable, seed: int) -> dict:
    """(B, D_s) and (B, D_t) embeddings of different widths and scales (one
    seed with non-negative ReLU features, one with feature maps flattened),
    B from 2 to 12; the loss and its gradients."""
    g = contract.generator(seed)
    b = [8, 2, 12, 5, 6][seed % 5]
    ds, dt = 2 + draw_int(g, 0, 10), 2 + draw_int(g, 0, 20)
    s = torch.randn(b, ds, generator=g, dtype=torch.float64) * [1.0, 10.0, 0.1, 1.0, 3.0][seed % 5]
    t = torch.randn(b, dt, generator=g, dtype=torch.float64) * 2
    if seed % 5 == 3:
        s, t = s.clamp_min(0) + 0.01, t.clamp_min(0) + 0.01
    s, t = s.requires_grad_(True), t.requires_grad_(True)
    out, raised, changed = _guarded(fn, {"student": s, "teacher": t})
    case = f"student {tuple(s.shape)}, teacher {tuple(t.shape)}"
    if raised:
        return {"case": case, **raised, INPLACE: changed}
    return {"case": case, INPLACE: changed, **_loss_data("pkt_loss", out, {"student": s, "teacher": t}, seed)}


def check_pkt(fn: Callable) -> bool:
    """``fn(student, teacher)`` → PKT's KL of row-normalised (cosine + 1) / 2 kernels, mean over B² entries."""
    return probe_check(_ex("pkt_loss"), fn, seeds=(0, 1, 2, 3, 4))


# --------------------------------------------------------------------------
# Linear CKA
# --------------------------------------------------------------------------

def reference_cka(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al., ICML 2019) of two sets of features of the same N samples:
    ||Yc^T Xc||_F² / (||Xc^T Xc||_F ||Yc^T Yc||_F), columns centred, in float64."""
    X, Y = X.flatten(1).double(), Y.flatten(1).double()
    X, Y = X - X.mean(0, keepdim=True), Y - Y.mean(0, keepdim=True)
    return float((Y.t() @ X).pow(2).sum() / ((X.t() @ X).norm() * (Y.t() @ Y).norm()))


def _cka_with(center=0, square=True, normalise=True):
    def linear_cka(X, Y):
        X, Y = X.flatten(1).double(), Y.flatten(1).double()
        if center is not None:
            X, Y = X - X.mean(center, keepdim=True), Y - Y.mean(center, keepdim=True)
        num = (Y.t() @ X).norm()
        num = num ** 2 if square else num
        return float(num / ((X.t() @ X).norm() * (Y.t() @ Y).norm())) if normalise else float(num)
    return linear_cka


CKA_VARIANTS = {
    "not_centred": (_cka_with(center=None),
                    "the features are not centred: subtract each feature's mean over the samples (X - X.mean(0)) "
                    "first, or a common offset makes any two representations look alike."),
    "centred_per_sample": (_cka_with(center=1),
                           "each sample is centred over its features (dim=1); centre each FEATURE over the samples "
                           "(dim=0)."),
    "not_squared": (_cka_with(square=False),
                    "the numerator is ||Y^T X||_F; linear CKA uses its square, ||Y^T X||_F² (HSIC with linear kernels)."),
    "not_normalised": (_cka_with(normalise=False),
                       "this is the unnormalised HSIC: divide by ||X^T X||_F ||Y^T Y||_F so the result lies in [0, 1] "
                       "and ignores each side's scale."),
}


def probe_cka(fn: Callable, seed: int) -> dict:
    """N = 6–40 samples; features (N, D) or maps (N, C, H, W) of different
    widths (D > N on some seeds), a second side that is a rotated, scaled and
    shifted copy of the first plus noise on some seeds; the value."""
    g = contract.generator(seed)
    n = draw_int(g, 6, 41)
    dx, dy = [(5, 9), (60, 3), (4, 4), (12, 50)][seed % 4]
    X = torch.randn(n, dx, generator=g, dtype=torch.float64) + 3.0
    if seed % 3 == 0:
        q, _ = torch.linalg.qr(torch.randn(dx, dx, generator=g, dtype=torch.float64))
        Y = torch.cat([X @ q * 4 + 7, torch.randn(n, dy, generator=g, dtype=torch.float64) * 0.5], 1)
    else:
        Y = torch.randn(n, dy, generator=g, dtype=torch.float64) * 2 - 1 + X[:, :1]
    if seed % 4 == 1:
        X = X.view(n, 15, 2, 2)
    before = (X.clone(), Y.clone())
    out = fn(X, Y)
    changed = [k for k, a, b in (("X", X, before[0]), ("Y", Y, before[1])) if not torch.equal(a, b)]
    return {"case": f"X {tuple(X.shape)}, Y {tuple(Y.shape)}", "cka": number(out, "linear_cka"), INPLACE: changed}


def check_cka(fn: Callable) -> bool:
    """``fn(X, Y)`` → linear CKA of (N, ...) features of the same N samples (a float in [0, 1])."""
    return probe_check(_ex("linear_cka"), fn)


def declarations() -> list:
    E = contract.Exercise
    return [
        E(name="feature_stats_loss", points=1.0, check=check_stats_loss, probe=probe_stats_loss,
          reference=reference_stats_loss, variants=STATS_VARIANTS, hidden_seeds=tuple(range(6)), rtol=1e-6,
          atol=1e-9, refuse=(reference_stats_loss, feature.feature_stats_loss)),
        E(name="pkt_loss", points=1.0, check=check_pkt, probe=probe_pkt, reference=reference_pkt,
          variants=PKT_VARIANTS, hidden_seeds=tuple(range(7)), rtol=1e-6, atol=1e-9, refuse=(reference_pkt, _recipe_pkt)),
        E(name="linear_cka", points=1.0, check=check_cka, probe=probe_cka, reference=reference_cka,
          variants=CKA_VARIANTS, hidden_seeds=tuple(range(8)), rtol=1e-6, atol=1e-9, refuse=(reference_cka,)),
    ]

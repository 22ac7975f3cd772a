"""Lab 2: the RKD angle-wise loss with a safe norm — its check, value and gradient variants, probe."""
from __future__ import annotations

from typing import Callable
import torch
import torch.nn.functional as F
from ...losses import relation
from .. import Case, CheckFailed, diagnose
from ._common import _pair_probe, _r, _randn, check_gradients, check_inputs_untouched


# --------------------------------------------------------------------------
# Exercise: RKD angle-wise loss, with a safe norm
# --------------------------------------------------------------------------

def _angles_with(unit):
    def psi(e):
        d = e.unsqueeze(0) - e.unsqueeze(1)  # d[j, i] = x_i - x_j
        u = unit(d)
        return u @ u.transpose(1, 2)
    return psi


def _plain_unit(d):
    return d / d.norm(dim=-1, keepdim=True)


def _angle_variant(psi, crit=F.smooth_l1_loss):
    def loss(student, teacher):
        return crit(psi(student.flatten(1)), psi(teacher.detach().flatten(1)))
    return loss


def _chapter_gram(student, teacher):
    g = lambda e: F.normalize(e, dim=1) @ F.normalize(e, dim=1).t()  # noqa: E731
    return F.mse_loss(g(student.flatten(1)), g(teacher.detach().flatten(1)))


_SAFE = _angles_with(relation.safe_unit)

ANGLE_VARIANTS = {
    "plain_norm": (_angle_variant(_angles_with(_plain_unit)),
                   "d / d.norm() is 0/0 = NaN where two samples are equal (their difference vector is zero): use a "
                   "safe norm — exactly 0, with zero gradient, where ||d||^2 <= 1e-12."),
    "gram": (_chapter_gram,
             "this is a Gram-matrix loss of normalised embeddings (a reference chapter's 'angle-wise' loss); the RKD "
             "angle is over triplets: cos of the angle at x_j between x_i - x_j and x_k - x_j."),
    "no_unit": (_angle_variant(_angles_with(lambda d: d)),
                "the difference vectors are not normalised: the angle needs unit vectors e_ij = (x_i - x_j) / ||x_i - x_j||."),
    "mse": (_angle_variant(_SAFE, F.mse_loss),
            "the comparison uses MSE; RKD uses the Huber loss (F.smooth_l1_loss)."),
    "sum": (_angle_variant(_SAFE, lambda a, b: F.smooth_l1_loss(a, b, reduction="sum")),
            "the Huber terms are summed; average them over all B^3 triplets (F.smooth_l1_loss's default)."),
}

_NORMALIZE_HINT = ("F.normalize divides by max(||d||, 1e-12): at two equal samples the value is right (0) but the "
                   "gradient is about 1e12 and training blows up. Use a safe norm: exactly 0, with zero gradient, where "
                   "||d||^2 <= 1e-12 (torch.where(sq > 1e-12, d / sq.clamp_min(1e-12).sqrt(), 0)).")
ANGLE_GRADIENT_VARIANTS = {"normalize": (_angle_variant(_angles_with(lambda d: F.normalize(d, dim=-1))), _NORMALIZE_HINT)}


def _with_duplicates(b, d, seed, scale=1.0):
    x = _randn(b, d, seed=seed) * scale
    x[1] = x[0]  # two equal samples: a zero difference vector
    return x


def check_rkd_angle(fn: Callable) -> bool:
    """``fn(student, teacher)`` (B, D) embeddings must equal RKD's angle loss
    (Huber over every triplet's cosine at its middle vertex), with a safe norm."""
    cases = [
        Case((_randn(6, 4, seed=71), _randn(6, 9, seed=72) * 3), {}, "B=6, widths 4 vs 9"),
        Case((_with_duplicates(5, 3, 73), _randn(5, 7, seed=74)), {}, "two equal student samples"),
        Case((_randn(4, 5, seed=75) * 10 + 2, _with_duplicates(4, 5, 76, 0.1)), {}, "scales, an offset, equal teacher samples"),
        Case((_randn(3, 2, seed=77), _randn(3, 2, seed=78)), {}, "B=3, the smallest batch"),
    ]
    check_inputs_untouched("rkd_angle", fn, cases[0].args, ("student", "teacher"))
    ok = diagnose("rkd_angle", fn, relation.rkd_angle, cases, ANGLE_VARIANTS, rtol=1e-6, atol=1e-9)
    s = cases[1].args[0].clone().requires_grad_(True)
    out = fn(s, cases[1].args[1])
    if isinstance(out, torch.Tensor) and out.requires_grad:
        out.backward()
        if s.grad is not None and (not torch.isfinite(s.grad).all() or float(s.grad.abs().max()) > 1e6):
            raise CheckFailed(f"rkd_angle is not right yet: {_NORMALIZE_HINT}")
    for c in cases[:3]:
        check_gradients("rkd_angle", fn, relation.rkd_angle, c.args, label=c.label)
    return ok


def _first_twice(make):
    """``make``'s samples with the first one repeated in front (two equal samples)."""
    def made(g):
        x = make(g)
        return torch.cat([x[:1], x], 0)
    return made


def _last_twice(make):
    """``make``'s samples with the last one repeated at the end (two equal samples)."""
    def made(g):
        x = make(g)
        return torch.cat([x, x[-1:]], 0)
    return made


# Module-level functions only (no lambdas at module level): the grading guard
# counts code written in a checks module's namespace outside a function as
# not the checks' own.
_ANGLE_CASES = [
    (_r(6, 4), _r(6, 9, scale=3)),
    (_first_twice(_r(4, 3)), _r(5, 7)),                                              # two equal student samples
    (_r(4, 5, scale=10, offset=2.0), _last_twice(_r(3, 5, scale=0.1))),              # two equal teacher samples
    (_r(3, 2), _r(3, 2)),
    (_r(8, 6), _r(8, 16, scale=0.5)),
]


def probe_rkd_angle(fn: Callable, seed: int) -> dict:
    """(B, D) embeddings, B from 3 to 8, with two equal student (or teacher)
    samples on some seeds: the loss and its gradients w.r.t. both inputs
    (an unsafe norm shows as NaN or ~1e12 there)."""
    return _pair_probe("rkd_angle", _ANGLE_CASES, seed, fn)

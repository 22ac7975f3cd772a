"""Lab 2, Exercise 2: the FitNets hint loss — its check, variants (regressor, pooling, detaching) and probe."""
from __future__ import annotations

from typing import Callable
import torch
import torch.nn as nn
import torch.nn.functional as F
from ..contract import draw_int
from ...losses import feature
from .. import Case, CheckFailed, contract, diagnose
from ._common import _Counting, _loss_data, _quiet, _randn, check_gradients, check_inputs_untouched


# --------------------------------------------------------------------------
# Exercise 2: FitNets hint loss
# --------------------------------------------------------------------------

def _regressor(cs: int, ct: int, kind: str = "conv", seed: int = 0) -> feature.HintRegressor:
    torch.manual_seed(seed)
    return feature.HintRegressor(cs, ct, kind=kind).double()


def _pool_t(s, t):
    return s, (F.adaptive_avg_pool2d(t, s.shape[-2:]) if s.ndim == 4 and t.shape[-2:] != s.shape[-2:] else t)


def _hint_variant(body):
    def loss(student, teacher, regressor):
        s = regressor(student)
        return body(s, teacher)
    return loss


HINT_VARIANTS = {
    "normalized": (_hint_variant(lambda s, t: F.mse_loss(*_pool_t(F.normalize(s, dim=1), F.normalize(t, dim=1)))),
                   "both features are L2-normalised over channels first (as a reference chapter does): that is not "
                   "the FitNets hint loss. Compare r(student) and the teacher's raw features with a plain MSE."),
    "sum": (_hint_variant(lambda s, t: (lambda a, b: (a - b).pow(2).sum())(*_pool_t(s, t))),
            "the squared errors are summed; use the mean over every element (F.mse_loss) so the loss does not grow "
            "with batch size and feature-map size."),
    "per_sample_sum": (_hint_variant(lambda s, t: (lambda a, b: (a - b).pow(2).flatten(1).sum(1).mean())(*_pool_t(s, t))),
                       "you sum over channels and positions and average over the batch (the paper's ||.||^2 per "
                       "sample): this course uses the mean over every element (F.mse_loss) — a constant factor, "
                       "but it changes what a loss weight means."),
    "half": (_hint_variant(lambda s, t: 0.5 * F.mse_loss(*_pool_t(s, t))),
             "off by the factor 1/2: use F.mse_loss (the paper's 1/2 is folded into the loss weight here)."),
    "upsample_nearest": (_hint_variant(lambda s, t: F.mse_loss(F.interpolate(s, size=t.shape[-2:], mode="nearest"), t)
                                       if s.ndim == 4 else F.mse_loss(s, t)),
                         "the student map is upsampled to the teacher's size; average-pool the larger (teacher) map "
                         "down to the student's H x W instead (F.adaptive_avg_pool2d)."),
    "upsample_bilinear": (_hint_variant(lambda s, t: F.mse_loss(F.interpolate(s, size=t.shape[-2:], mode="bilinear",
                                                                               align_corners=False), t)
                                        if s.ndim == 4 else F.mse_loss(s, t)),
                          "the student map is upsampled to the teacher's size; average-pool the larger (teacher) map "
                          "down to the student's H x W instead (F.adaptive_avg_pool2d)."),
    "max_pool": (_hint_variant(lambda s, t: F.mse_loss(s, F.adaptive_max_pool2d(t, s.shape[-2:]))
                               if s.ndim == 4 and s.shape[-2:] != t.shape[-2:] else F.mse_loss(s, t)),
                 "the teacher map is max-pooled; use average pooling (F.adaptive_avg_pool2d), which keeps the mean "
                 "activation of each block."),
    "channel_means": (_hint_variant(lambda s, t: F.mse_loss(s.mean(dim=(2, 3)), t.mean(dim=(2, 3))) if s.ndim == 4
                                    else F.mse_loss(s, t)),
                      "only the channel means are matched (the handout's statistics loss); FitNets matches the "
                      "feature at every position."),
}


def _ignored_regressor(student, teacher, regressor):
    return F.mse_loss(*_pool_t(student, teacher)) if student.shape[1] == teacher.shape[1] else \
        torch.tensor(float("nan"), dtype=student.dtype)


def check_hint_loss(fn: Callable) -> bool:
    """``fn(student, teacher, regressor)`` must equal
    mean((regressor(student) - avgpool(teacher))^2), the larger map pooled."""
    # 1. is the regressor used at all? (channels differ: it must be)
    s, t = _randn(4, 8, 8, 8, seed=1, relu=True), _randn(4, 16, 16, 16, seed=2, relu=True)
    counting = _Counting(_regressor(8, 16))
    try:
        fn(s, t, counting)
    except NotImplementedError:
        raise
    except Exception as exc:
        if counting.calls == 0:
            raise CheckFailed(f"the regressor is missing: student (8 channels) and teacher (16 channels) cannot be "
                              f"compared directly ({type(exc).__name__}: {exc}). Apply regressor(student) first — "
                              f"it maps C_s to C_t and is trained with the student.") from exc
        raise CheckFailed(f"hint_loss raised {type(exc).__name__}: {exc} (student {tuple(s.shape)}, teacher {tuple(t.shape)})") from exc
    if counting.calls == 0:
        raise CheckFailed("the regressor is never called: apply regressor(student) before comparing with the teacher")

    cases = [
        Case((_randn(4, 8, 8, 8, seed=3, relu=True), _randn(4, 16, 16, 16, seed=4, relu=True), _regressor(8, 16, seed=1)),
             {}, "student (4, 8, 8, 8), teacher (4, 16, 16, 16): channels and size differ"),
        Case((_randn(2, 6, 4, 4, seed=5), _randn(2, 12, 4, 4, seed=6), _regressor(6, 12, seed=2)),
             {}, "student (2, 6, 4, 4), teacher (2, 12, 4, 4): only channels differ"),
        Case((_randn(3, 8, 4, 4, seed=7, relu=True), _randn(3, 8, 8, 8, seed=8, relu=True), _regressor(8, 8, seed=3)),
             {}, "student (3, 8, 4, 4), teacher (3, 8, 8, 8): equal channels, still a regressor"),
        Case((_randn(5, 10, seed=9), _randn(5, 20, seed=10), _regressor(10, 20, "linear", seed=4)),
             {}, "vectors: student (5, 10), teacher (5, 20), linear regressor"),
    ]
    # with equal channels a forgotten regressor still runs: say so
    ignored = {"ignored": (_ignored_regressor, "the regressor is not applied (channels happen to match here): "
                                               "FitNets always compares regressor(student) with the teacher.")}
    check_inputs_untouched("hint_loss", fn, cases[0].args, ("student", "teacher", "regressor"))
    _quiet(diagnose, "hint_loss", fn, feature.hint_loss, [cases[2]], {**ignored, **HINT_VARIANTS}, rtol=1e-6, atol=1e-9)
    ok = diagnose("hint_loss", fn, feature.hint_loss, cases, HINT_VARIANTS, rtol=1e-6, atol=1e-9)

    # gradients must reach the student and the regressor exactly as in the reference, none the teacher
    for c in (Case((_randn(2, 4, 4, 4, seed=11), _randn(2, 8, 8, 8, seed=12), _regressor(4, 8, seed=5)), {},
                   "student (2, 4, 4, 4), teacher (2, 8, 8, 8)"),
              Case((_randn(3, 6, seed=13), _randn(3, 9, seed=14), _regressor(6, 9, "linear", seed=6)), {},
                   "vectors (3, 6) and (3, 9)")):
        check_gradients("hint_loss", fn, feature.hint_loss, c.args, label=c.label)
    return ok


def probe_hint_loss(fn: Callable, seed: int) -> dict:
    """Conv maps with the teacher larger, the student larger, equal sizes,
    equal channels (a regressor still applies), and vectors with a linear
    regressor: the loss, whether the regressor was called, and the gradients
    w.r.t. the student's features, the regressor's weights and the
    teacher's features (which must be zero: the teacher is detached)."""
    g = contract.generator(seed)
    case = seed % 5
    b = 1 + draw_int(g, 0, 4)
    cs = 2 + draw_int(g, 0, 6)
    ct = cs if case == 2 else cs + 1 + draw_int(g, 0, 8)
    h = [4, 4, 3, 0, 8][case]
    if case == 3:
        s_shape, t_shape, kind = (b, cs), (b, ct), "linear"
    else:
        th = {0: 2 * h, 1: h, 2: 2 * h, 4: h // 2}[case]
        s_shape, t_shape, kind = (b, cs, h, h), (b, ct, th, th), "conv"
    s = torch.randn(*s_shape, generator=g, dtype=torch.float64).clamp_min(0).requires_grad_(True)
    t = (torch.randn(*t_shape, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    torch.manual_seed(seed)
    reg = _Counting(feature.HintRegressor(cs, ct, kind=kind).double())
    out, raised = contract.attempt(fn, s, t, reg)
    if raised:
        return {**raised, "regressor_calls": reg.calls}
    data = _loss_data("hint_loss", out, {"student": s, "teacher": t, **dict(reg.inner.named_parameters())}, seed)
    data["regressor_calls"] = min(reg.calls, 1)
    return data


def _pool_larger(s, t):
    if s.ndim == 4 and s.shape[-2:] != t.shape[-2:]:
        if s.shape[-2] * s.shape[-1] > t.shape[-2] * t.shape[-1]:
            return F.adaptive_avg_pool2d(s, t.shape[-2:]), t
        return s, F.adaptive_avg_pool2d(t, s.shape[-2:])
    return s, t


def _as_exercise_variant(f):
    """A HINT_VARIANTS entry with the teacher detached and a student map larger
    than the teacher's pooled first (a 1x1 regressor commutes with pooling),
    as the exercise's answer does."""
    def loss(student, teacher, regressor):
        t = teacher.detach()
        if student.ndim == 4 and student.shape[-2] * student.shape[-1] > t.shape[-2] * t.shape[-1]:
            student = F.adaptive_avg_pool2d(student, t.shape[-2:])
        return f(student, t, regressor)
    return loss


def _no_regressor(student, teacher, regressor):
    return F.mse_loss(*_pool_larger(student, teacher.detach()))


def _teacher_not_detached(student, teacher, regressor):
    return F.mse_loss(*_pool_larger(regressor(student), teacher))


HINT_EXERCISE_VARIANTS = {
    "no_regressor": (_no_regressor, "the regressor is never applied: FitNets compares regressor(student) with the "
                                    "teacher (it maps C_s to C_t and is trained with the student)."),
    "teacher_not_detached": (_teacher_not_detached,
                             "the loss sends gradients into the teacher's features: use teacher.detach() (the teacher "
                             "is frozen; only the student and the regressor learn)"),
    **{k: (_as_exercise_variant(f), h) for k, (f, h) in HINT_VARIANTS.items()},
}

"""Lab 1 checks: soft targets and the KD loss here; the gradients by hand, the
distillation step, the ensemble teacher and the choice on validation in
:mod:`kdcourse.checks.lab1_training` (re-exported, declared in ``EXERCISES``)."""
from __future__ import annotations

import contextlib
import io
from typing import Callable

import torch
import torch.nn.functional as F

from .contract import draw_int
from ..losses import response
from . import Case, CheckFailed, contract, diagnose
from .lab1_training import inplace_guard, visible_check


def _logits(n, c, scale, seed):
    return torch.randn(n, c, generator=contract.generator(seed), dtype=torch.float64) * scale


# --------------------------------------------------------------------------
# Lab 1: soft targets
# --------------------------------------------------------------------------

SOFT_TARGETS_VARIANTS = {
    "no_T": (lambda z, T: F.softmax(z, -1), "the temperature is ignored — divide the logits by T before the softmax."),
    "times_T": (lambda z, T: F.softmax(z * T, -1), "the logits are multiplied by T; they must be *divided* by T (higher T → softer)."),
    "log": (lambda z, T: F.log_softmax(z / T, -1), "this is log-softmax; soft targets are probabilities (use softmax)."),
    "dim0": (lambda z, T: F.softmax(z / T, 0), "the softmax runs over the batch (dim 0); it must run over classes (dim=-1)."),
    "naive": (lambda z, T: torch.exp(z / T) / torch.exp(z / T).sum(-1, keepdim=True),
              "exp overflows for large logits; subtract the row maximum first (or use torch.softmax)."),
}


def check_soft_targets(fn: Callable) -> bool:
    """``fn(logits, T)`` must return softmax(logits / T) along the last dim."""
    cases = [Case((_logits(4, 5, 3.0, s), T), {}, f"(4, 5) logits at T={T}") for s, T in ((0, 1.0), (1, 4.0), (2, 0.5))]
    cases.append(Case((torch.tensor([[8.5, 7.8, 6.2, 0.1, -2.3]], dtype=torch.float64), 2.0), {}, "the seed's logits at T=2"))
    cases.append(Case((torch.tensor([[1000.0, 0.0, -1000.0]], dtype=torch.float64), 1.0), {}, "huge logits (overflow test)"))
    inplace_guard("soft_targets", fn, ["logits"], [_logits(4, 5, 3.0, 0), 2.0])
    with contextlib.redirect_stdout(io.StringIO()) as passed:
        ok = diagnose("soft_targets", fn, response.soft_targets, cases, SOFT_TARGETS_VARIANTS)
    # every shape the docstring promises ((C,), (N, C), (A, B, C)) and the gradient, as the grader probes them
    ok = ok and visible_check("soft_targets", fn, quiet=True)
    print(passed.getvalue(), end="")
    return ok


# --------------------------------------------------------------------------
# Lab 1: the KD loss and its usual mistakes
# --------------------------------------------------------------------------

def _kl_rev(s, t, T):
    log_ps, log_pt = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
    return (log_ps.exp() * (log_ps - log_pt)).sum(-1).mean()


def _kl(s, t, T, reduction="batchmean"):
    return F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction=reduction)


def _blend(soft_fn):
    def loss(s, t, y, T=4.0, alpha=0.9):
        return alpha * soft_fn(s, t, T) + (1 - alpha) * F.cross_entropy(s, y)
    return loss


KD_LOSS_VARIANTS = {
    "no_T2": (_blend(lambda s, t, T: _kl(s, t, T)),
              "off by a factor T² on the KL term — did you scale the soft loss by T**2? (Hinton et al. 2015, section 2)"),
    "times_T": (_blend(lambda s, t, T: _kl(s, t, T) * T),
                "the KL term is scaled by T; the gradient shrinks as 1/T², so the factor must be T**2."),
    "reversed": (_blend(lambda s, t, T: _kl_rev(s, t, T) * T * T),
                 "the KL divergence runs the wrong way: compute KL(teacher ‖ student) — F.kl_div(student_log_probs, teacher_probs)."),
    "mean": (_blend(lambda s, t, T: _kl(s, t, T, "mean") * T * T),
             "F.kl_div with reduction='mean' also divides by the number of classes; use reduction='batchmean'."),
    "sum": (_blend(lambda s, t, T: _kl(s, t, T, "sum") * T * T),
            "reduction='sum' adds over the batch; use reduction='batchmean' so the loss does not grow with batch size."),
    "softmax_input": (_blend(lambda s, t, T: F.kl_div(F.softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T * T),
                      "F.kl_div's first argument must be *log*-probabilities: use F.log_softmax for the student."),
    "log_target": (_blend(lambda s, t, T: F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="batchmean") * T * T),
                   "the teacher's side is log-probabilities but F.kl_div expects probabilities (or pass log_target=True)."),
    "T_student_only": (_blend(lambda s, t, T: F.kl_div(F.log_softmax(s / T, -1), F.softmax(t, -1), reduction="batchmean") * T * T),
                       "the temperature is applied to the student only; divide the teacher's logits by T as well."),
    "T_teacher_only": (_blend(lambda s, t, T: F.kl_div(F.log_softmax(s, -1), F.softmax(t / T, -1), reduction="batchmean") * T * T),
                       "the temperature is applied to the teacher only; divide the student's logits by T as well."),
    "alpha_swapped": (lambda s, t, y, T=4.0, alpha=0.9: (1 - alpha) * _kl(s, t, T) * T * T + alpha * F.cross_entropy(s, y),
                      "alpha weights the wrong term: alpha multiplies the distillation term, (1 - alpha) the cross-entropy."),
    "no_ce": (lambda s, t, y, T=4.0, alpha=0.9: alpha * _kl(s, t, T) * T * T,
              "the hard-label term is missing: add (1 - alpha) * cross_entropy(student_logits, labels)."),
    "ce_at_T": (lambda s, t, y, T=4.0, alpha=0.9: alpha * _kl(s, t, T) * T * T + (1 - alpha) * F.cross_entropy(s / T, y),
                "the cross-entropy with the labels must use the raw student logits (T = 1), not logits / T."),
    "student_detached": (_blend(lambda s, t, T: _kl(s.detach(), t, T) * T * T),
                         "the value is right but the student's logits are detached in the KL term, so the gradient "
                         "comes from the cross-entropy alone: do not .detach() the student's side."),
}


def check_kd_loss(fn: Callable) -> bool:
    """``fn(student_logits, teacher_logits, labels, T=, alpha=)`` must equal
    alpha·T²·KL(p_t^T ‖ p_s^T) + (1-alpha)·CE(student_logits, labels)."""
    inplace_guard("kd_loss", fn, ["student_logits", "teacher_logits", "labels"],
                  [_logits(4, 5, 2.0, 97), _logits(4, 5, 4.0, 96), torch.tensor([0, 1, 2, 4])], {"T": 2.0, "alpha": 0.5})
    cases = []
    for seed, (n, c, T, alpha) in enumerate([(8, 10, 4.0, 0.9), (5, 3, 2.0, 0.5), (16, 10, 8.0, 0.7), (3, 7, 1.0, 0.3)]):
        s, t = _logits(n, c, 2.0, 10 + seed), _logits(n, c, 4.0, 20 + seed)
        y = torch.randint(0, c, (n,), generator=contract.generator(30 + seed))
        cases.append(Case((s, t, y), {"T": T, "alpha": alpha}, f"N={n}, C={c}, T={T}, alpha={alpha}"))
    with contextlib.redirect_stdout(io.StringIO()) as passed:
        ok = diagnose("kd_loss", fn, response.kd_loss, cases, KD_LOSS_VARIANTS)

    # Gradients must reach the student's logits (teacher logits arrive as
    # constants: the trainer computes them under no_grad or from its cache).
    s = _logits(4, 5, 2.0, 99).requires_grad_(True)
    t = _logits(4, 5, 2.0, 98)
    y = torch.tensor([0, 1, 2, 3])
    out = fn(s, t, y, T=4.0, alpha=0.9)
    if out.ndim != 0:
        raise CheckFailed(f"kd_loss must return a scalar (0-dim tensor), got shape {tuple(out.shape)}")
    out.backward()
    if s.grad is None or not torch.isfinite(s.grad).all():
        raise CheckFailed("kd_loss gives no finite gradient to student_logits — is something detached?")
    # the gradient w.r.t. the student's logits must be the reference's (a loss that detaches the
    # wrong side can have the right value), on the shapes and defaults the grader probes
    ok = ok and visible_check("kd_loss", fn, quiet=True)
    print(passed.getvalue(), end="")
    return ok


# --------------------------------------------------------------------------
# Declarations (kdcourse.checks.contract): what the grader probes
# --------------------------------------------------------------------------

def probe_soft_targets(fn: Callable, seed: int) -> dict:
    """Logits of shape (C,), (N, C) or (A, B, C), at several temperatures,
    huge logits on every fourth seed; the probabilities and their gradient."""
    g = contract.generator(seed)
    shape = [(draw_int(g, 2, 9),), (3, 7), (2, 3, 4), (5, 3)][seed % 4]
    scale = 1000.0 if seed % 4 == 3 else 4.0  # exp(z) overflows float64 beyond 709
    logits = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_(True)
    T = 1.0 if seed % 4 == 3 else [1.0, 2.0, 0.5, 4.0, 8.0, 3.0][seed % 6]
    out = fn(logits, T)
    if not isinstance(out, torch.Tensor):
        raise contract.PlainDataError(f"soft_targets must return a torch.Tensor, got {type(out).__name__}")
    return {"probs": contract.plain(out), "grad": contract.grad(out, [logits], seed)}


def probe_kd_loss(fn: Callable, seed: int) -> dict:
    """Random N, C, T and alpha (the defaults T=4, alpha=0.9 on every fifth
    seed); the loss and its gradient w.r.t. the student's logits (the
    teacher's side may or may not be detached: both are right)."""
    g = contract.generator(seed)
    n, c = draw_int(g, 1, 17), draw_int(g, 2, 13)
    s = (torch.randn(n, c, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    t = torch.randn(n, c, generator=g, dtype=torch.float64) * 4
    y = torch.randint(0, c, (n,), generator=g)
    if seed % 5 == 0:
        out = fn(s, t, y)
    else:
        T, alpha = [2.0, 1.0, 8.0, 3.0][seed % 4], [0.5, 0.3, 0.9, 0.7, 1.0][seed % 5]
        out = fn(s, t, y, T=T, alpha=alpha)
    return {"loss": contract.scalar(out, "kd_loss"), "grad_student": contract.grad(out, [s], seed)}


EXERCISES = [
    contract.Exercise(name="soft_targets", points=1.0, check=check_soft_targets, probe=probe_soft_targets,
                      reference=response.soft_targets, variants=SOFT_TARGETS_VARIANTS, hidden_seeds=(0, 1, 2, 3, 4, 7),
                      rtol=1e-6, atol=1e-9),
    contract.Exercise(name="kd_loss", points=1.0, check=check_kd_loss, probe=probe_kd_loss,
                      reference=response.kd_loss, variants=KD_LOSS_VARIANTS, hidden_seeds=(0, 1, 2, 3, 4, 6),
                      rtol=1e-6, atol=1e-9, refuse=(response.kd_loss, response.kl_divergence)),
]

# The second part of the lab (gradients by hand, the distillation step, the
# ensemble teacher, the choice on validation): checks in lab1_training.
from .lab1_training import (  # noqa: E402  (after EXERCISES: lab1_training looks them up here)
    check_ce_grad, check_distill_step, check_ensemble_logits, check_kd_grad, check_pick_on_validation,
    declarations as _training_declarations, self_test_questions,
)

EXERCISES += _training_declarations()

# The third part (measuring a model: accuracy, calibration, the missing class's bias): checks in lab1_eval.
from .lab1_eval import (  # noqa: E402
    check_accuracy, check_calibration_temperature, check_choose_bias, check_ece,
    declarations as _eval_declarations,
)

EXERCISES += _eval_declarations()

"""Lab 1 checks, second part: the gradients by hand and the distillation
step (the ensemble teacher, the choice made on validation and the
declarations are in :mod:`kdcourse.checks.lab1_choice`).

Every check here runs the exercise's *probe* (the same function the grader
runs, :mod:`kdcourse.checks.contract`) on a few seeds for the student's
function, the reference and each known-wrong variant, and decides from that
plain data: the visible check and the grader cannot disagree. A probe feeds
every input shape the exercise's docstring promises, records the gradients
where they matter, and records whether an input tensor was changed in place
(named as such, before any other diagnosis). :mod:`kdcourse.checks.lab1`
declares these exercises in its ``EXERCISES`` and re-exports the checks.
"""
from __future__ import annotations

import ast
import inspect
import textwrap
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .contract import draw_int
from ..data import Batch
from . import CheckFailed, contract, probing
from .probing import INPLACE
VISIBLE_SEEDS = (0, 1, 2, 3)


# --------------------------------------------------------------------------
# Shared: calling with guarded inputs, and the visible check
# --------------------------------------------------------------------------

def _call_guarded(fn: Callable, names: list, args: list):
    """``fn(*args)`` and the names of the tensor arguments it changed in place."""
    before = [a.detach().clone() if isinstance(a, torch.Tensor) else None for a in args]
    out = fn(*args)
    changed = [n for n, a, b in zip(names, args, before)
               if b is not None and not (a.shape == b.shape and torch.equal(a.detach(), b))]
    return out, changed


def inplace_guard(name: str, fn: Callable, names: list, args: list, kwargs: dict | None = None) -> None:
    """Call ``fn`` on copies of ``args``; raise :class:`CheckFailed` naming
    each tensor argument it changed in place. Other errors are left to the
    check that follows."""
    copies = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    try:
        _, changed = _call_guarded(lambda *a: fn(*a, **(kwargs or {})), names, copies)
    except NotImplementedError:
        raise
    except Exception:
        return
    if changed:
        raise CheckFailed(f"{name} changed its input {', '.join(changed)} in place (e.g. `x /= T`, `x -= ...`, "
                          "`.exp_()`): the caller's tensor is modified. Work on a new tensor (out-of-place operations).")


def _exercise(name: str) -> contract.Exercise:
    from . import lab1

    for ex in lab1.EXERCISES:
        if ex.name == name:
            return ex
    raise KeyError(name)  # pragma: no cover - every check here is declared


def visible_check(name: str, fn: Callable, seeds=VISIBLE_SEEDS, hints: Callable | None = None, quiet: bool = False) -> bool:
    """Probe ``fn`` on ``seeds``; raise :class:`CheckFailed` naming the
    mistake, or print one ✓ line and return ``True``. ``hints(data)`` may
    name a mistake from the student's data alone (checked first)."""
    return probing.probe_check(_exercise(name), fn, seeds, hints, quiet, what="every value and gradient they record")


def _not_autograd(name: str, fn: Callable) -> None:
    """The gradient exercises ask for the formula; autograd is the comparison."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return
    names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} | \
        {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    if names & {"autograd", "backward", "grad"}:
        raise CheckFailed(f"{name} uses autograd; write the formula by hand (the next cell compares it with autograd)")


# --------------------------------------------------------------------------
# The gradient on every class: ∂CE/∂z and ∂KL/∂z by hand
# --------------------------------------------------------------------------

def reference_ce_grad(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """softmax(logits) − one_hot(labels), row by row."""
    return torch.softmax(logits, dim=-1) - F.one_hot(labels, logits.shape[-1]).to(logits.dtype)


def reference_kd_grad(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """(softmax(student_logits / T) − softmax(teacher_logits / T)) / T, row by row."""
    return (torch.softmax(student_logits / T, dim=-1) - torch.softmax(teacher_logits / T, dim=-1)) / T


# The variants below compute the same formulas through private copies: the
# grading kernel refuses the declared references, and a planted variant must
# still run there (see the contract's rule on variants).
def _ce_formula(z, y):
    return torch.softmax(z, dim=-1) - F.one_hot(y, z.shape[-1]).to(z.dtype)


def _kd_formula(s, t, T):
    return (torch.softmax(s / T, dim=-1) - torch.softmax(t / T, dim=-1)) / T


def _only_true_class(z, y):
    g = torch.zeros_like(z)
    return g.scatter(-1, y.unsqueeze(-1), (torch.softmax(z, -1).gather(-1, y.unsqueeze(-1)) - 1))


def _batch_mean_ce(z, y):
    return _ce_formula(z, y) / (z.shape[0] if z.ndim == 2 else 1)


CE_GRAD_VARIANTS = {
    "handout": (_only_true_class,
                "only the true class gets a gradient here — the handout's claim, and it is false: a wrong class i gets "
                "p_i (the loss pushes it down in proportion to its probability). ∂CE/∂z = softmax(z) − one_hot(y)."),
    "sign": (lambda z, y: -_ce_formula(z, y),
             "the sign is flipped: ∂CE/∂z = p − y (descending it lowers the wrong classes and raises the true one)."),
    "batch_mean": (_batch_mean_ce,
                   "divided by the batch size: that is the gradient of the batch *mean*; give each example's own gradient "
                   "(the gradient of the summed loss)."),
    "logits": (lambda z, y: z - F.one_hot(y, z.shape[-1]).to(z.dtype),
               "the logits stand where the probabilities belong: ∂CE/∂z = softmax(z) − one_hot(y)."),
    "log_probs": (lambda z, y: torch.log_softmax(z, -1) - F.one_hot(y, z.shape[-1]).to(z.dtype),
                  "log-probabilities stand where the probabilities belong: use softmax(z), not log_softmax(z)."),
}


def _logits_and_labels(seed: int):
    g = contract.generator(seed)
    c = draw_int(g, 2, 11)
    if seed % 3 == 0:  # one example: logits (C,), a 0-dim label
        z = torch.randn(c, generator=g, dtype=torch.float64) * 3
        return z, torch.randint(0, c, (), generator=g), f"one example, logits ({c},)"
    n = draw_int(g, 1, 9)
    z = torch.randn(n, c, generator=g, dtype=torch.float64) * (30.0 if seed % 3 == 2 else 3.0)
    return z, torch.randint(0, c, (n,), generator=g), f"a batch, logits ({n}, {c})"


def probe_ce_grad(fn: Callable, seed: int) -> dict:
    """Logits (C,) with a 0-dim label, or (N, C) with labels (N,), large
    logits on every third seed; the gradient returned."""
    z, y, case = _logits_and_labels(seed)
    out, changed = _call_guarded(fn, ["logits", "labels"], [z, y])
    if not isinstance(out, torch.Tensor):
        raise contract.PlainDataError(f"ce_grad must return a torch.Tensor, got {type(out).__name__}")
    return {"case": case, INPLACE: changed, "gradient": contract.plain(out)}


def check_ce_grad(fn: Callable) -> bool:
    """``fn(logits, labels)`` must return ∂CE/∂logits = softmax(logits) − one_hot(labels)
    for logits (C,) with a 0-dim label or (N, C) with labels (N,)."""
    _not_autograd("ce_grad", fn)
    return visible_check("ce_grad", fn)


KD_GRAD_VARIANTS = {
    "no_chain_rule": (lambda s, t, T: _kd_formula(s, t, T) * T,
                      "the 1/T of the chain rule is missing (d(z/T)/dz = 1/T): ∂KL/∂z_s = (p_s − p_t) / T."),
    "scaled_T2": (lambda s, t, T: _kd_formula(s, t, T) * T ** 3,
                  "this is the gradient of T²·KL, the scaled loss; the exercise asks for the KL alone: (p_s − p_t) / T."),
    "over_T2": (lambda s, t, T: _kd_formula(s, t, T) / T,
                "divided by T²: one factor 1/T comes from the chain rule, the probabilities are not divided again."),
    "sign": (lambda s, t, T: -_kd_formula(s, t, T),
             "the sign is flipped: the student's probabilities minus the teacher's, (p_s − p_t) / T."),
    "no_temperature": (lambda s, t, T: (torch.softmax(s, -1) - torch.softmax(t, -1)) / T,
                       "the probabilities must be taken at temperature T: softmax(z / T) for both."),
}


def probe_kd_grad(fn: Callable, seed: int) -> dict:
    """Student and teacher logits (C,) or (N, C), T in 0.5 … 16; the
    gradient returned."""
    z, _, case = _logits_and_labels(seed)
    g = contract.generator(seed + 1000)
    t = torch.randn(z.shape, generator=g, dtype=torch.float64) * 4
    T = [1.0, 2.0, 4.0, 0.5, 8.0, 16.0, 3.0][seed % 7]
    out, changed = _call_guarded(fn, ["student_logits", "teacher_logits", "T"], [z, t, T])
    if not isinstance(out, torch.Tensor):
        raise contract.PlainDataError(f"kd_grad must return a torch.Tensor, got {type(out).__name__}")
    return {"case": f"{case}, T={T:g}", INPLACE: changed, "gradient": contract.plain(out)}


def check_kd_grad(fn: Callable) -> bool:
    """``fn(student_logits, teacher_logits, T)`` must return ∂KL(p_t^T ‖ p_s^T)/∂student_logits
    = (p_s^T − p_t^T) / T for logits (C,) or (N, C)."""
    _not_autograd("kd_grad", fn)
    return visible_check("kd_grad", fn)


# --------------------------------------------------------------------------
# The distillation step
# --------------------------------------------------------------------------

def _probe_loss(student_logits, teacher_logits, labels, T=4.0, alpha=0.9):
    """The KD loss the step probe hands in (not the package's, which the
    grading kernel refuses: this one is the probe's own copy)."""
    kl = F.kl_div(F.log_softmax(student_logits / T, -1), F.softmax(teacher_logits / T, -1), reduction="batchmean")
    return alpha * T * T * kl + (1 - alpha) * F.cross_entropy(student_logits, labels)


def _tiny_net(g: torch.Generator, width: int, classes: int) -> nn.Module:
    net = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
        bn = net[1]
        bn.running_mean.copy_(torch.randn(width, generator=g, dtype=torch.float64) * 0.3)
        bn.running_var.copy_(torch.rand(width, generator=g, dtype=torch.float64) + 0.5)
    return net


class _Recorder:
    """Forward pre-hooks noting each call's input and the module's mode."""

    def __init__(self, module: nn.Module):
        self.calls = []
        module.register_forward_pre_hook(lambda m, args: self.calls.append((args[0].detach().clone(), m.training)))


def probe_distill_step(fn: Callable, seed: int) -> dict:
    """Tiny float64 conv nets with batch-norm, the teacher handed over in
    **train mode with trainable parameters** (as a careless caller might),
    a batch of 2–9 images 3×6×6, T and alpha varied. Records what the
    teacher saw and in which mode, its running statistics, whether a
    gradient reached it, the loss, the logits returned and the gradient
    w.r.t. the student's parameters."""
    g = contract.generator(seed)
    classes, b = draw_int(g, 3, 7), draw_int(g, 2, 10)
    student, teacher = _tiny_net(g, 4, classes), _tiny_net(g, 6, classes)
    student.train()
    teacher.train()
    x = torch.randn(b, 3, 6, 6, generator=g, dtype=torch.float64)
    batch = Batch(x.clone(), torch.randint(0, classes, (b,), generator=g), torch.arange(b))
    T, alpha = [2.0, 4.0, 1.0, 8.0, 3.0][seed % 5], [0.9, 0.5, 0.7, 0.3][seed % 4]
    stats = [teacher[1].running_mean.clone(), teacher[1].running_var.clone()]
    t_rec, s_rec = _Recorder(teacher), _Recorder(student)
    before = {"batch.x": batch.x.clone(), "batch.labels": batch.labels.clone()}
    out = fn(student, teacher, batch, T, alpha, _probe_loss)
    changed = [k for k, v in (("batch.x", batch.x), ("batch.labels", batch.labels)) if not torch.equal(v, before[k])]
    if not (isinstance(out, tuple) and len(out) == 2 and all(isinstance(o, torch.Tensor) for o in out)):
        raise contract.PlainDataError("distill_step must return a pair (loss, student_logits) of tensors, got "
                                      f"{type(out).__name__}")
    loss, logits = out
    saw = [c[0] for c in t_rec.calls] + [c[0] for c in s_rec.calls]
    t_params = [p for p in teacher.parameters() if p.requires_grad]  # a step may freeze the teacher: also right
    s_params = [p for p in student.parameters()]
    if loss.requires_grad:
        grads = torch.autograd.grad(loss, s_params + t_params, allow_unused=True)
        reached = any(gr is not None and bool(gr.abs().sum() > 0) for gr in grads[len(s_params):])
        s_grads = [contract.plain(torch.zeros_like(p) if gr is None else gr) for p, gr in zip(s_params, grads)]
    else:
        reached, s_grads = False, "no graph"
    return {
        "case": f"a batch of {b} images, {classes} classes, T={T:g}, alpha={alpha:g}",
        INPLACE: changed,
        "teacher was called": bool(t_rec.calls),
        "student and teacher both saw batch.x": bool(saw) and all(v.shape == x.shape and torch.equal(v, x) for v in saw),
        "teacher in eval mode during its forward": bool(t_rec.calls) and not any(m for _, m in t_rec.calls),
        "teacher's batch-norm statistics unchanged": bool(torch.equal(stats[0], teacher[1].running_mean)
                                                          and torch.equal(stats[1], teacher[1].running_var)),
        "a gradient reached the teacher": reached,
        "loss": contract.scalar(loss, "the loss distill_step returns"),
        "student logits returned": contract.plain(logits),
        "gradient w.r.t. the student's parameters": s_grads,
    }


def _step_variant(teacher_mode="eval", grad=False, teacher_input=None, call=None, returns="student"):
    def step(student, teacher, batch, T, alpha, loss):
        if teacher_mode == "eval":
            teacher.eval()
        x_t = batch.x if teacher_input is None else teacher_input(batch.x)
        if grad:
            t = teacher(x_t)
        else:
            with torch.no_grad():
                t = teacher(x_t)
        s = student(batch.x)
        value = call(loss, s, t, batch.labels, T, alpha) if call else loss(s, t, batch.labels, T=T, alpha=alpha)
        return value, (s if returns == "student" else t)
    return step


TRAIN_MODE_HINT = ("the teacher ran in train mode: its batch-norm layers normalised with this batch's statistics and "
                   "updated their running averages (even under no_grad). Call teacher.eval() before its forward pass.")
GRAD_HINT = ("a gradient reached the teacher: compute the teacher's logits under `with torch.no_grad():` "
             "(or .detach() them) — the teacher is a fixed target, not a model being trained.")
BATCH_HINT = ("the student and the teacher saw different images: feed the same batch.x, in the same order, to both "
              "(the soft target of image i must be the teacher's prediction for image i).")
T_CE_HINT = ("the temperature reaches the cross-entropy term: pass the raw logits and T to the loss — it divides the "
             "logits by T inside the KL term only; the CE with the labels uses the raw student logits.")

DISTILL_STEP_VARIANTS = {
    "teacher_train_mode": (_step_variant(teacher_mode="train"), TRAIN_MODE_HINT),
    "gradient_to_teacher": (_step_variant(grad=True), GRAD_HINT),
    "different_batches": (_step_variant(teacher_input=lambda x: x.roll(1, 0)), BATCH_HINT),
    "T_on_logits": (_step_variant(call=lambda loss, s, t, y, T, a: loss(s / T, t / T, y, T=1.0, alpha=a)), T_CE_HINT),
    "T_twice": (_step_variant(call=lambda loss, s, t, y, T, a: loss(s / T, t / T, y, T=T, alpha=a)), T_CE_HINT),
    "defaults": (_step_variant(call=lambda loss, s, t, y, T, a: loss(s, t, y)),
                 "T and alpha never reach the loss (it ran with its defaults): call "
                 "loss(student_logits, teacher_logits, batch.labels, T=T, alpha=alpha)."),
    "returns_teacher_logits": (_step_variant(returns="teacher"),
                               "the logits returned are the teacher's; return the student's (the loop measures the "
                               "student's training accuracy with them)."),
}


def _step_hints(data: dict) -> str | None:
    if not data["teacher was called"]:
        return "the teacher is never called: its logits are teacher(batch.x)."
    if not data["teacher in eval mode during its forward"] or not data["teacher's batch-norm statistics unchanged"]:
        return TRAIN_MODE_HINT
    if data["a gradient reached the teacher"]:
        return GRAD_HINT
    if not data["student and teacher both saw batch.x"]:
        return BATCH_HINT
    return None


def check_distill_step(fn: Callable) -> bool:
    """``fn(student, teacher, batch, T, alpha, loss)`` must return
    ``(loss(student_logits, teacher_logits, batch.labels, T=T, alpha=alpha), student_logits)``
    with the teacher run in eval mode and without gradient, on batch.x."""
    return visible_check("distill_step", fn, hints=_step_hints)


# --------------------------------------------------------------------------
# The ensemble teacher, the choice on validation, the declarations and the
# self-test: in lab1_choice (re-exported here, where they used to live)
# --------------------------------------------------------------------------

from .lab1_choice import (  # noqa: E402,F401
    ENSEMBLE_VARIANTS, PICK_VARIANTS, check_ensemble_logits, check_pick_on_validation, declarations,
    probe_ensemble_logits, probe_pick_on_validation, reference_ensemble_logits, reference_pick_on_validation,
    self_test_questions,
)

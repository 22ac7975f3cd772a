"""Lab 1 checks, second part: the gradients by hand, the distillation step,
the ensemble teacher and the choice made on validation.

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
import math
import textwrap
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import Batch
from ..losses import mutual
from ..recipes import lab1 as recipe
from ..runs import Run
from . import CheckFailed, contract

INPLACE = "inputs changed in place"
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


def _is_inplace_error(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("in-place operation" in text or "modified by an inplace" in text)


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
    ex = _exercise(name)
    student, ref = {}, {}
    for s in seeds:
        try:
            student[s] = contract.run_probe(ex, fn, s)
        except NotImplementedError:
            raise
        except CheckFailed:
            raise
        except contract.PlainDataError as exc:
            raise CheckFailed(f"{name}: {exc}") from None
        except Exception as exc:
            if _is_inplace_error(exc):
                raise CheckFailed(f"{name} changes an input in place (an operation ending in _ or `x[...] = `, "
                                  f"`x /= T` on an argument): compute on a new tensor instead ({exc})") from None
            raise CheckFailed(f"{name} raised {type(exc).__name__}: {exc}") from None
        ref[s] = contract.run_probe(ex, ex.reference, s)
        changed = student[s].get(INPLACE) if isinstance(student[s], dict) else None
        if changed:
            raise CheckFailed(f"{name} changed its input {', '.join(changed)} in place (e.g. `x -= ...`, `x[...] = ...`, "
                              "`.exp_()`): the caller's tensor is modified. Work on a new tensor (out-of-place operations).")
        if hints is not None:
            hint = hints(student[s])
            if hint:
                raise CheckFailed(f"{name} is not right yet: {hint}")
    verdict = contract.diagnose_data(ex, student, ref, lambda v, s: contract.run_probe(ex, ex.variants[v][0], s))
    if verdict.ok:
        if not quiet:
            print(f"✓ {name} agrees with the reference on {len(seeds)} probes (every value and gradient they record; "
                  f"rtol={ex.rtol:g}, atol={ex.atol:g})")
        return True
    if verdict.variant:
        raise CheckFailed(verdict.hint)
    s = next(s for s in seeds if ex.differs(student[s], ref[s], s))
    case = student[s].get("case", f"seed {s}") if isinstance(student[s], dict) else f"seed {s}"
    raise CheckFailed(f"{name} differs from the reference on {case}: {ex.differs(student[s], ref[s], s)}")


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
    c = int(torch.randint(2, 11, (1,), generator=g))
    if seed % 3 == 0:  # one example: logits (C,), a 0-dim label
        z = torch.randn(c, generator=g, dtype=torch.float64) * 3
        return z, torch.randint(0, c, (), generator=g), f"one example, logits ({c},)"
    n = int(torch.randint(1, 9, (1,), generator=g))
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
    classes, b = int(torch.randint(3, 7, (1,), generator=g)), int(torch.randint(2, 10, (1,), generator=g))
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
# An ensemble teacher: average the logits, or the probabilities
# --------------------------------------------------------------------------

def reference_ensemble_logits(member_logits, mode: str = "logits", T: float = 1.0) -> torch.Tensor:
    """The mean of the members' logits, or logits whose softmax at T is the mean of their probabilities."""
    members = list(member_logits)
    if mode == "logits":
        return mutual.average_logits(members)
    if mode == "probs":
        return mutual.average_probs_as_logits(members, T=T)
    raise ValueError(f"mode must be 'logits' or 'probs', got {mode!r}")


def _ens(fn_probs=None, fn_logits=None):
    def ensemble(member_logits, mode="logits", T=1.0):
        z = torch.stack(list(member_logits))
        if mode == "logits":
            return fn_logits(z, T) if fn_logits else z.mean(0)
        return fn_probs(z, T)
    return ensemble


ENSEMBLE_VARIANTS = {
    "probs_not_logits": (_ens(lambda z, T: torch.softmax(z / T, -1).mean(0)),
                         "mode='probs' returns probabilities; return logits whose softmax at T is the mean: "
                         "T * log(mean_k softmax(z_k / T))."),
    "no_T_factor": (_ens(lambda z, T: torch.log(torch.softmax(z / T, -1).mean(0))),
                    "the log of the mean probability must be multiplied by T, so that softmax(result / T) — what "
                    "the distillation loss computes — gives back the mean probability."),
    "geometric_mean": (_ens(lambda z, T: z.mean(0)),
                       "mode='probs' averages the logits: that is the *geometric* mean of the probabilities; "
                       "average softmax(z_k / T), then take T * log of it."),
    "no_temperature": (_ens(lambda z, T: T * torch.log(torch.softmax(z, -1).mean(0))),
                       "the members' probabilities must be taken at temperature T: softmax(z_k / T)."),
    "underflow": (_ens(lambda z, T: T * torch.log(torch.softmax(z / T, -1).mean(0))),
                  "log(mean(softmax(...))) underflows to -inf for large logits; compute it from log_softmax with "
                  "torch.logsumexp over the members, minus log K."),
    "probs_for_logits": (_ens(fn_logits=lambda z, T: T * (torch.logsumexp(F.log_softmax(z / T, -1), 0) - math.log(len(z))),
                              fn_probs=lambda z, T: z.mean(0)),
                         "the two modes are swapped: 'logits' is the plain mean of the logits, 'probs' the mean of "
                         "the probabilities."),
}


def probe_ensemble_logits(fn: Callable, seed: int) -> dict:
    """K = 1 … 4 members of logits (N, C), given as a list or one (K, N, C)
    tensor; both modes, T in 1 … 8; huge logits on every fourth seed."""
    g = contract.generator(seed)
    k, n, c = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((1, 5), (1, 7), (2, 9)))
    scale = 2000.0 if seed % 4 == 3 else 3.0
    z = (torch.randn(k, n, c, generator=g, dtype=torch.float64) * scale).requires_grad_(True)
    T = [1.0, 2.0, 4.0, 8.0][seed % 4] if seed % 4 != 3 else 1.0
    members = [z[i] for i in range(k)] if seed % 2 == 0 else z
    out = {"case": f"{k} members of logits ({n}, {c}) as a {'list' if seed % 2 == 0 else '(K, N, C) tensor'}, T={T:g}"}
    before = z.detach().clone()
    for mode in ("logits", "probs"):
        res = fn(members, mode=mode, T=T)
        if not isinstance(res, torch.Tensor):
            raise contract.PlainDataError(f"ensemble_logits must return a torch.Tensor, got {type(res).__name__}")
        out[f"mode={mode}"] = contract.plain(res)
        out[f"gradient, mode={mode}"] = contract.grad(res, [z], seed)
    out[INPLACE] = [] if torch.equal(z.detach(), before) else ["member_logits"]
    return out


def check_ensemble_logits(fn: Callable) -> bool:
    """``fn(member_logits, mode, T)``: K tensors (N, C) (a list or a (K, N, C)
    tensor) → (N, C): the mean of the logits (``mode="logits"``) or
    T·log(mean_k softmax(z_k / T)) (``mode="probs"``)."""
    return visible_check("ensemble_logits", fn)


# --------------------------------------------------------------------------
# Choosing on validation
# --------------------------------------------------------------------------

def reference_pick_on_validation(results: dict):
    """The setting whose run has the highest ``val_acc`` (ties: the first listed)."""
    return max(results, key=lambda k: results[k].val_acc)


def _last_of_ties(results):
    best = max(r.val_acc for r in results.values())
    return [k for k, r in results.items() if r.val_acc == best][-1]


PICK_VARIANTS = {
    "test": (lambda results: max(results, key=lambda k: results[k].test_acc),
             "this picks on the TEST accuracy: a choice made on the test split makes the test accuracy of the chosen "
             "setting a biased estimate. Pick on val_acc."),
    "lowest": (lambda results: min(results, key=lambda k: results[k].val_acc),
               "this is the setting with the lowest validation accuracy; take the highest."),
    "last_of_ties": (_last_of_ties, "on a tie, return the first setting listed (max keeps the first of equal values)."),
    "returns_run": (lambda results: results[reference_pick_on_validation(results)],
                    "return the setting (the dict key, e.g. the temperature), not its Run."),
}


def probe_pick_on_validation(fn: Callable, seed: int) -> dict:
    """2–6 settings (numbers or strings) with runs.Run values whose
    accuracies are multiples of 1/50 (ties happen); the choice returned."""
    g = contract.generator(seed)
    k = int(torch.randint(2, 7, (1,), generator=g))
    keys = [[1, 2, 4, 8, 16, 32][:k], [0.0, 0.5, 0.9, 1.0, 0.3, 0.7][:k], [f"width/{2 ** i}" for i in range(k)]][seed % 3]
    val = (torch.randint(40, 50, (k,), generator=g).double() / 50).tolist()
    test = (torch.randint(40, 50, (k,), generator=g).double() / 50).tolist()
    results = {key: Run(f"{key}", 0, t, v, 1000, 1.0, history=None) for key, v, t in zip(keys, val, test)}
    choice = fn(dict(results))
    try:
        choice = contract.plain(choice)
    except contract.PlainDataError:
        choice = f"a {type(choice).__name__}"
    return {"case": f"{k} settings {keys}", "choice": choice}


def check_pick_on_validation(fn: Callable) -> bool:
    """``fn(results)``: ``{setting: runs.Run}`` → the setting with the highest
    ``val_acc`` (the first listed on a tie)."""
    return visible_check("pick_on_validation", fn, seeds=(0, 1, 2, 3, 4, 5))


# --------------------------------------------------------------------------
# Declarations (appended to kdcourse.checks.lab1.EXERCISES)
# --------------------------------------------------------------------------

def declarations() -> list:
    E = contract.Exercise
    return [
        E(name="ce_grad", points=1.0, check=check_ce_grad, probe=probe_ce_grad, reference=reference_ce_grad,
          variants=CE_GRAD_VARIANTS, hidden_seeds=(0, 1, 2, 3, 4, 5, 8), rtol=1e-6, atol=1e-9,
          refuse=(reference_ce_grad,)),
        E(name="kd_grad", points=1.0, check=check_kd_grad, probe=probe_kd_grad, reference=reference_kd_grad,
          variants=KD_GRAD_VARIANTS, hidden_seeds=(0, 1, 2, 3, 4, 5, 6), rtol=1e-6, atol=1e-9,
          refuse=(reference_kd_grad,)),
        E(name="distill_step", points=2.0, check=check_distill_step, probe=probe_distill_step,
          reference=recipe.distill_step, variants=DISTILL_STEP_VARIANTS, hidden_seeds=(0, 1, 2, 3, 4, 5),
          rtol=1e-6, atol=1e-9, refuse=(recipe.distill_step,)),
        E(name="ensemble_logits", points=1.0, check=check_ensemble_logits, probe=probe_ensemble_logits,
          reference=reference_ensemble_logits, variants=ENSEMBLE_VARIANTS, hidden_seeds=(0, 1, 2, 3, 4, 5, 7),
          rtol=1e-6, atol=1e-9,
          refuse=(reference_ensemble_logits, mutual.average_logits, mutual.average_probs_as_logits)),
        E(name="pick_on_validation", points=1.0, check=check_pick_on_validation, probe=probe_pick_on_validation,
          reference=reference_pick_on_validation, variants=PICK_VARIANTS, hidden_seeds=tuple(range(9)),
          refuse=(reference_pick_on_validation,)),
    ]


# --------------------------------------------------------------------------
# The end-of-lab self-test (kdcourse.lesson.self_test checks the answers)
# --------------------------------------------------------------------------

def self_test_questions(kd, scratch) -> list:
    """Lab 1's self-test; ``kd`` and ``scratch`` are the run's Summaries of
    section 5 (one question is about the student's own table)."""
    from .. import lesson

    gain = 100 * (kd.mean - scratch.mean)
    return [
        lesson.Numeric("ce_wrong", "An image is labelled 'cat'; the student gives the wrong class 'dog' probability "
                       "0.3. What is ∂CE/∂z_dog?", expected=0.3, tol=1e-3,
                       explain="∂CE/∂z_i = p_i − y_i = 0.3 − 0 = 0.3: every wrong class is pushed down in proportion to "
                               "its probability. The handout's 'zero gradient for incorrect classes' is wrong."),
        lesson.Numeric("kd_shrink", "For a large T, by what factor does the gradient of the KL term (without the T² "
                       "factor) shrink when T doubles?", expected=4.0, tol=0.25,
                       explain="The gradient is (p_s − p_t)/T, and p_s − p_t itself shrinks like 1/T: 1/T² in all, so "
                               "doubling T divides it by 4 — which is what the T² factor undoes."),
        lesson.Choice("split", "On which split did this lab choose T_MAIN?",
                      ["the training split", "the validation split", "the test split"], correct="the validation split",
                      explain="pick_on_validation read val_acc; a choice made on the test split would make the "
                              "reported test accuracy of the chosen setting a biased estimate."),
        lesson.Choice("frozen", "A teacher left in train mode is run under torch.no_grad(). What happens?",
                      ["nothing: no_grad freezes it completely",
                       "its batch-norm layers use the batch's statistics and update their running averages",
                       "it receives gradients from the student's loss"],
                      correct="its batch-norm layers use the batch's statistics and update their running averages",
                      explain="no_grad only stops gradients; batch-norm in train mode still normalises with batch "
                              "statistics and moves its running averages (section 3 measured it): call teacher.eval()."),
        lesson.Numeric("gain", "In your run, how many points did KD add over scratch (mean over seeds, to 0.1)?",
                       expected=round(gain, 1), tol=0.051,
                       explain=f"Read it from section 5: KD − scratch = {gain:+.2f} points in this run (the reading "
                               "below the table also says whether it clears the seed noise)."),
    ]

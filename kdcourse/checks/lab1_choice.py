"""Lab 1 checks, the choices: an ensemble teacher (average the logits, or the
probabilities) and the setting picked on validation; the declarations of
:mod:`kdcourse.checks.lab1_training`'s exercises and these, appended to
``kdcourse.checks.lab1.EXERCISES``; Lab 1's end-of-lab self-test.

Each check probes as the grader does (:func:`kdcourse.checks.lab1_training.visible_check`).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from .contract import draw_int
from ..losses import mutual
from ..recipes import lab1 as recipe
from ..runs import Run
from . import contract
from .lab1_training import (
    CE_GRAD_VARIANTS, DISTILL_STEP_VARIANTS, INPLACE, KD_GRAD_VARIANTS, check_ce_grad, check_distill_step,
    check_kd_grad, probe_ce_grad, probe_distill_step, probe_kd_grad, reference_ce_grad, reference_kd_grad,
    visible_check,
)


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
    k, n, c = (draw_int(g, lo, hi) for lo, hi in ((1, 5), (1, 7), (2, 9)))
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
    k = draw_int(g, 2, 7)
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

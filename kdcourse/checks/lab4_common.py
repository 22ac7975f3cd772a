"""Shared machinery of Lab 4's checks: the KL the variants are built from,
and, for the contract-based checks, the visible check that runs the
grader's probe and decides exactly as the grader does (:func:`_decide`),
faults (an in-place change of an input, an exception) compared before
values (:func:`_compare_faults`)."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from . import CheckFailed, contract


def _kl(target_logits, logits, T, reduction="batchmean"):
    """KL(softmax(target/T) || softmax(logits/T)) (no T², no detach)."""
    with warnings.catch_warnings():  # reduction="mean" warns; it is a deliberate wrong variant here
        warnings.simplefilter("ignore", UserWarning)
        return F.kl_div(F.log_softmax(logits / T, -1), F.log_softmax(target_logits / T, -1),
                        reduction=reduction, log_target=True)



HIDDEN_SEEDS = (0, 1, 2, 3)
INPLACE_HINT = ("changes its inputs in place (e.g. z /= T, or exit_logits.pop('final')): the caller's tensors are not yours "
                "to change — compute new tensors (z / T) instead.")


def _digest(tensors) -> list:
    return [contract.plain(t.detach().clone()) for t in tensors]


def _inputs_changed(before: list, tensors) -> bool:
    return any(not torch.equal(b, t.detach()) for b, t in zip(before, tensors))


def _compare_faults(fields):
    """``compare(student, other, seed)``: a fault field (an in-place change, an
    exception) is compared first; when both sides show it they agree."""
    def compare(student, other, seed=0):
        for f in fields:
            fs, fo = student.get(f), other.get(f)
            if fs or fo:
                return None if fs == fo else f"{f}: {fs!r} vs {fo!r}"
        return contract.compare(student, other, 1e-6, 1e-9)
    return compare


def _decide(exercise, fn, seeds=(0, 1)) -> None:
    """The student's probe data against the reference's and the variants', as the grader decides."""
    student = {s: contract.run_probe(exercise, fn, s) for s in seeds}
    for s in seeds:
        if student[s].get("inputs_changed_in_place"):
            raise CheckFailed(f"{exercise.name} {INPLACE_HINT}")
        if student[s].get("raised"):
            raise CheckFailed(f"{exercise.name} raised {student[s]['raised']} on a check input"
                              + (f": {student[s].get('message', '')}" if student[s].get("message") else ""))
    reference = {s: contract.run_probe(exercise, exercise.reference, s) for s in seeds}
    variants = lambda name, seed: contract.run_probe(exercise, exercise.variants[name][0], seed)  # noqa: E731
    v = contract.diagnose_data(exercise, student, reference, variants)
    if not v.ok:
        raise CheckFailed(v.hint.replace("on a hidden test", "on a check input"))


def _attempt(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs), None
    except NotImplementedError:
        raise
    except Exception as exc:
        if contract.is_refusal(exc):
            raise
        return None, {"raised": type(exc).__name__, "message": str(exc)[:300]}


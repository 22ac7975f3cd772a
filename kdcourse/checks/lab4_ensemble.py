"""Lab 4 checks on the exercise contract: the ensemble's average (of logits,
or of probabilities at a temperature), and two statistics of a comparison
over seeds — the minimal detectable difference and the paired t.

* ``ensemble_logits(member_logits, mode, T)`` is compared through what it
  means: the probe takes ``softmax(out / T)`` of the student's logits (so a
  constant added to a row, which changes no prediction, is accepted) and
  its gradient w.r.t. every member, on classes up to thousands of logits apart
  (where the naive ``log(mean(softmax))`` has an infinite log and a NaN
  gradient).
* ``mdd(values, t)`` is compared on seeded per-seed accuracies (2 to 8
  seeds, several t), including the NumPy and ``statistics`` ways of taking a
  sample standard deviation.
* ``paired_t(a, b)`` is compared on seeded paired per-seed values, equal
  differences (a zero spread) included.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from .contract import draw_int
from . import CheckFailed, contract
from .lab4_common import _attempt, _compare_faults, _decide, _digest, _inputs_changed


# --------------------------------------------------------------------------
# Exercise: the ensemble's average
# --------------------------------------------------------------------------

def reference_ensemble_logits(member_logits, mode="logits", T=1.0):
    """``mean_k z_k`` (``mode="logits"``) or ``T * log(mean_k softmax(z_k / T))``
    (``mode="probs"``), (N, C) from a list of K >= 1 tensors (N, C)."""
    z = torch.stack(list(member_logits))  # (K, N, C)
    if mode == "logits":
        return z.mean(0)
    return T * (torch.logsumexp(F.log_softmax(z / T, dim=-1), dim=0) - math.log(z.shape[0]))


def _ensemble_variant(logits_mode="mean", probs_mode="lse"):
    def ensemble(member_logits, mode="logits", T=1.0):
        z = torch.stack(list(member_logits))
        kind = logits_mode if mode == "logits" else probs_mode
        if kind == "mean":
            return z.mean(0)
        if kind == "sum":
            return z.sum(0)
        if kind == "mean_over_T":
            return z.mean(0) / T
        p = F.softmax(z / T, dim=-1).mean(0)
        if kind == "probs":
            return p
        if kind == "no_T":
            return torch.logsumexp(F.log_softmax(z / T, dim=-1), dim=0) - math.log(z.shape[0])
        if kind == "at_T1":
            return T * F.softmax(z, dim=-1).mean(0).log()
        if kind == "naive_log":
            return T * p.log()
        if kind == "lse":
            return T * (torch.logsumexp(F.log_softmax(z / T, dim=-1), dim=0) - math.log(z.shape[0]))
        raise ValueError(kind)
    return ensemble


ENSEMBLE_VARIANTS = {
    "probs_returned": (_ensemble_variant(probs_mode="probs"),
                       "with mode='probs' this returns the averaged probabilities themselves; the ensemble is used "
                       "as a model, so return logits whose softmax at T is that average: T * log(mean_k softmax(z_k / T))."),
    "no_T_factor": (_ensemble_variant(probs_mode="no_T"),
                    "the log of the averaged probabilities is not multiplied by T: softmax(out / T) then divides by "
                    "T twice. Return T * log(mean_k softmax(z_k / T))."),
    "probs_at_T1": (_ensemble_variant(probs_mode="at_T1"),
                    "the members' probabilities are taken at T = 1: average softmax(z_k / T), the distributions at the "
                    "temperature the ensemble teaches at."),
    "logits_for_probs": (_ensemble_variant(probs_mode="mean"),
                         "mode='probs' averages the logits: that is the geometric mean of the probabilities "
                         "(mode='logits'); average the softmax(z_k / T) themselves."),
    "probs_for_logits": (_ensemble_variant(logits_mode="lse"),
                         "mode='logits' averages probabilities; it is the plain mean of the members' logits, "
                         "torch.stack(member_logits).mean(0)."),
    "sum_logits": (_ensemble_variant(logits_mode="sum"),
                   "the logits are summed, not averaged: K members then act like a temperature K times lower "
                   "(an over-confident ensemble). Divide by K (torch.stack(...).mean(0))."),
    "logits_over_T": (_ensemble_variant(logits_mode="mean_over_T"),
                      "mode='logits' divides the mean by T: the temperature belongs to whoever softens the "
                      "ensemble's logits (Distill does); return the plain mean."),
    "naive_log": (_ensemble_variant(probs_mode="naive_log"),
                  "log(mean(softmax)) is computed directly: for members far apart a probability underflows to 0, "
                  "its log is -inf and the gradient NaN. Average in log space: T * (torch.logsumexp(log_softmax(z / T), "
                  "dim=0) - log K)."),
}


def _ensemble_case(seed: int):
    g = contract.generator(seed)
    k = [1, 2, 3, 4, 2, 3][seed % 6]
    n, c = 2 + draw_int(g, 0, 4), 3 + draw_int(g, 0, 5)
    far = seed % 3 == 2  # members that agree, with the other classes thousands of logits below: exp underflows
    base = torch.randn(n, c, generator=g, dtype=torch.float64) * (3000.0 if far else 0.0)
    scale = 5.0 if far else [2.0, 5.0][seed % 2]
    members = [(base + torch.randn(n, c, generator=g, dtype=torch.float64) * scale).requires_grad_(True)
               for _ in range(k)]
    T = [1.0, 4.0, 2.0, 0.5, 3.0][seed % 5]
    return members, T


def probe_ensemble_logits(fn: Callable, seed: int = 0) -> dict:
    """Both modes on 1-4 seeded members (some classes thousands of logits below the top), several T:
    ``softmax(out / T)`` and its gradient w.r.t. every member, and whether
    the members were changed in place."""
    out = {}
    for mode in ("logits", "probs"):
        members, T = _ensemble_case(seed)
        before = _digest(members)
        got, fault = _attempt(fn, list(members), mode=mode, T=T)
        changed = _inputs_changed([contract.as_tensor(b) for b in before], members)
        if fault:
            return {**fault, "inputs_changed_in_place": changed}
        if not isinstance(got, torch.Tensor) or got.shape != members[0].shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            return {"raised": f"not an (N, C) tensor: {shape}", "inputs_changed_in_place": changed}
        p = F.softmax(got / T, dim=-1)
        out[mode] = {"probs": contract.plain(p), "grad": contract.grad(p, members, seed)}
        out["inputs_changed_in_place"] = out.get("inputs_changed_in_place", False) or changed
    return out


def check_ensemble_logits(fn: Callable) -> bool:
    """``fn(member_logits, mode, T)``: the mean of the members' logits, or logits
    ``T·log(mean_k softmax(z_k / T))`` — compared through softmax(out / T) and its
    gradients, 1 to 4 members, some classes thousands of logits below the top."""
    _decide(contract.exercise(4, "ensemble_logits"), fn, seeds=(0, 1, 2, 5))
    print("✓ ensemble_logits: the mean of the logits, and logits whose softmax at T is the mean of the members' "
          "probabilities — finite gradients even for classes thousands of logits apart (1–4 members)")
    return True


# --------------------------------------------------------------------------
# Exercise: the minimal detectable difference
# --------------------------------------------------------------------------

def _number(got, fault):
    """``(float, None)`` for a number a statistic returned (a Python number, a
    one-element tensor, a NumPy scalar), else ``(None, the fault)``."""
    if fault:
        return None, fault
    if isinstance(got, torch.Tensor) and got.numel() == 1:
        got = float(got)
    if hasattr(got, "item") and type(got).__module__ == "numpy":
        got = float(got.item())
    if type(got) not in (float, int):
        return None, {"raised": f"not a number: {type(got).__name__}"}
    return float(got), None


def reference_mdd(values, t=2.0):
    """``t · s · sqrt(2 / n)``: s the sample standard deviation (n − 1) of the
    ``n`` per-seed values of one method."""
    v = torch.as_tensor([float(x) for x in values], dtype=torch.float64)
    return float(t * v.std(correction=1) * math.sqrt(2.0 / len(v)))


def _mdd_variant(correction=1, factor=lambda n: math.sqrt(2.0 / n), use_t=True, rng=False):
    def mdd(values, t=2.0):
        v = torch.as_tensor([float(x) for x in values], dtype=torch.float64)
        s = float(v.max() - v.min()) if rng else float(v.std(correction=correction))
        return (t if use_t else 1.0) * s * factor(len(v))
    return mdd


MDD_VARIANTS = {
    "population_std": (_mdd_variant(correction=0),
                       "the standard deviation divides by n (np.std's default, ddof=0): over a few seeds that "
                       "underestimates the spread. Use the sample std, divided by n - 1 (np.std(values, ddof=1), "
                       "statistics.stdev)."),
    "one_mean": (_mdd_variant(factor=lambda n: 1 / math.sqrt(n)),
                 "t · s / sqrt(n) is the noise of ONE mean; a difference of two means, each over n seeds, has "
                 "sqrt(2) times that: t · s · sqrt(2 / n)."),
    "no_sqrt_n": (_mdd_variant(factor=lambda n: math.sqrt(2.0)),
                  "the number of seeds is missing: the noise of a mean shrinks as 1 / sqrt(n), so "
                  "MDD = t · s · sqrt(2 / n)."),
    "no_t": (_mdd_variant(use_t=False), "the threshold t is missing: MDD = t · s · sqrt(2 / n)."),
    "range": (_mdd_variant(rng=True), "the range (max - min) is not a standard deviation: use the sample std of the values."),
    "two_over_n": (_mdd_variant(factor=lambda n: 2.0 / n),
                   "the square root is missing: MDD = t · s · sqrt(2 / n), not t · s · 2 / n."),
}


def probe_mdd(fn: Callable, seed: int = 0) -> dict:
    """Five seeded lists of per-seed accuracies (2 to 8 seeds, as a list or a
    tuple of floats), each at a seeded t: the number returned."""
    g = contract.generator(seed)
    out = []
    for i in range(5):
        n = 2 + draw_int(g, 0, 7)
        values = (0.7 + 0.03 * torch.randn(n, generator=g, dtype=torch.float64)).tolist()
        t = [2.0, 2.776, 1.0, 4.303, 3.0][(seed + i) % 5]
        given = [list, tuple][(seed + i) % 2](values)
        got, fault = _number(*_attempt(fn, given, t=t))
        if fault:
            return fault
        out.append(got)
    return {"mdd": out}


def check_mdd(fn: Callable) -> bool:
    """``fn(values, t=2.0)``: t · s · sqrt(2 / n), s the sample std of the n values."""
    _decide(contract.exercise(4, "mdd"), fn, seeds=(0, 1, 2))
    print("✓ mdd: t · s · sqrt(2/n) with the sample standard deviation, on 15 seeded sets of 2–8 per-seed accuracies")
    return True


# --------------------------------------------------------------------------
# Exercise: the paired t over seeds
# --------------------------------------------------------------------------

def reference_paired_t(a, b):
    """mean(d) / (sd(d) / sqrt(n)) of the per-seed differences d = a - b (sample sd);
    ±inf when every difference is the same non-zero number, 0.0 when all are 0."""
    d = torch.as_tensor([float(x) - float(y) for x, y in zip(a, b)], dtype=torch.float64)
    mean, sd = float(d.mean()), float(d.std(correction=1))
    if sd == 0:
        return math.copysign(math.inf, mean) if mean else 0.0
    return mean / (sd / math.sqrt(len(d)))


def _paired_variant(kind: str):
    def paired_t(a, b):
        x = torch.as_tensor([float(v) for v in a], dtype=torch.float64)
        y = torch.as_tensor([float(v) for v in b], dtype=torch.float64)
        if kind == "welch":
            return float((x.mean() - y.mean()) / (x.var() / len(x) + y.var() / len(y)).sqrt())
        d = y - x if kind == "reversed" else x - y
        sd = float(d.std(correction=0 if kind == "population" else 1))
        if sd == 0:
            return math.copysign(math.inf, float(d.mean())) if float(d.mean()) else 0.0
        return float(d.mean()) / (sd if kind == "no_sqrt_n" else sd / math.sqrt(len(d)))
    return paired_t


PAIRED_VARIANTS = {
    "welch": (_paired_variant("welch"),
              "this is Welch's unpaired t: it ignores that seed k of both methods shares its initial weights and "
              "batches. Pair them: t = mean(d) / (sd(d) / sqrt(n)) with d = a - b seed by seed."),
    "reversed": (_paired_variant("reversed"), "the sign is reversed: d = a - b (a above b gives t > 0)."),
    "population": (_paired_variant("population"),
                   "the standard deviation of the differences divides by n: use the sample std (n - 1)."),
    "no_sqrt_n": (_paired_variant("no_sqrt_n"),
                  "mean(d) / sd(d) is missing the sqrt(n): the noise of a mean of n differences is sd(d) / sqrt(n)."),
}


def probe_paired_t(fn: Callable, seed: int = 0) -> dict:
    """Five seeded pairs of per-seed accuracies (2 to 8 seeds; one pair with
    equal differences, one with none): the number returned for each."""
    g = contract.generator(seed)
    out = []
    for i in range(5):
        n = 2 + draw_int(g, 0, 7)
        a = 0.7 + 0.03 * torch.randn(n, generator=g, dtype=torch.float64)
        b = a - 0.01 * (1 + torch.randn(n, generator=g, dtype=torch.float64))
        if i == 3:
            b = a - [0.015625, -0.03125][seed % 2]  # the same difference on every seed (exact in binary)
        if i == 4 and seed % 3 == 0:
            b = a.clone()
        got, fault = _number(*_attempt(fn, a.tolist(), b.tolist()))
        if fault:
            return fault
        out.append(got)
    return {"t": out}


def check_paired_t(fn: Callable) -> bool:
    """``fn(a, b)``: the paired t of two methods' per-seed values."""
    _decide(contract.exercise(4, "paired_t"), fn, seeds=(0, 1, 2))
    print("✓ paired_t: mean(d) / (sd(d) / sqrt(n)) of the seed-by-seed differences, a zero spread included, on 15 "
          "seeded pairs of 2–8 seeds")
    return True


EXERCISES = [
    contract.Exercise(name="mdd", points=1.0, check=check_mdd, probe=probe_mdd, reference=reference_mdd,
                      variants=MDD_VARIANTS, hidden_seeds=(0, 1, 2, 3), rtol=1e-6, atol=1e-12,
                      compare=_compare_faults(("raised",))),
    contract.Exercise(name="paired_t", points=1.0, check=check_paired_t, probe=probe_paired_t,
                      reference=reference_paired_t, variants=PAIRED_VARIANTS, hidden_seeds=(0, 1, 2, 3), rtol=1e-9,
                      atol=1e-12, compare=_compare_faults(("raised",))),
    contract.Exercise(name="ensemble_logits", points=1.0, check=check_ensemble_logits, probe=probe_ensemble_logits,
                      reference=reference_ensemble_logits, variants=ENSEMBLE_VARIANTS, hidden_seeds=tuple(range(6)),
                      compare=_compare_faults(("inputs_changed_in_place", "raised"))),
]

__all__ = ["CheckFailed", "ENSEMBLE_VARIANTS", "EXERCISES", "MDD_VARIANTS", "PAIRED_VARIANTS", "check_ensemble_logits",
           "check_mdd", "check_paired_t", "probe_ensemble_logits", "probe_mdd", "probe_paired_t",
           "reference_ensemble_logits", "reference_mdd", "reference_paired_t"]

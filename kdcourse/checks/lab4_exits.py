"""Lab 4 checks on the exercise contract: the deep-supervision loss over a
network's exits, and born-again training with a temperature per generation
chosen on validation. Each visible check runs the grader's probe and
decides as the grader does (:mod:`kdcourse.checks.lab4_common`)."""
from __future__ import annotations

import random
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..train import Distill, Objective
from . import contract
from .lab4_common import _attempt, _decide, _digest, _inputs_changed, _kl

# --------------------------------------------------------------------------
# Exercise: the deep-supervision loss over the exits
# --------------------------------------------------------------------------

def _ds_case(seed: int):
    g = contract.generator(seed)
    n_exits = [1, 2, 3, 2][seed % 4]
    n, c = [6, 4, 8, 5][seed % 4], [5, 10, 3, 7][seed % 4]
    names = [f"layer{i + 1}" for i in range(n_exits)]
    if seed % 2:  # "final" need not be last in the dict
        order = names[:1] + ["final"] + names[1:]
    else:
        order = names + ["final"]
    logits = {k: (torch.randn(n, c, generator=g, dtype=torch.float64) * (1.5 + i)).requires_grad_(True)
              for i, k in enumerate(order)}
    labels = torch.randint(0, c, (n,), generator=g)
    T, alpha = [3.0, 1.0, 4.0, 2.0][seed % 4], [0.5, 0.3, 0.9, 0.0][seed % 4]
    return logits, labels, T, alpha


def probe_deep_supervision_loss(fn: Callable, seed: int = 0) -> dict:
    """The loss on seeded exits (1 to 3 exits, ``"final"`` anywhere in the
    dict, several T and alpha) and its gradient on every exit's logits."""
    logits, labels, T, alpha = _ds_case(seed)
    before = _digest(list(logits.values()) + [labels])
    given = dict(logits)
    out, fault = _attempt(fn, given, labels, T=T, alpha=alpha)
    changed = _inputs_changed([contract.as_tensor(b) for b in before], list(logits.values()) + [labels]) or \
        list(given) != list(logits)
    if fault:
        return {**fault, "inputs_changed_in_place": changed}
    if not isinstance(out, torch.Tensor) or out.ndim != 0:
        return {"raised": "not a scalar tensor", "inputs_changed_in_place": changed}
    names = list(logits)
    grads = contract.grad(out, [logits[k] for k in names], seed)
    return {"inputs_changed_in_place": changed, "loss": contract.plain(out),
            "grad": dict(zip(names, grads)) if isinstance(grads, list) else grads}


def _ds_variant(final_ce=True, detach="final", t2=True, reverse=False, swap=False, average=False, self_kd=False,
                ce_at_T=False, reduction="batchmean"):
    def loss(exit_logits, labels, T=3.0, alpha=0.5):
        final = exit_logits["final"]
        total = F.cross_entropy(final, labels) if final_ce else 0.0
        terms = []
        for name, z in exit_logits.items():
            if name == "final" and not self_kd:
                continue
            teacher = final.detach() if detach == "final" else final
            student = z.detach() if detach == "exit" else z
            if reverse:
                kl = _kl(student, teacher, T, reduction)
            else:
                kl = _kl(teacher, student, T, reduction)
            ce = F.cross_entropy(z / T if ce_at_T else z, labels)
            kd = (T * T if t2 else 1.0) * kl
            terms.append(alpha * ce + (1 - alpha) * kd if swap else (1 - alpha) * ce + alpha * kd)
        return total + (sum(terms) / len(terms) if average else sum(terms))
    return loss


DS_LOSS_VARIANTS = {
    "final_not_detached": (_ds_variant(detach=None),
                           "the deepest head's prediction is a *target*: detach it (exit_logits['final'].detach()) "
                           "inside the KL, or the exits' losses also pull the final head towards the shallow exits "
                           "(the value is the same, the gradient on 'final' is not)."),
    "exit_detached": (_ds_variant(detach="exit"),
                      "the exit's own logits are detached inside the KL, so the distillation term trains nothing; "
                      "detach the final head's prediction (the teacher) instead."),
    "reversed": (_ds_variant(reverse=True),
                 "the KL runs the wrong way: the exit is the student, so compute KL(p_final ‖ p_exit) = "
                 "F.kl_div(log_softmax(z_exit / T), softmax(z_final.detach() / T), reduction='batchmean')."),
    "no_T2": (_ds_variant(t2=False), "off by a factor T² on the distillation term — multiply the KL by T**2."),
    "alpha_swapped": (_ds_variant(swap=True),
                      "alpha weights the wrong term: alpha multiplies the KL, (1 - alpha) the exit's cross-entropy."),
    "averaged_exits": (_ds_variant(average=True),
                       "the exits' terms are averaged; BYOT sums one term per exit (each exit gets its full loss)."),
    "no_final_ce": (_ds_variant(final_ce=False),
                    "the final head's own cross-entropy with the labels is missing: the loss starts with "
                    "CE(z_final, labels)."),
    "final_as_exit": (_ds_variant(self_kd=True),
                      "the final head is treated as one more exit (a KL of the final head to itself, and its "
                      "cross-entropy weighted by 1 - alpha): loop over the exits other than 'final'."),
    "ce_at_T": (_ds_variant(ce_at_T=True), "the cross-entropy with the labels uses the raw logits (T = 1), not logits / T."),
    "kl_mean": (_ds_variant(reduction="mean"),
                "F.kl_div with reduction='mean' also divides by the number of classes; use reduction='batchmean'."),
}


def check_deep_supervision_loss(fn: Callable) -> bool:
    """``fn(exit_logits, labels, T=, alpha=)``: CE(z_final, y) + Σ_exits
    [(1 − α)·CE(z_e, y) + α·T²·KL(p_final ‖ p_e)], the final head detached —
    values and gradients on every exit, 1 to 3 exits, ``"final"`` anywhere."""
    _decide(contract.exercise(4, "deep_supervision_loss"), fn, seeds=(0, 1, 2))
    print("✓ deep_supervision_loss matches the reference on 3 seeded cases (1–3 exits): values and the gradient "
          "on every exit's logits — the final head teaches, it is not taught")
    return True


# --------------------------------------------------------------------------
# Exercise: born-again, a temperature per generation chosen on validation
# --------------------------------------------------------------------------

class _TunedRecorder:
    """``new_model``, ``train`` and ``val_acc`` for the probe: nothing trains,
    every call is recorded, and a network's validation score is a seeded
    number that depends only on how it was trained (its generation and T),
    so the right choice is known whatever order the networks are made in."""

    def __init__(self, seed: int):
        self.seed = seed
        self.info: dict = {}  # id(model) -> how it was last trained
        self.models: dict = {}
        self.trained: list = []
        self.retrained = False

    def new_model(self):
        torch.manual_seed(500 + len(self.models))
        m = nn.Linear(2, 2)
        self.models[id(m)] = m
        return m

    def train(self, model, objective):
        if id(model) in self.info:
            self.retrained = True
        if isinstance(objective, Distill):
            teacher = objective.teacher
            t_info = self.info.get(id(teacher))
            gen = t_info["gen"] + 1 if t_info else 0
            info = {"kind": "distill", "gen": gen, "T": None if callable(objective.T) else float(objective.T),
                    "alpha": None if callable(objective.alpha) else float(objective.alpha),
                    "frozen": bool(objective.frozen), "teacher": id(teacher)}
        else:
            info = {"kind": "labels" if type(objective).__name__ in ("Objective", "CrossEntropy")
                    else type(objective).__name__, "gen": 1}
        self.info[id(model)] = info
        self.trained.append([info["gen"], info.get("T")])

    def val_acc(self, model) -> float:
        info = self.info.get(id(model))
        if info is None:
            return -1.0
        return random.Random(f"{self.seed}/{info['gen']}/{info.get('T')}").random()

    def describe(self, gens) -> list:
        out = []
        for i, m in enumerate(gens):
            info = dict(self.info.get(id(m), {"kind": "never trained"}))
            if "teacher" in info:
                teacher = info.pop("teacher")
                info["teacher_is_previous"] = i > 0 and teacher == id(gens[i - 1])
            out.append(info)
        return out


def probe_born_again_tuned(fn: Callable, seed: int = 0) -> dict:
    """Run the loop against recording ``new_model``/``train``/``val_acc``:
    what each returned network was trained with (generation, T, alpha,
    frozen teacher, teacher = the previous returned network), every
    (generation, T) trained, whether a network was trained twice, and the
    chosen temperatures."""
    rec = _TunedRecorder(seed)
    candidates = [(1.0, 4.0), (2.0, 1.0, 8.0), (4.0, 2.0, 1.0), (3.0, 6.0)][seed % 4]
    generations = [3, 2, 4, 3][seed % 4]
    alpha = [0.5, 0.3, 0.7, 0.9][seed % 4]
    out, fault = _attempt(fn, rec.new_model, rec.train, rec.val_acc, candidates, generations=generations, alpha=alpha)
    data = {"trained": sorted(rec.trained, key=lambda t: (t[0], -1.0 if t[1] is None else t[1])),
            "retrained": rec.retrained}
    if fault:
        return {**data, **fault}
    if not (isinstance(out, (list, tuple)) and len(out) == 2 and isinstance(out[0], (list, tuple))):
        return {**data, "raised": "not a pair (list of generations, temperatures)"}
    gens, temps = out
    data["returned"] = rec.describe(gens)
    try:
        data["chosen_T"] = [float(T) for T in temps]
    except (TypeError, ValueError):
        data["chosen_T"] = "not a list of numbers"
    return data


def _tuned_variant(teacher="best", pick=max, per_generation=True, fresh=True, first_gen=True, freeze=True,
                   score_teacher=False):
    def loop(new_model, train, val_acc, candidates, generations=3, alpha=0.5):
        gens = [new_model()]
        train(gens[0], Objective())
        chosen, fixed = [], None
        for g in range(generations - 1):
            tried = {}
            temps = candidates if (per_generation or fixed is None) else [fixed]
            reuse = None
            for T in temps:
                student = new_model() if (fresh or reuse is None) else reuse
                reuse = student
                t = gens[-1] if teacher in ("best", "last") else gens[0]
                train(student, Distill(t, T=T, alpha=alpha, frozen=freeze))
                tried[T] = student
            best = pick(tried, key=lambda T: val_acc(gens[-1] if score_teacher else tried[T]))
            fixed = best
            if teacher == "last":
                gens.append(tried[temps[-1]])
            else:
                gens.append(tried[best])
            chosen.append(best)
        return (gens if first_gen else gens[1:]), chosen
    return loop


TUNED_VARIANTS = {
    "last_tried": (_tuned_variant(teacher="last"),
                   "the next generation keeps the *last* network tried, not the one with the best validation "
                   "accuracy: keep the winner of each generation's search as the teacher of the next."),
    "min": (_tuned_variant(pick=min), "the temperature with the *lowest* validation accuracy is kept: use max."),
    "one_search": (_tuned_variant(per_generation=False),
                   "the temperature is searched only for generation 2 and reused after; search again for every "
                   "generation (its teacher is a different network)."),
    "from_first": (_tuned_variant(teacher="first"),
                   "every generation learns from generation 1; each generation's teacher is the previous "
                   "generation (the winner of its search)."),
    "not_fresh": (_tuned_variant(fresh=False),
                  "the same network is trained further for every candidate temperature; each candidate needs a "
                  "fresh network from new_model()."),
    "no_first": (_tuned_variant(first_gen=False), "return every generation, generation 1 (trained on the labels) first."),
    "not_frozen": (_tuned_variant(freeze=False), "the teacher is not frozen: do not pass frozen=False to Distill."),
    "scores_teacher": (_tuned_variant(score_teacher=True),
                       "the validation score is taken on the teacher, the same for every candidate; score each "
                       "candidate student with val_acc(student)."),
}


def check_born_again_tuned(fn: Callable) -> bool:
    """``fn(new_model, train, val_acc, candidates, generations=, alpha=) ->
    (generations, temperatures)``: every distilled generation searches the
    candidate temperatures, each with a fresh network taught by the previous
    generation's winner, and keeps the best on validation."""
    _decide(contract.exercise(4, "born_again_tuned"), fn, seeds=(0, 1, 2))
    print("✓ born_again_tuned: a fresh network per candidate T, taught by the previous generation's winner, "
          "the winner chosen on validation — for every generation")
    return True



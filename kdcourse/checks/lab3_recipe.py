"""Lab 3 checks, second part: DistilBERT's triple loss and the two-stage
recipe the student assembles.

As in :mod:`kdcourse.checks.lab1_training`, every check here runs the
exercise's *probe* (the same function the grader runs, see
:mod:`kdcourse.checks.contract`) on a few seeds for the student's function,
the reference and each known-wrong variant, and decides from that plain
data, so the visible check and the grader cannot disagree. The probes record
gradients (not only values) and whether an input tensor was changed in
place (named before anything else). :mod:`kdcourse.checks.lab3` declares the
exercises in its ``EXERCISES``.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .contract import draw_int
from ..losses import transformer as tl
from . import CheckFailed, contract, probing
from .probing import INPLACE
VISIBLE_SEEDS = (0, 1, 2, 3)


def visible_check(ex: contract.Exercise, fn: Callable, seeds=VISIBLE_SEEDS, what: str = "values and gradients") -> bool:
    """Probe ``fn`` on ``seeds`` and decide like the grader: raise
    :class:`CheckFailed` naming the mistake, or print one ✓ line."""
    return probing.probe_check(ex, fn, seeds, what=what, raised_first=True)


def _fault(exc: Exception) -> dict:
    text = str(exc)
    if isinstance(exc, RuntimeError) and ("in-place" in text or "inplace" in text):
        return {INPLACE: ["an input that requires grad"]}
    return {"raised": type(exc).__name__}


def attempt(fn: Callable, *args, **kwargs):
    """:func:`contract.attempt`, but an autograd error about an in-place
    change of an input is recorded as such."""
    return contract.attempt_as(_fault, fn, *args, **kwargs)


def _changed(names, args, before) -> list:
    return [n for n, a, b in zip(names, args, before) if not torch.equal(a.detach(), b)]


# --------------------------------------------------------------------------
# DistilBERT's triple loss
# --------------------------------------------------------------------------

def probe_distilbert_loss(fn: Callable, seed: int) -> dict:
    """1-3 sequences with padding, 3-7 positions, a 6-12 id vocabulary,
    hidden width 3-6; masked positions only among real tokens (one sequence
    with none on some seeds); T and the three weights drawn per seed. Records
    the loss and its gradients w.r.t. the student's MLM logits and hidden
    states, and any input changed in place."""
    g = contract.generator(seed)
    r = lambda lo, hi: lo + draw_int(g, 0, hi - lo + 1)  # noqa: E731
    b, s, v, d = r(1, 3), r(3, 7), max(r(5, 12), 6), r(3, 6)  # v > 5: at least one word id after the 5 specials
    mask = torch.zeros(b, s, dtype=torch.int64)
    for i in range(b):
        mask[i, : r(2, s)] = 1
    pick = (torch.rand(b, s, generator=g) < 0.4) & mask.bool()
    pick[0, 0] = True
    if b > 1 and seed % 2:
        pick[-1] = False  # a sequence where nothing is masked
    words = torch.randint(5, v, (b, s), generator=g)
    labels = torch.where(pick, words, torch.full_like(words, -100))
    s_logits = (torch.randn(b, s, v, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    t_logits = torch.randn(b, s, v, generator=g, dtype=torch.float64) * 3
    s_hidden = torch.randn(b, s, d, generator=g, dtype=torch.float64).requires_grad_(True)
    t_hidden = torch.randn(b, s, d, generator=g, dtype=torch.float64)
    pad = ~mask.bool()
    with torch.no_grad():  # padded positions hold whatever the model computes there
        s_hidden[pad] = 3 * torch.randn(int(pad.sum()), d, generator=g, dtype=torch.float64)
        s_logits[pad] = 5 * torch.randn(int(pad.sum()), v, generator=g, dtype=torch.float64)
    T = [1.0, 2.0, 4.0, 0.5][seed % 4]
    weights = [(5.0, 2.0, 1.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (2.0, 1.0, 3.0)][seed % 5]
    names = ["student_mlm_logits", "teacher_mlm_logits", "mlm_labels", "student_hidden", "teacher_hidden",
             "attention_mask"]
    args = [s_logits, t_logits, labels, s_hidden, t_hidden, mask]
    before = [a.detach().clone() for a in args]
    case = f"(B, S, V, D) = ({b}, {s}, {v}, {d}), T = {T:g}, alpha_ce/mlm/cos = {weights}"
    out, raised = attempt(fn, *args, T=T, alpha_ce=weights[0], alpha_mlm=weights[1], alpha_cos=weights[2])
    changed = _changed(names, args, before)
    if changed:
        return {INPLACE: changed, "case": case}
    if raised:
        return {**raised, "case": case}
    return {"case": case, "loss": contract.scalar(out, "distilbert_loss"),
            "grads": contract.grad(out, [s_logits, s_hidden], seed)}


def _triple(ce="tokens", cos="masked", t2=True, reverse=False, detach_hidden=False):
    """A triple loss with one piece done a known-wrong way."""

    def loss(s_logits, t_logits, labels, s_hidden, t_hidden, mask, T=2.0, alpha_ce=5.0, alpha_mlm=2.0,
             alpha_cos=1.0):
        sel = labels != -100
        if ce == "batchmean":
            kl = F.kl_div(F.log_softmax(s_logits / T, -1), F.softmax(t_logits / T, -1), reduction="batchmean")
        else:
            rows = sel if ce == "tokens" else mask.bool()
            if int(rows.sum()) == 0:
                kl = s_logits.sum() * 0.0
            else:
                ls, lt = F.log_softmax(s_logits[rows] / T, -1), F.log_softmax(t_logits.detach()[rows] / T, -1)
                a, b_ = (lt, ls) if reverse else (ls, lt)
                kl = F.kl_div(a, b_, reduction="sum", log_target=True) / int(rows.sum())
        kl = kl * (T * T if t2 else 1.0)
        mlm = tl.masked_lm_loss(s_logits, labels)
        h = s_hidden.detach() if detach_hidden else s_hidden
        c = 1 - F.cosine_similarity(h, t_hidden, dim=-1, eps=1e-8)
        m = mask.to(c.dtype) if cos == "masked" else torch.ones_like(c)
        cos_term = (c * m).sum() / m.sum()
        return alpha_ce * kl + alpha_mlm * mlm + alpha_cos * cos_term

    return loss


DISTILBERT_VARIANTS = {
    "batchmean": (_triple(ce="batchmean"),
                  "this is the handout's F.kl_div(..., reduction='batchmean') on the (B, S, V) tensor: it divides by "
                  "B, not by the number of masked tokens, and counts every position, padding included. Select the "
                  "masked positions (mlm_labels != -100), sum the KL over them and divide by their number."),
    "all_real_tokens": (_triple(ce="real"),
                        "the soft cross-entropy is averaged over every real token; DistilBERT distils the "
                        "masked-LM distributions at the masked positions only (mlm_labels != -100)."),
    "no_T2": (_triple(t2=False),
              "the distillation term is off by a factor T²: multiply the KL at temperature T by T * T (Lab 1)."),
    "reversed": (_triple(reverse=True),
                 "the KL runs the wrong way: the teacher's distribution is the target, KL(teacher || student)."),
    "cos_unmasked": (_triple(cos="all"),
                     "the cosine term counts padded positions: average 1 - cos(h_S, h_T) over the real tokens only "
                     "(attention_mask == 1) — the seed's version ignores the mask."),
    "cos_detached": (_triple(detach_hidden=True),
                     "the value is right but no gradient reaches the student's hidden states: the cosine term must "
                     "not detach student_hidden (only the teacher's side is a fixed target)."),
}


def check_distilbert_loss(fn: Callable) -> bool:
    """``fn(student_mlm_logits, teacher_mlm_logits, mlm_labels, student_hidden,
    teacher_hidden, attention_mask, T=, alpha_ce=, alpha_mlm=, alpha_cos=)``
    must equal :func:`kdcourse.losses.transformer.distilbert_loss` in value
    and in its gradients."""
    from . import lab3

    return visible_check(_declared(lab3, "distilbert_loss"), fn, seeds=(0, 1, 2, 3, 4))


def _declared(module, name: str) -> contract.Exercise:
    for ex in module.EXERCISES:
        if ex.name == name:
            return ex
    raise KeyError(name)  # pragma: no cover - every check here is declared


# --------------------------------------------------------------------------
# The two-stage recipe
# --------------------------------------------------------------------------

class _Recorder:
    """Tiny teacher and student, sentinel teacher targets, and a ``train``
    that records what each call was given (it does not train)."""

    def __init__(self, seed: int):
        from ..distill.transformer import TeacherTargets
        from ..models.bert import TextTransformer, bert_config
        from ..profiles import BertSpec

        g = contract.generator(seed)
        n_s = 1 + draw_int(g, 0, 3)
        n_t = n_s + draw_int(g, 0, 4)
        torch.manual_seed(seed)
        self.teacher = TextTransformer(bert_config(BertSpec(n_t, 8, 2, 16), 20, 4, 12))
        self.student = TextTransformer(bert_config(BertSpec(n_s, 4 + 4 * (seed % 2), 2, 8), 20, 4, 12))
        self.layer_map = sorted(torch.randperm(n_t, generator=g)[:n_s].add(1).tolist())
        empty = torch.zeros(0)
        self.targets = {k: TeacherTargets(empty, {}, {}, n_t) for k in ("train", "general")}
        self.T = [1.0, 2.0, 3.0, 4.0][seed % 4]
        self.alpha = [0.9, 0.5, 0.7, 1.0][seed % 4]
        self.calls, self._projections = [], []

    def _which(self, obj, pool: dict) -> str:
        for k, v in pool.items():
            if obj is v:
                return k
        return "something else" if obj is not None else "none"

    def _projection_id(self, p):
        for i, q in enumerate(self._projections):
            if p is q:
                return i
        self._projections.append(p)
        return len(self._projections) - 1

    def train(self, model, split, objective):
        from ..distill.transformer import LayerDistill
        from ..train import Distill

        rec = {"model": self._which(model, {"student": self.student, "teacher": self.teacher}),
               "split": split if isinstance(split, str) else f"not a split name: {type(split).__name__}",
               "objective": type(objective).__name__}
        if isinstance(objective, LayerDistill):
            rec.update(teacher=self._which(objective.teacher, {"teacher": self.teacher, "student": self.student}),
                       layer_map=list(objective.layer_map), weights=dict(objective.w),
                       targets=self._which(objective.targets, self.targets),
                       projections=self._projection_id(objective.projections),
                       student_layers=list(objective.student_layers))
            if objective.w["prediction"]:
                rec.update(T=float(objective.T), alpha=float(objective.alpha))
        elif isinstance(objective, Distill):
            rec.update(teacher=self._which(objective.teacher, {"teacher": self.teacher, "student": self.student}),
                       T=float(objective.T) if not callable(objective.T) else "a schedule",
                       alpha=float(objective.alpha) if not callable(objective.alpha) else "a schedule")
        self.calls.append(rec)


def probe_two_stage(fn: Callable, seed: int) -> dict:
    """Call the recipe on a tiny teacher/student pair with an arbitrary
    layer map, T and alpha drawn per seed; record every ``train`` call (the
    model, the split, the objective's kind, weights, layer map, teacher
    targets, T, alpha, which projections) and what came back."""
    rec = _Recorder(seed)
    out, raised = contract.attempt(fn, rec.teacher, rec.student, rec.train, rec.targets, list(rec.layer_map),
                                   rec.T, rec.alpha)
    data = {"calls": rec.calls, "case": f"layer_map={rec.layer_map}, T={rec.T:g}, alpha={rec.alpha:g}"}
    if raised:
        return {**data, **raised}
    data["returned"] = rec._which(out, {"student": rec.student, "teacher": rec.teacher})
    return data


def _two_stage_with(stage1_prediction=False, swap_targets=False, share_projections=True, order=("general", "train"),
                    stage2="layers", pass_T=True):
    def recipe(teacher, student, train, targets, layer_map, T, alpha):
        from ..distill.transformer import LayerDistill
        from ..train import Distill

        first, second = ("train", "general") if swap_targets else ("general", "train")
        s1 = LayerDistill(teacher, student, layer_map=layer_map, targets=targets[first],
                             **({} if stage1_prediction else {"w_prediction": 0.0}))
        kw = dict(T=T, alpha=alpha) if pass_T else {}
        if stage2 == "distill":
            s2 = Distill(teacher, **kw)
        else:
            s2 = LayerDistill(teacher, student, layer_map=layer_map, targets=targets[second],
                                 projections=s1.projections if share_projections else None, **kw)
        stages = {"general": s1, "train": s2}
        for split in order:
            train(student, split, stages[split])
        return student
    return recipe


TWO_STAGE_VARIANTS = {
    "prediction_in_stage1": (_two_stage_with(stage1_prediction=True),
                             "stage 1 includes the prediction layer (LayerDistill's default w_prediction=1): the "
                             "unlabelled reviews have no labels and general distillation matches the layers only — "
                             "pass w_prediction=0.0."),
    "targets_swapped": (_two_stage_with(swap_targets=True),
                        "each stage looks up the other split's teacher outputs: stage 1 trains on 'general' and "
                        "needs targets['general'], stage 2 on 'train' needs targets['train']."),
    "fresh_projections": (_two_stage_with(share_projections=False),
                          "stage 2 starts new projections W_e, W_h: what stage 1 learned about mapping the student's "
                          "width onto the teacher's is thrown away. Pass projections=<stage 1>.projections."),
    "task_first": (_two_stage_with(order=("train", "general")),
                   "the stages run in the wrong order: general distillation on the unlabelled text comes first, the "
                   "task stage (with the labels and the prediction layer) last."),
    "no_T_alpha": (_two_stage_with(pass_T=False),
                   "stage 2 ignores T and alpha (LayerDistill's defaults are T=1, alpha=1): pass T=T, alpha=alpha "
                   "to the task stage."),
    "distill_stage2": (_two_stage_with(stage2="distill"),
                       "stage 2 here is prediction-layer KD only (Distill); the lab's task stage is TinyBERT's: the "
                       "layer losses again plus the prediction layer, LayerDistill(..., T=T, alpha=alpha)."),
}


def check_two_stage(fn: Callable) -> bool:
    """``fn(teacher, student, train, targets, layer_map, T, alpha)`` must
    make the same ``train`` calls as
    :func:`kdcourse.recipes.lab3_controls.two_stage_kd` and return the student."""
    from . import lab3

    return visible_check(_declared(lab3, "two_stage_kd"), fn, what="every train call and what it was given")

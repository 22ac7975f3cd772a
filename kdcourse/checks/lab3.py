"""Lab 3 checks: the layer map, the projected hidden-state loss and the
attention loss of transformer distillation.

Each check compares the student's function with the reference in
:mod:`kdcourse.losses.transformer` on seeded inputs shaped like Hugging Face
outputs (``hidden_states`` with the embedding output first, attention
probabilities with exact zeros at padded keys) and names the usual mistakes.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .contract import draw_int
from ..losses import transformer as tl
from . import Case, CheckFailed, contract, diagnose


# --------------------------------------------------------------------------
# Exercise 1: the layer map
# --------------------------------------------------------------------------

LAYER_PAIRS = ((4, 12), (2, 6), (3, 8), (6, 12), (4, 6), (1, 5), (4, 4), (5, 7))

LAYER_MAP_VARIANTS = {
    "zip": (lambda s, t: list(range(1, s + 1)),
            "this pairs student layer i with teacher layer i, like zip(): only the first L_S teacher layers are "
            "used (4 -> 12 gives 1, 2, 3, 4). Spread them: student layer i <- teacher layer i * L_T / L_S."),
    "zero_based": (lambda s, t: [(i * t) // s for i in range(s)],
                   "the map starts at 0 and stops short of the top: number the student layers 1..L_S "
                   "(layer 0 would be the embeddings — HF hidden_states[0]) so the last student layer maps to "
                   "the last teacher layer (4 -> 12: 3, 6, 9, 12)."),
    "seed": (lambda s, t: [i * (t // s) for i in range(s)],
             "this is the seed's i * (L_T // L_S) with i from 0: 4 student layers go to teacher 0, 3, 6, 9 — "
             "index 0 is the embedding output and layer 12 is never used. TinyBERT maps 4 -> 12 to 3, 6, 9, 12."),
    "ratio_first": (lambda s, t: [i * (t // s) for i in range(1, s + 1)],
                    "L_T // L_S is rounded down before multiplying: for 3 -> 8 layers that gives 2, 4, 6 and the "
                    "top teacher layer is never used. Multiply first: (i * n_teacher) // n_student."),
    "rounded": (lambda s, t: [int(i * t / s + 0.5) for i in range(1, s + 1)],
                "almost: you round i * L_T / L_S to the nearest layer; the course uses the floor, "
                "(i * n_teacher) // n_student (3 -> 8 gives 2, 5, 8), so every map in the lab is the same."),
    "top_layers": (lambda s, t: list(range(t - s + 1, t + 1)),
                   "only the top L_S teacher layers are used; spread the student layers over the whole teacher "
                   "(student layer i <- teacher layer i * L_T / L_S)."),
}


def check_layer_map(fn: Callable) -> bool:
    """``fn(n_student, n_teacher)`` must return the 1-based teacher layer for
    each student layer: ``[(i * n_teacher) // n_student for i in 1..n_student]``."""

    def as_tensor(f):
        def run(s, t):
            out = f(s, t)
            if isinstance(out, torch.Tensor):
                out = out.tolist()
            if not isinstance(out, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                             for v in out):
                raise CheckFailed(f"layer_map must return a list of ints, got {out!r} for ({s}, {t})")
            return torch.tensor(out, dtype=torch.float64)
        return run

    cases = [Case((s, t), {}, f"{s} student layers, {t} teacher layers") for s, t in LAYER_PAIRS]
    variants = {k: (as_tensor(f), hint) for k, (f, hint) in LAYER_MAP_VARIANTS.items()}
    return diagnose("layer_map", as_tensor(fn), as_tensor(tl.uniform_layer_map), cases, variants, rtol=0, atol=0)


# --------------------------------------------------------------------------
# Exercise 2: hidden-state loss with a projection
# --------------------------------------------------------------------------

def _states(n, b, s, d, seed):
    g = contract.generator(seed)
    return tuple(torch.randn(b, s, d, generator=g, dtype=torch.float64) for _ in range(n))


def _proj(d_in, d_out, seed):
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out).double()


def _mmse(a, b, m):
    m = m.to(a.dtype)
    return (((a - b) ** 2).sum(-1) * m).sum() / (m.sum() * a.shape[-1])


def _hidden_variant(pairs, reduce="mean", mse=_mmse, proj_when="always"):
    """A wrong version parameterised by which (student, teacher) indices it
    pairs and how it reduces."""

    def loss(s_hs, t_hs, layer_map, projection, mask):
        terms = []
        for i, j in pairs(s_hs, t_hs, layer_map):
            h = s_hs[i]
            if proj_when == "always" or (proj_when == "if_widths_differ" and h.shape[-1] != t_hs[j].shape[-1]):
                h = projection(h)
            terms.append(mse(h, t_hs[j], mask))
        total = sum(terms)
        return total / len(terms) if reduce == "mean" else total

    return loss


_mapped = lambda s, t, m: [(i, j) for i, j in enumerate(m, start=1)]  # noqa: E731


def _seq_mean_mse(a, b, m):
    m = m.to(a.dtype)
    per_seq = (((a - b) ** 2).mean(-1) * m).sum(1) / m.sum(1)
    return per_seq.mean()


HIDDEN_LOSS_VARIANTS = {
    "zip": (_hidden_variant(lambda s, t, m: [(i, i) for i in range(1, len(s))]),
            "student layer i is compared with teacher layer i (zip): only the first L_S teacher layers are used. "
            "Compare student_hidden_states[i] with teacher_hidden_states[layer_map[i - 1]]."),
    "zip_all": (_hidden_variant(lambda s, t, m: [(i, i) for i in range(len(s))]),
                "zip(student_hidden_states, teacher_hidden_states) pairs the embeddings and the first L_S teacher "
                "layers and ignores layer_map; loop over the student layers 1..L_S and use layer_map."),
    "teacher_off_by_one": (_hidden_variant(lambda s, t, m: [(i, j - 1) for i, j in enumerate(m, start=1)]),
                           "off by one on the teacher side: HF hidden_states[0] is the embedding output, so "
                           "teacher layer t is teacher_hidden_states[t], not [t - 1]."),
    "student_off_by_one": (_hidden_variant(lambda s, t, m: [(i - 1, j) for i, j in enumerate(m, start=1)]),
                           "off by one on the student side: student layer i is student_hidden_states[i] "
                           "(index 0 is the embedding output)."),
    "both_off_by_one": (_hidden_variant(lambda s, t, m: [(i - 1, j - 1) for i, j in enumerate(m, start=1)]),
                        "both sides are off by one: HF hidden_states lists start with the embedding output, so "
                        "layer k is hidden_states[k] for the student and for the teacher."),
    "no_projection_if_same_width": (_hidden_variant(_mapped, proj_when="if_widths_differ"),
                                    "the projection is skipped when the widths are equal; the loss is "
                                    "MSE(projection(h_S), h_T) for every mapped layer — apply it always."),
    "mask_ignored": (_hidden_variant(_mapped, mse=lambda a, b, m: F.mse_loss(a, b)),
                     "padded tokens are counted: average the squared error over the real tokens only "
                     "(attention_mask == 1), as in sum(mask * err) / (mask.sum() * D)."),
    "mask_all_tokens_denominator": (_hidden_variant(_mapped, mse=lambda a, b, m: (((a - b) ** 2).sum(-1) * m).sum()
                                                    / a.numel()),
                                    "padding is zeroed in the sum but still counted in the denominator: divide "
                                    "by the number of real tokens times the width D."),
    "no_width": (_hidden_variant(_mapped, mse=lambda a, b, m: (((a - b) ** 2).sum(-1) * m).sum() / m.sum()),
                 "the width D is missing from the denominator: the MSE is a mean over every element of the real "
                 "tokens, sum(mask * err) / (mask.sum() * D)."),
    "per_sequence_mean": (_hidden_variant(_mapped, mse=_seq_mean_mse),
                          "each sequence is averaged first, so short reviews weigh more than long ones; average "
                          "over all real tokens of the batch at once."),
    "sum_layers": (_hidden_variant(_mapped, reduce="sum"),
                   "the layers are summed; average them (divide by the number of student layers)."),
}


def _hidden_cases():
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    cases = []
    for k, (n_s, n_t, d_s, d_t) in enumerate(((3, 6, 6, 10), (2, 8, 4, 4), (3, 3, 5, 7))):
        s_hs, t_hs = _states(n_s + 1, 3, 6, d_s, 100 + k), _states(n_t + 1, 3, 6, d_t, 200 + k)
        # padded positions hold large garbage, as nothing constrains them
        for h in s_hs + t_hs:
            h[~mask.bool()] = 5.0 * torch.randn(int((~mask.bool()).sum()), h.shape[-1], generator=contract.generator(k),
                                                dtype=torch.float64)
        layer_map = tl.uniform_layer_map(n_s, n_t)
        cases.append(Case((s_hs, t_hs, layer_map, _proj(d_s, d_t, 300 + k), mask), {},
                          f"{n_s} -> {n_t} layers, widths {d_s} -> {d_t}, layer_map={layer_map}"))
    return cases


def check_hidden_loss(fn: Callable) -> bool:
    """``fn(student_hidden_states, teacher_hidden_states, layer_map, projection, attention_mask)``
    must equal :func:`kdcourse.losses.transformer.hidden_state_loss`."""
    cases = _hidden_cases()
    first = cases[0]
    try:
        fn(*first.args)
    except NotImplementedError:
        raise
    except (RuntimeError, ValueError) as exc:
        if "size" in str(exc) or "shape" in str(exc) or "width" in str(exc):
            raise CheckFailed(
                "hidden_loss fails when the student is narrower than the teacher (6 vs 10): apply the learned "
                f"projection to the student's hidden states before the MSE, projection(h_S). ({exc})") from exc
        raise CheckFailed(f"hidden_loss raised {type(exc).__name__}: {exc} (on {first.label})") from exc
    ok = diagnose("hidden_loss", fn, tl.hidden_state_loss, cases, HIDDEN_LOSS_VARIANTS)
    s_hs, t_hs, layer_map, proj, mask = first.args
    s_hs = tuple(h.clone().requires_grad_(True) for h in s_hs)
    proj.zero_grad()
    out = fn(s_hs, t_hs, layer_map, proj, mask)
    if out.ndim != 0:
        raise CheckFailed(f"hidden_loss must return a scalar, got shape {tuple(out.shape)}")
    out.backward()
    if proj.weight.grad is None or not torch.isfinite(proj.weight.grad).all() or proj.weight.grad.abs().sum() == 0:
        raise CheckFailed("no gradient reaches the projection's weights — it must be trained with the student")
    return ok


# --------------------------------------------------------------------------
# Exercise 3: attention loss (KL on probabilities, padding masked)
# --------------------------------------------------------------------------

def _probs(b, h, s, mask, seed, scale=2.0):
    """HF-like attention probabilities: padded keys exactly 0, padded query
    rows still distributions over the real keys."""
    scores = torch.randn(b, h, s, s, generator=contract.generator(seed), dtype=torch.float64) * scale
    return scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf")).softmax(-1)


def _rows(mask, h):
    return mask.to(torch.float64)[:, None, :, None].expand(-1, h, -1, 1)


def _kl_terms(s, t):
    return torch.xlogy(t, t) - torch.xlogy(t, s.clamp_min(1e-12))


def _att_variant(terms=_kl_terms, rows="real", denom="heads_x_real"):
    def loss(s, t, mask):
        b, h, n, _ = s.shape
        k = terms(s, t)
        r = _rows(mask, h) if rows == "real" else torch.ones(b, h, n, 1, dtype=s.dtype)
        total = (k * r).sum()
        d = {"heads_x_real": h * mask.sum(), "real": mask.sum(), "all": b * h * n, "batch": b}[denom]
        return total / d
    return loss


ATTENTION_VARIANTS = {
    "mask_ignored": (_att_variant(rows="all", denom="all"),
                     "padded query rows are counted: HF still gives them a distribution, but they are not tokens. "
                     "Keep only real query rows (attention_mask) and divide by heads x real tokens."),
    "padded_rows_in_denominator": (_att_variant(denom="all"),
                                   "padded rows are zeroed but still counted in the denominator: divide by "
                                   "H x (number of real query positions)."),
    "no_heads": (_att_variant(denom="real"),
                 "the heads are summed, not averaged: divide by the number of heads H as well."),
    "batchmean": (_att_variant(rows="all", denom="batch"),
                  "reduction='batchmean' on (B, H, S, S) divides by B only (and keeps padded rows): average over "
                  "heads and real query rows."),
    "reversed": (_att_variant(terms=lambda s, t: _kl_terms(t, s)),
                 "the KL runs the wrong way: the teacher's attention is the target, KL(teacher || student) = "
                 "sum t * (log t - log s)."),
    "softmax_again": (_att_variant(terms=lambda s, t: torch.xlogy(F.softmax(t, -1), F.softmax(t, -1))
                                   - F.softmax(t, -1) * F.log_softmax(s, -1)),
                      "HF attentions are already probabilities (post-softmax): applying softmax / log_softmax "
                      "again treats them as scores (the seed's mistake). Take the log of the student's "
                      "probabilities directly."),
    "mse": (_att_variant(terms=lambda s, t: (s - t) ** 2),
            "this is a squared error on probabilities; the course's loss is KL(teacher || student) on the "
            "probabilities (MiniLM). TinyBERT's MSE is on pre-softmax scores, which HF does not return."),
    "naive_log": (_att_variant(terms=lambda s, t: t * (t.log() - s.log())),
                  "NaN: at padded keys both probabilities are exactly 0 and 0 * (log 0 - log 0) is NaN. Use "
                  "torch.xlogy(t, t) - torch.xlogy(t, s) (0 * log 0 = 0), with the student clamped away from 0."),
}


def _attention_cases():
    cases = []
    for k, (b, h, n, lengths) in enumerate(((3, 2, 6, (6, 4, 2)), (2, 4, 5, (3, 5)), (1, 1, 4, (4,)))):
        mask = torch.zeros(b, n, dtype=torch.int64)
        for i, L in enumerate(lengths):
            mask[i, :L] = 1
        cases.append(Case((_probs(b, h, n, mask, 400 + k), _probs(b, h, n, mask, 500 + k, 3.0), mask), {},
                          f"(B, H, S) = ({b}, {h}, {n}), lengths {lengths}"))
    return cases


def check_attention_loss(fn: Callable) -> bool:
    """``fn(student_attention, teacher_attention, attention_mask)`` on (B, H, S, S)
    probabilities must equal :func:`kdcourse.losses.transformer.attention_kl`,
    and give finite gradients when padded keys hold exact zeros."""
    cases = _attention_cases()
    ok = diagnose("attention_loss", fn, tl.attention_kl, cases, ATTENTION_VARIANTS)
    # gradients through a softmax with masked (-inf) keys, as in a real student
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    scores = torch.randn(2, 2, 4, 4, generator=contract.generator(600), dtype=torch.float64, requires_grad=True)
    s = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf")).softmax(-1)
    out = fn(s, _probs(2, 2, 4, mask, 601), mask)
    if out.ndim != 0:
        raise CheckFailed(f"attention_loss must return a scalar, got shape {tuple(out.shape)}")
    out.backward()
    if scores.grad is None or not torch.isfinite(scores.grad).all():
        raise CheckFailed("the gradient is NaN or missing at padded keys (exact zeros): torch.where / masking after "
                          "a log does not stop a NaN gradient. Clamp the student's probabilities (s.clamp_min(1e-12)) "
                          "inside the log, or use torch.xlogy.")
    return ok


# --------------------------------------------------------------------------
# Declarations (kdcourse.checks.contract): what the grader probes
# --------------------------------------------------------------------------

def probe_layer_map(fn: Callable, seed: int) -> list:
    """Six (n_student, n_teacher) pairs drawn from 1..8 x n_student..24
    (equal depths included); the list returned for each, element types kept."""
    g = contract.generator(seed)
    out = []
    for _ in range(6):
        n_s = 1 + draw_int(g, 0, 8)
        n_t = n_s + draw_int(g, 0, 17) * (seed % 4 != 3)
        got, raised = contract.attempt(fn, n_s, n_t)
        if raised:
            out.append(raised)
            continue
        if isinstance(got, torch.Tensor):
            got = got.tolist()
        if not isinstance(got, (list, tuple)):
            raise contract.PlainDataError(f"layer_map must return a list of ints, got {type(got).__name__}")
        out.append([v if type(v) is int else f"not an int: {type(v).__name__}" for v in got])
    return out


def probe_hidden_loss(fn: Callable, seed: int) -> dict:
    """1-4 student layers, up to 8 teacher layers, equal or different widths,
    a uniform or an arbitrary increasing layer map, padded positions full of
    garbage: the loss and its gradients w.r.t. every student hidden state
    and the projection's weights."""
    g = contract.generator(seed)
    n_s = 1 + draw_int(g, 0, 4)
    n_t = n_s + draw_int(g, 0, 5)
    d_s = 2 + draw_int(g, 0, 6)
    d_t = d_s if seed % 3 == 1 else 2 + draw_int(g, 0, 9)
    b, s = 1 + draw_int(g, 0, 3), 3 + draw_int(g, 0, 5)
    mask = torch.zeros(b, s, dtype=torch.int64)
    for i in range(b):
        mask[i, : 1 + draw_int(g, 0, s)] = 1
    if seed % 2:
        layer_map = [(i * n_t) // n_s for i in range(1, n_s + 1)]
    else:
        layer_map = sorted(torch.randperm(n_t, generator=g)[:n_s].add(1).tolist())
    pad = ~mask.bool()

    def states(n, d):
        hs = [torch.randn(b, s, d, generator=g, dtype=torch.float64) for _ in range(n + 1)]
        for h in hs:
            h[pad] = 5.0 * torch.randn(int(pad.sum()), d, generator=g, dtype=torch.float64)
        return hs

    s_hs = tuple(h.requires_grad_(True) for h in states(n_s, d_s))
    t_hs = tuple(states(n_t, d_t))
    torch.manual_seed(seed)
    proj = nn.Linear(d_s, d_t).double()
    out, raised = contract.attempt(fn, s_hs, t_hs, list(layer_map), proj, mask)
    if raised:
        return raised
    data = {"loss": contract.scalar(out, "hidden_loss")}
    inputs = list(s_hs[1:]) + [proj.weight, proj.bias]
    data["grads"] = contract.grad(out, inputs, seed)
    return data


def probe_attention_loss(fn: Callable, seed: int) -> dict:
    """(B, H, S, S) probabilities from masked softmaxes (exact zeros at padded
    keys), 1-3 sequences of random lengths, 1-4 heads: the loss and its
    gradient w.r.t. the student's attention *scores* (finite at padded keys)."""
    g = contract.generator(seed)
    b, h = 1 + draw_int(g, 0, 3), 1 + draw_int(g, 0, 4)
    n = 2 + draw_int(g, 0, 5)
    mask = torch.zeros(b, n, dtype=torch.int64)
    for i in range(b):
        mask[i, : 1 + draw_int(g, 0, n)] = 1
    keys = ~mask.bool()[:, None, None, :]
    scores = (torch.randn(b, h, n, n, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    student = scores.masked_fill(keys, float("-inf")).softmax(-1)
    teacher = (torch.randn(b, h, n, n, generator=g, dtype=torch.float64) * 3).masked_fill(keys, float("-inf")).softmax(-1)
    out, raised = contract.attempt(fn, student, teacher, mask)
    if raised:
        return raised
    return {"loss": contract.scalar(out, "attention_loss"), "grad_scores": contract.grad(out, [scores], seed)}


EXERCISES = [
    contract.Exercise(name="layer_map", points=1.0, check=check_layer_map, probe=probe_layer_map,
                      reference=tl.uniform_layer_map, variants=LAYER_MAP_VARIANTS, hidden_seeds=(0, 1, 2, 3),
                      rtol=0.0, atol=0.0),
    contract.Exercise(name="hidden_loss", points=1.0, check=check_hidden_loss, probe=probe_hidden_loss,
                      reference=tl.hidden_state_loss, variants=HIDDEN_LOSS_VARIANTS, hidden_seeds=tuple(range(6)),
                      rtol=1e-6, atol=1e-9),
    contract.Exercise(name="attention_loss", points=1.0, check=check_attention_loss, probe=probe_attention_loss,
                      reference=tl.attention_kl, variants=ATTENTION_VARIANTS, hidden_seeds=tuple(range(6)),
                      rtol=1e-6, atol=1e-9),
]

# The DistilBERT triple loss and the two-stage recipe (kdcourse.checks.lab3_recipe).
from ..recipes import lab3_controls as _recipe  # noqa: E402
from .lab3_recipe import (DISTILBERT_VARIANTS, TWO_STAGE_VARIANTS, check_distilbert_loss,  # noqa: E402,F401
                          check_two_stage, probe_distilbert_loss, probe_two_stage)

EXERCISES += [
    contract.Exercise(name="distilbert_loss", points=1.0, check=check_distilbert_loss, probe=probe_distilbert_loss,
                      reference=tl.distilbert_loss, variants=DISTILBERT_VARIANTS, hidden_seeds=tuple(range(8)),
                      rtol=1e-6, atol=1e-9),
    contract.Exercise(name="two_stage_kd", points=1.0, check=check_two_stage, probe=probe_two_stage,
                      reference=_recipe.two_stage_kd, variants=TWO_STAGE_VARIANTS, hidden_seeds=tuple(range(6)),
                      rtol=0.0, atol=0.0),
]

from .lab3_masking import EXERCISE as _MASKING, MASKING_VARIANTS, check_mask_tokens, probe_mask_tokens  # noqa: E402,F401
EXERCISES.append(_MASKING)  # BERT's masking of the unlabelled text (kdcourse.checks.lab3_masking), after DistilBERT's loss

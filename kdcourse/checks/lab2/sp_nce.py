"""Lab 2: the similarity-preserving loss and in-batch InfoNCE — checks, variants and probes."""
from __future__ import annotations

from typing import Callable
import torch
import torch.nn.functional as F
from ..contract import draw_int
from ...losses import relation
from .. import Case, contract, diagnose
from ._common import _loss_data, _pair_probe, _r, _randn, check_gradients, check_inputs_untouched


# --------------------------------------------------------------------------
# Exercise 6: similarity-preserving loss (Tung & Mori)
# --------------------------------------------------------------------------

def _sp_with(gram, reduce=lambda d, b: d.pow(2).sum() / b ** 2):
    def loss(student, teacher):
        s, t = student.flatten(1), teacher.detach().flatten(1)
        return reduce(gram(t) - gram(s), s.shape[0])
    return loss


def _row_gram(q):
    return F.normalize(q @ q.t(), dim=1)


SP_VARIANTS = {
    "cosine": (_sp_with(lambda q: F.normalize(q, dim=1) @ F.normalize(q, dim=1).t()),
               "this is the cosine-similarity matrix (rows of F normalised *before* the product, as a reference "
               "chapter does). Tung & Mori form G = F F^T first and then divide each *row of G* by its L2 norm."),
    "unnormalized": (_sp_with(lambda q: q @ q.t()),
                     "the Gram matrix is not normalised: divide each row of G = F F^T by its L2 norm "
                     "(F.normalize(G, dim=1)), so the two networks' feature scales drop out."),
    "sum": (_sp_with(_row_gram, lambda d, b: d.pow(2).sum()),
            "the squared differences are summed without dividing by B^2: the paper's loss is ||G_t - G_s||_F^2 / B^2."),
    "per_b": (_sp_with(_row_gram, lambda d, b: d.pow(2).sum() / b),
              "divided by B instead of B^2: the paper's loss is ||G_t - G_s||_F^2 / B^2."),
    "frobenius": (_sp_with(_row_gram, lambda d, b: d.norm() / b ** 2),
                  "the Frobenius norm is not squared: use ||G_t - G_s||_F^2 / B^2 (sum of squared entries)."),
    "l1": (_sp_with(_row_gram, lambda d, b: d.abs().sum() / b ** 2),
           "absolute differences: SP uses squared differences, ||G_t - G_s||_F^2 / B^2."),
    "per_channel": (lambda s, t: _sp_with(_row_gram)(s.flatten(2).mean(-1) if s.ndim == 4 else s,
                                                     t.flatten(2).mean(-1) if t.ndim == 4 else t),
                    "the feature maps are pooled to channel means first: SP flattens each sample's whole map "
                    "(C * H * W values) before G = F F^T."),
}


def check_sp_loss(fn: Callable) -> bool:
    """``fn(student, teacher)``, (B, ...) each, must equal Tung & Mori's SP loss."""
    cases = [
        Case((_randn(6, 4, 4, 4, seed=51, relu=True), _randn(6, 16, 2, 2, seed=52, relu=True)), {},
             "student (6, 4, 4, 4), teacher (6, 16, 2, 2) feature maps"),
        Case((_randn(5, 7, seed=53), _randn(5, 20, seed=54) * 5), {}, "embeddings (5, 7) and (5, 20)"),
        Case((_randn(4, 3, 2, 2, seed=55) * 0.1, _randn(4, 9, seed=56) + 2), {}, "a (4, 3, 2, 2) map and a (4, 9) vector"),
        Case((_randn(2, 5, seed=57), _randn(2, 5, seed=58)), {}, "B = 2"),
    ]
    check_inputs_untouched("sp_loss", fn, cases[0].args, ("student", "teacher"))
    ok = diagnose("sp_loss", fn, relation.similarity_preserving, cases, SP_VARIANTS, rtol=1e-6, atol=1e-9)
    for c in cases[:3]:
        check_gradients("sp_loss", fn, relation.similarity_preserving, c.args, label=c.label)
    return ok


# --------------------------------------------------------------------------
# Exercise 7: in-batch InfoNCE
# --------------------------------------------------------------------------

def _nce_with(logits_of, reduce=F.cross_entropy):
    def loss(student, teacher, temperature=0.1):
        lg = logits_of(student, teacher.detach(), temperature)
        return reduce(lg, torch.arange(len(lg)))
    return loss


def _cos(s, t):
    return F.normalize(s, dim=1) @ F.normalize(t, dim=1).t()


INFO_NCE_VARIANTS = {
    "not_normalized": (_nce_with(lambda s, t, tau: s @ t.t() / tau),
                       "the embeddings are not L2-normalised: use cosine similarities "
                       "(F.normalize(student, dim=1) @ F.normalize(teacher, dim=1).T)."),
    "times_tau": (_nce_with(lambda s, t, tau: _cos(s, t) * tau),
                  "the similarities are multiplied by the temperature; divide by it (logits = cos / tau)."),
    "no_tau": (_nce_with(lambda s, t, tau: _cos(s, t)),
               "the temperature is not used: divide the cosine similarities by tau."),
    "symmetric": (lambda s, t, temperature=0.1: 0.5 * (F.cross_entropy(_cos(s, t.detach()) / temperature, torch.arange(len(s)))
                                                 + F.cross_entropy(_cos(s, t.detach()).t() / temperature, torch.arange(len(s)))),
                  "you average both directions (CLIP-style); here each *student* embedding is the anchor and the "
                  "batch's teacher embeddings are the candidates: CE(logits[i, :], i) only."),
    "teacher_anchor": (_nce_with(lambda s, t, tau: _cos(s, t).t() / tau),
                       "the matrix is transposed (teacher embeddings as anchors): row i must hold the student's "
                       "embedding i against every teacher embedding j, logits = u @ v.T / tau."),
    "sum": (_nce_with(lambda s, t, tau: _cos(s, t) / tau, lambda lg, y: F.cross_entropy(lg, y, reduction="sum")),
            "the per-anchor losses are summed; average them over the batch (the default of F.cross_entropy)."),
    "positive_only": (lambda s, t, temperature=0.1: -(F.normalize(s, dim=1) * F.normalize(t.detach(), dim=1)).sum(1).mean() / temperature,
                      "only the positive pair is scored: InfoNCE is a softmax over the batch, so the other B - 1 "
                      "teacher embeddings act as negatives (F.cross_entropy(logits, arange(B)))."),
    "mse_labels": (_nce_with(lambda s, t, tau: _cos(s, t) / tau,
                             lambda lg, y: F.binary_cross_entropy_with_logits(lg, F.one_hot(y, len(lg)).to(lg.dtype))),
                   "a binary (sigmoid) loss per pair: InfoNCE takes a softmax over each row (F.cross_entropy)."),
}


def check_info_nce(fn: Callable) -> bool:
    """``fn(student, teacher, temperature)`` for (B, D) embeddings must equal
    the in-batch InfoNCE loss with the student as anchor."""
    cases = [
        Case((_randn(8, 5, seed=61), _randn(8, 5, seed=62), 0.1), {}, "B = 8, D = 5, temperature 0.1"),
        Case((_randn(4, 16, seed=63) * 3, _randn(4, 16, seed=64) * 0.2, 0.07), {}, "B = 4, D = 16, different scales, 0.07"),
        Case((_randn(16, 3, seed=65), _randn(16, 3, seed=66), 0.5), {}, "B = 16, D = 3, temperature 0.5"),
    ]
    # the student's own embedding correlated with its positive, so the right pairing matters
    s = _randn(6, 8, seed=67)
    cases.append(Case((s, s + 0.3 * _randn(6, 8, seed=68), 0.2), {}, "positives close to their anchors, 0.2"))
    check_inputs_untouched("info_nce", fn, cases[0].args, ("student", "teacher", "temperature"))
    ok = diagnose("info_nce", fn, _reference_info_nce, cases, INFO_NCE_VARIANTS, rtol=1e-6, atol=1e-9)
    for c in cases[:2]:
        check_gradients("info_nce", fn, _reference_info_nce, c.args, label=c.label)
    return ok


def _reference_info_nce(student, teacher, temperature=0.1):
    from ...losses.contrastive import info_nce

    return info_nce(student, teacher, temperature=temperature)


_SP_CASES = [
    (_r(6, 4, 4, 4, relu=True), _r(6, 16, 2, 2, relu=True)),           # maps of different shapes
    (_r(5, 7), _r(5, 20, scale=5)),                                     # embeddings
    (_r(4, 3, 2, 2, scale=0.1), _r(4, 9, offset=2.0)),                  # a map and a vector
    (_r(2, 5), _r(2, 5)),                                               # B = 2
    (_r(8, 6, 3, 3), _r(8, 12, 3, 3, scale=3)),
]


def probe_sp_loss(fn: Callable, seed: int) -> dict:
    """Feature maps (B, C, H, W), embeddings (B, D) and one of each, B from 2
    to 8: the loss and its gradients w.r.t. both inputs."""
    return _pair_probe("sp_loss", _SP_CASES, seed, fn)


def probe_info_nce(fn: Callable, seed: int) -> dict:
    """(B, D) student and teacher embeddings (B from 2 to 16, scales and
    temperatures 0.05-0.5, positives near their anchors on odd seeds): the
    loss and its gradients w.r.t. both inputs."""
    g = contract.generator(seed)
    b = 2 + draw_int(g, 0, 15)
    d = 2 + draw_int(g, 0, 15)
    tau = [0.1, 0.07, 0.5, 0.2, 0.05][seed % 5]
    s = torch.randn(b, d, generator=g, dtype=torch.float64) * (0.2 + 3 * torch.rand(1, generator=g, dtype=torch.float64))
    t = s.detach() + 0.3 * torch.randn(b, d, generator=g, dtype=torch.float64) if seed % 2 else \
        torch.randn(b, d, generator=g, dtype=torch.float64)
    s, t = s.requires_grad_(True), t.requires_grad_(True)
    out, raised = contract.attempt(fn, s, t, tau)
    if raised:
        return raised
    return _loss_data("info_nce", out, {"student": s, "teacher": t}, seed)

"""Lab 2: attention transfer and the RKD distance loss — checks, variants and probe cases."""
from __future__ import annotations

from typing import Callable
import torch
import torch.nn.functional as F
from ...losses import feature, relation
from .. import Case, diagnose
from ._common import _pair_probe, _r, _randn, check_gradients, check_inputs_untouched


# --------------------------------------------------------------------------
# Exercise 3: attention transfer
# --------------------------------------------------------------------------

def _at_variant(amap, reduce=lambda d: d.pow(2).mean(), pool_features: bool = True):
    def loss(student, teacher):
        s, t = student, teacher
        if pool_features:
            s, t = feature.match_spatial(s, t)
            return reduce(amap(s) - amap(t))
        a_s, a_t = amap(s), amap(t)
        return reduce(a_s - a_t)
    return loss


def _map_norm(f):  # the handout's map: L2 norm over channels
    return F.normalize(f.norm(p=2, dim=1).flatten(1), dim=1)


def _pooled_map_variant(student, teacher):
    def raw(f):
        return f.pow(2).mean(1, keepdim=True)
    a_s, a_t = raw(student), raw(teacher)
    if a_s.shape[-2:] != a_t.shape[-2:]:
        if a_s.shape[-1] > a_t.shape[-1]:
            a_s = F.adaptive_avg_pool2d(a_s, a_t.shape[-2:])
        else:
            a_t = F.adaptive_avg_pool2d(a_t, a_s.shape[-2:])
    return (F.normalize(a_s.flatten(1), dim=1) - F.normalize(a_t.flatten(1), dim=1)).pow(2).mean()


def _upsampled_at(student, teacher):
    s, t = student, teacher
    if s.shape[-1] < t.shape[-1]:
        s = F.interpolate(s, size=t.shape[-2:], mode="nearest")
    elif t.shape[-1] < s.shape[-1]:
        t = F.interpolate(t, size=s.shape[-2:], mode="nearest")
    amap = lambda f: F.normalize(f.pow(2).mean(1).flatten(1), dim=1)  # noqa: E731
    return (amap(s) - amap(t)).pow(2).mean()


AT_VARIANTS = {
    "not_normalized": (_at_variant(lambda f: f.pow(2).mean(1).flatten(1)),
                       "the attention maps are not normalised: divide each flattened map by its L2 norm "
                       "(F.normalize(a, dim=1)), so only *where* the network looks is compared, not how strongly."),
    "l2_norm_channels": (_at_variant(_map_norm),
                         "wrong channel reduction: this is the L2 norm over channels (sqrt of the sum of squares, as "
                         "the handout computes it). Zagoruyko & Komodakis use the mean (or sum) of the *squared* "
                         "activations, without the square root: a = mean_c A_c^2."),
    "abs": (_at_variant(lambda f: F.normalize(f.abs().mean(1).flatten(1), dim=1)),
            "wrong channel reduction: mean of |A| (p = 1); the paper's map uses squared activations (p = 2)."),
    "max_channels": (_at_variant(lambda f: F.normalize(f.pow(2).amax(1).flatten(1), dim=1)),
                     "wrong channel reduction: max over channels; use the mean of the squared activations."),
    "normalize_batch": (_at_variant(lambda f: F.normalize(f.pow(2).mean(1).flatten(1), dim=0)),
                        "the maps are normalised over the batch (dim 0); normalise each sample's map over its "
                        "H*W positions (dim=1 after flattening)."),
    "sum": (_at_variant(lambda f: F.normalize(f.pow(2).mean(1).flatten(1), dim=1), lambda d: d.pow(2).sum()),
            "the squared differences are summed; take the mean over batch and positions ((a_s - a_t).pow(2).mean())."),
    "per_sample": (_at_variant(lambda f: F.normalize(f.pow(2).mean(1).flatten(1), dim=1), lambda d: d.pow(2).sum(1).mean()),
                   "you sum over positions and average over the batch; the course (and the authors' code) averages "
                   "over positions too: (a_s - a_t).pow(2).mean()."),
    "unsquared": (_at_variant(lambda f: F.normalize(f.pow(2).mean(1).flatten(1), dim=1), lambda d: d.norm(dim=1).mean()),
                  "this is the unsquared distance ||a_s - a_t||_2 (the paper's eq. 2 with p = 2); the course follows "
                  "the authors' code: squared differences, averaged: (a_s - a_t).pow(2).mean()."),
    "pooled_map": (_pooled_map_variant,
                   "you pool the attention *map*; the course pools the larger *feature map* to the smaller size "
                   "first (F.adaptive_avg_pool2d), then computes both maps (as RepDistiller does)."),
    "upsample": (_upsampled_at,
                 "the smaller map is upsampled; average-pool the larger feature map down instead (F.adaptive_avg_pool2d)."),
}


def check_attention_transfer(fn: Callable) -> bool:
    """``fn(student, teacher)`` must equal mean((a_s - a_t)^2) with
    a = normalize(vec(mean_c A^2)), the larger feature map average-pooled."""
    cases = [
        Case((_randn(4, 8, 8, 8, seed=21), _randn(4, 16, 8, 8, seed=22)), {}, "same size, channels 8 vs 16"),
        Case((_randn(3, 4, 4, 4, seed=23, relu=True), _randn(3, 16, 8, 8, seed=24, relu=True)), {},
             "student (3, 4, 4, 4), teacher (3, 16, 8, 8) (teacher pooled)"),
        Case((_randn(2, 6, 8, 8, seed=25, relu=True), _randn(2, 6, 4, 4, seed=26, relu=True)), {},
             "student (2, 6, 8, 8) larger than teacher (2, 6, 4, 4)"),
        Case((_randn(5, 3, 5, 5, seed=27) * 10, _randn(5, 7, 5, 5, seed=28) * 0.1), {}, "very different scales"),
    ]
    check_inputs_untouched("at_loss", fn, cases[1].args, ("student", "teacher"))
    ok = diagnose("attention_transfer_loss", fn, feature.attention_transfer_loss, cases, AT_VARIANTS, rtol=1e-6, atol=1e-9)
    for c in cases[1:3]:
        check_gradients("at_loss", fn, feature.attention_transfer_loss, c.args, label=c.label)
    return ok


# --------------------------------------------------------------------------
# Exercise 4: RKD distance-wise loss
# --------------------------------------------------------------------------

def _rkd_with(norm, dist=relation.pairwise_distances, crit=F.smooth_l1_loss):
    def loss(student, teacher):
        return crit(norm(dist(student.flatten(1))), norm(dist(teacher.flatten(1))))
    return loss


def _mean_nz(d):
    """d divided by the mean of its off-diagonal entries (every pair i != j, as the RKD paper's mu)."""
    return d / d[~torch.eye(d.shape[0], dtype=torch.bool, device=d.device)].mean()


RKD_VARIANTS = {
    "max": (_rkd_with(lambda d: d / d.max()),
            "the distances are divided by the largest one (as a reference chapter does); RKD divides by the mean of "
            "the distances over all pairs i != j, so one outlier pair cannot shrink all the others."),
    "mean_all": (_rkd_with(lambda d: d / d.mean()),
                 "the mean includes the B zero distances on the diagonal; average only the off-diagonal pairs "
                 "i != j: d[~torch.eye(B, dtype=torch.bool)].mean()."),
    "unnormalized": (_rkd_with(lambda d: d),
                     "the distances are not normalised: divide each side by its own mean distance over the "
                     "pairs i != j, so the student matches the teacher's geometry, not its scale."),
    "squared": (_rkd_with(_mean_nz, dist=lambda e: relation.pairwise_distances(e).pow(2)),
                "these are squared distances; RKD uses Euclidean distances ||x_i - x_j||_2."),
    "mse": (_rkd_with(_mean_nz, crit=F.mse_loss),
            "the comparison uses MSE; RKD uses the Huber loss (F.smooth_l1_loss), robust to a few large differences."),
    "l1": (_rkd_with(_mean_nz, crit=F.l1_loss),
           "the comparison uses L1; RKD uses the Huber loss (F.smooth_l1_loss)."),
    "teacher_scale": (lambda s, t: F.smooth_l1_loss(relation.pairwise_distances(s.flatten(1)) / relation.pairwise_distances(t.flatten(1))[relation.pairwise_distances(t.flatten(1)) > 0].mean(),
                                                    _mean_nz(relation.pairwise_distances(t.flatten(1)))),
                      "the student's distances are divided by the *teacher's* mean distance; normalise each side by "
                      "its own mean (the student and teacher live in spaces of different scale)."),
}


def check_rkd_distance(fn: Callable) -> bool:
    """``fn(student, teacher)`` (B, D) embeddings must equal
    smooth_l1(d_s / mu_s, d_t / mu_t), mu the mean distance over all pairs i != j."""
    outlier = _randn(6, 4, seed=41)
    outlier[0] = outlier[0] * 30
    cases = [
        Case((_randn(8, 5, seed=42), _randn(8, 12, seed=43) * 3), {}, "B=8, widths 5 vs 12"),
        Case((_randn(6, 4, seed=44) * 0.1, outlier), {}, "a teacher batch with one far outlier"),
        Case((_randn(5, 3, seed=45) * 10, _randn(5, 3, seed=46) + 4), {}, "different scales and offsets"),
    ]
    check_inputs_untouched("rkd_distance", fn, cases[0].args, ("student", "teacher"))
    ok = diagnose("rkd_distance", fn, relation.rkd_distance, cases, RKD_VARIANTS, rtol=1e-6, atol=1e-9)
    for c in cases[:2]:
        check_gradients("rkd_distance", fn, relation.rkd_distance, c.args, label=c.label)
    return ok


_AT_CASES = [
    (_r(4, 8, 8, 8), _r(4, 16, 8, 8)),                                  # same size, channels differ
    (_r(3, 4, 4, 4, relu=True), _r(3, 16, 8, 8, relu=True)),            # teacher larger
    (_r(2, 6, 8, 8, relu=True), _r(2, 6, 4, 4, relu=True)),             # student larger
    (_r(5, 3, 5, 5, scale=10), _r(5, 7, 5, 5, scale=0.1)),              # very different scales
    (_r(2, 5, 8, 6), _r(2, 9, 4, 3)),                                   # not square, student larger
    (_r(1, 3, 2, 2), _r(1, 4, 4, 4)),                                   # one sample, tiny maps
]

_RKD_CASES = [
    (_r(8, 5), _r(8, 12, scale=3)),
    (_r(6, 4, scale=0.1), _r(6, 4, offset=4.0)),
    (_r(5, 3, scale=10), _r(5, 3, offset=4.0)),
    (_r(2, 7), _r(2, 3)),                                               # the smallest batch
    (_r(10, 16), _r(10, 2, scale=30)),
]


def probe_at_loss(fn: Callable, seed: int) -> dict:
    """Equal sizes, a larger teacher, a larger student, non-square maps, very
    different scales: the loss and its gradients w.r.t. the student's and
    the teacher's features."""
    return _pair_probe("at_loss", _AT_CASES, seed, fn)


def probe_rkd_distance(fn: Callable, seed: int) -> dict:
    """(B, D) embeddings of different widths, scales and offsets, B from 2 to
    10: the loss and its gradients w.r.t. both embeddings."""
    return _pair_probe("rkd_distance", _RKD_CASES, seed, fn)

"""Loss inputs that used to slip through (a number or NaN instead of an error):
each is now a clear error naming the argument; and the RKD mean distance with
duplicate samples follows the paper and the authors' code (float64 oracle)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdcourse.losses import _validate, contrastive, detection, feature, mutual, relation, response
from kdcourse.losses import transformer as tl

g = torch.Generator().manual_seed(0)
Z = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731


# ---- empty batches (B = 0): a mean over nothing is NaN -------------------------
@pytest.mark.parametrize("call", [
    lambda: response.kd_loss(Z(0, 5), Z(0, 5), torch.zeros(0, dtype=torch.long)),
    lambda: response.kl_divergence(Z(0, 5), Z(0, 5)),
    lambda: mutual.mutual_learning_loss([Z(0, 5), Z(0, 5)], torch.zeros(0, dtype=torch.long)),
    lambda: mutual.peer_kl(Z(0, 5), Z(0, 5)),
    lambda: feature.hint_loss(Z(0, 4, 3, 3), Z(0, 4, 3, 3)),
    lambda: feature.attention_transfer_loss(Z(0, 4, 3, 3), Z(0, 4, 3, 3)),
    lambda: contrastive.info_nce(Z(0, 8), Z(0, 8)),
    lambda: detection.classification_kd(Z(0, 4, 3), Z(0, 4, 3)),
    lambda: tl.masked_mse(Z(0, 5, 8), Z(0, 5, 8)),
    lambda: tl.prediction_loss(Z(0, 3), Z(0, 3)),
], ids=["kd_loss", "kl_divergence", "mutual_learning_loss", "peer_kl", "hint_loss", "at_loss", "info_nce",
        "classification_kd", "masked_mse", "prediction_loss"])
def test_empty_batch_is_an_error(call):
    with pytest.raises(ValueError, match="empty batch"):
        call()


def test_relation_losses_need_two_samples():
    with pytest.raises(ValueError, match="at least 2"):
        relation.rkd_distance(Z(0, 4), Z(0, 4))


# ---- temperatures: NaN, inf, 0, negative, bool, a tensor of several ----------------
BAD_T = [float("nan"), float("inf"), -float("inf"), 0.0, -1.0, True, torch.tensor([1.0, 2.0]), "4"]


@pytest.mark.parametrize("T", BAD_T, ids=lambda v: repr(v)[:12])
@pytest.mark.parametrize("call,name", [
    (lambda T: response.kd_loss(Z(4, 3), Z(4, 3), torch.tensor([0, 1, 2, 0]), T=T), "T"),
    (lambda T: mutual.mutual_learning_loss([Z(4, 3), Z(4, 3)], torch.tensor([0, 1, 2, 0]), T=T), "T"),
    (lambda T: contrastive.info_nce(Z(4, 8), Z(4, 8), temperature=T), "temperature"),
    (lambda T: contrastive.CRDInfoNCE(8, 8, 16, k=4, temperature=T), "temperature"),
    (lambda T: relation.batch_similarity_kl(Z(4, 3), Z(4, 3), tau=T), "tau"),
    (lambda T: relation.similarity_entropy(Z(4, 3), tau=T), "tau"),
    (lambda T: detection.classification_kd(Z(2, 4, 3), Z(2, 4, 3), T=T), "T"),
    (lambda T: tl.prediction_loss(Z(4, 3), Z(4, 3), T=T), "T"),
    (lambda T: tl.token_soft_ce(Z(2, 5, 7), Z(2, 5, 7), torch.ones(2, 5), T=T), "T"),
], ids=["kd_loss", "mutual", "info_nce", "CRDInfoNCE", "batch_similarity_kl", "similarity_entropy",
        "classification_kd", "prediction_loss", "token_soft_ce"])
def test_bad_temperature_is_an_error_naming_it(call, name, T):
    with pytest.raises(ValueError, match=rf"^{name} .*must be a"):
        call(T)


def test_a_good_temperature_passes_as_number_or_scalar_tensor():
    assert _validate.temperature(torch.tensor(2.0)) == 2.0 and _validate.temperature(np.float32(0.5)) == 0.5


# ---- labels: -100 (cross_entropy's ignore_index), floats, out of range ------------
@pytest.mark.parametrize("labels,match", [
    (torch.tensor([0, -100, 1, 2]), "-100"),
    (torch.tensor([0.0, 1.0, 2.0, 1.0]), "integer class indices"),
    (torch.tensor([0.7, 1.2, 2.9, 1.0]), "integer class indices"),
    (torch.tensor([0, 1, 3, 1]), "class 3"),
    (torch.tensor([True, False, True, False]), "integer class indices"),
])
def test_bad_labels_are_errors(labels, match):
    with pytest.raises(ValueError, match=match):
        response.kd_loss(Z(4, 3), Z(4, 3), labels, T=2.0, alpha=0.5)
    with pytest.raises(ValueError, match=match):
        mutual.mutual_learning_loss([Z(4, 3), Z(4, 3)], labels)


def test_labels_minus_100_would_have_been_skipped_silently():
    """Why -100 is refused: cross_entropy drops it from the mean without a word."""
    z, y = Z(4, 3), torch.tensor([0, -100, 1, 2])
    assert torch.isfinite(F.cross_entropy(z, y))  # what the loss would have done
    assert float(F.cross_entropy(z, y)) == pytest.approx(float(F.cross_entropy(z[[0, 2, 3]], y[[0, 2, 3]])))


# ---- layer maps: a non-integer entry was truncated by int() -----------------------
@pytest.mark.parametrize("bad", [1.5, 2.0, True, "2"])
def test_non_integer_layer_map_entry_is_an_error(bad):
    with pytest.raises(ValueError, match=r"layer_map\[1\] must be a whole layer number"):
        tl._check_layer_map([1, bad], 2, 4)
    assert tl._check_layer_map([np.int64(2), torch.tensor(4)], 2, 4) == [2, 4]


# ---- attention scores where probabilities are expected ---------------------------
def test_attention_scores_are_not_probabilities():
    scores = Z(2, 2, 5, 5)
    probs = scores.softmax(-1)
    assert float(tl.attention_kl(probs, probs)) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="student_attention must be probabilities"):
        tl.attention_kl(scores, probs)
    with pytest.raises(ValueError, match="teacher_attention must be probabilities"):
        tl.attention_kl(probs, scores.abs())  # non-negative but rows do not sum to 1


# ---- classification_kd's mask: the documented rule, checked independently ---------
def test_classification_kd_mask_is_weighted_sum_over_max_one_sum():
    s, t = Z(2, 6, 3), Z(2, 6, 3)
    per = []
    for b in range(2):
        for a in range(6):
            q, p = 1 / (1 + np.exp(-t[b, a].numpy() / 2)), 1 / (1 + np.exp(-s[b, a].numpy() / 2))
            per.append(float((q * np.log(q / p) + (1 - q) * np.log((1 - q) / (1 - p))).sum()))
    per = np.array(per).reshape(2, 6)
    mask = torch.zeros(2, 6, dtype=torch.float64)
    mask[0, 1] = mask[1, 4] = mask[1, 5] = 1
    want = 4 * (per * mask.numpy()).sum() / 3  # mean over the 3 masked anchors
    assert float(detection.classification_kd(s, t, T=2.0, mask=mask)) == pytest.approx(want, rel=1e-10)
    assert float(detection.classification_kd(s, t, T=2.0, mask=torch.zeros(2, 6))) == 0.0


# ---- RKD distance with duplicate samples: mu over all pairs i != j ----------------
def np_rkd_distance_authors(s, t, eps=1e-12):
    """float64 loops: squared distances clamped to eps before the square root
    (the authors' pdist), the diagonal 0, mu = mean over all pairs i != j."""
    def psi(e):
        b = len(e)
        d = np.zeros((b, b))
        for i in range(b):
            for j in range(b):
                if i != j:
                    d[i, j] = math.sqrt(max(float(((e[i] - e[j]) ** 2).sum()), eps))
        mu = sum(d[i, j] for i in range(b) for j in range(b) if i != j) / (b * (b - 1))
        return d / mu
    ds, dt = psi(s), psi(t)
    b = len(s)
    x = np.abs(ds - dt)
    return float(np.where(x < 1, 0.5 * x * x, x - 0.5).sum() / b ** 2)


@pytest.mark.parametrize("dups", [[], [(1, 0)], [(2, 0), (3, 0)], [(4, 1), (5, 2)]])
def test_rkd_distance_with_duplicates_matches_float64_oracle(dups):
    s, t = Z(6, 5), Z(6, 7)
    for i, j in dups:
        s[i] = s[j]
    got = relation.rkd_distance(s, t)
    assert float(got) == pytest.approx(np_rkd_distance_authors(s.numpy(), t.numpy()), rel=1e-10)
    s.requires_grad_(True)
    relation.rkd_distance(s, t).backward()
    assert torch.isfinite(s.grad).all()  # duplicates keep finite gradients


def test_rkd_distance_mu_counts_duplicate_pairs():
    """With duplicates the mean runs over all B(B-1) pairs: it differs from the
    old "mean of the non-zero distances" reading."""
    e = Z(5, 3)
    e[1] = e[0]
    d = relation.pairwise_distances(e)
    off = ~torch.eye(5, dtype=torch.bool)
    psi = relation.normalized_distances(e)
    assert float(psi[2, 3]) == pytest.approx(float(d[2, 3] / ((d[off].sum() + 2e-6) / 20)), rel=1e-10)
    assert float(psi[2, 3]) != pytest.approx(float(d[2, 3] / d[d > 0].mean()), rel=1e-3)

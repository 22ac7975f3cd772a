"""The rest of the loss inputs that used to slip through (next to
``test_losses_validate.py``): an empty batch in *every* loss of
``kdcourse.losses`` (an error, or an empty result where the function gives one
value per sample), masked-LM and synthesis targets, probabilities that do not
sum to 1, layer maps through the public losses, and ``classification_kd``'s
documented weighting rule — each against an independent oracle where there is
a value to compare."""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import torch.nn as nn

from kdcourse.losses import (contrastive, datafree, detection, distilbert, feature, mutual, relation, response,
                             transformer as tl)
from kdcourse.losses._sequence import _pair

g = torch.Generator().manual_seed(1)
Z = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
L0 = torch.zeros(0, dtype=torch.long)
MODULES = (response, feature, relation, contrastive, detection, datafree, mutual, tl, distilbert)


class _BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).mean((2, 3)))


def _net():
    return _BNNet().double().eval()


def _probs(*shape):
    return Z(*shape).softmax(-1)


# name -> a call on a batch of 0 samples; every one must raise a ValueError naming the empty batch
EMPTY_IS_AN_ERROR = {
    "kl_divergence": lambda: response.kl_divergence(Z(0, 5), Z(0, 5)),
    "kd_loss": lambda: response.kd_loss(Z(0, 5), Z(0, 5), L0),
    "match_spatial": lambda: feature.match_spatial(Z(0, 4, 3, 3), Z(0, 4, 3, 3)),
    "hint_loss": lambda: feature.hint_loss(Z(0, 4, 3, 3), Z(0, 5, 3, 3), feature.HintRegressor(4, 5).double()),
    "feature_stats_loss": lambda: feature.feature_stats_loss(Z(0, 4, 3, 3), Z(0, 4, 3, 3)),
    "attention_map": lambda: feature.attention_map(Z(0, 4, 3, 3)),
    "attention_transfer_loss": lambda: feature.attention_transfer_loss(Z(0, 4, 3, 3), Z(0, 4, 3, 3)),
    "rkd_distance": lambda: relation.rkd_distance(Z(0, 4), Z(0, 4)),
    "rkd_angle": lambda: relation.rkd_angle(Z(0, 4), Z(0, 4)),
    "similarity_preserving": lambda: relation.similarity_preserving(Z(0, 4), Z(0, 4)),
    "batch_similarity_kl": lambda: relation.batch_similarity_kl(Z(0, 4), Z(0, 4)),
    "similarity_entropy": lambda: relation.similarity_entropy(Z(0, 4)),
    "info_nce": lambda: contrastive.info_nce(Z(0, 8), Z(0, 8)),
    "CRDInfoNCE": lambda: contrastive.CRDInfoNCE(8, 8, 16, k=4).double()(Z(0, 8), Z(0, 8), L0),
    "classification_kd": lambda: detection.classification_kd(Z(0, 4, 3), Z(0, 4, 3), kind="softmax"),
    "masked_box_regression": lambda: detection.masked_box_regression(Z(0, 4, 4), Z(0, 4, 4), torch.zeros(0, 4)),
    "multiscale_feature_loss": lambda: detection.multiscale_feature_loss({"p3": Z(0, 4, 3, 3)}, {"p3": Z(0, 4, 3, 3)}),
    "channel_statistics": lambda: datafree.channel_statistics(Z(0, 3, 4, 4)),
    "bn_statistics_loss": lambda: datafree.bn_statistics_loss(_net(), Z(0, 3, 4, 4)),
    "total_variation": lambda: datafree.total_variation(Z(0, 3, 4, 4)),
    "image_prior": lambda: datafree.image_prior(Z(0, 3, 4, 4), 1.0, 1.0),
    "synthesis_loss": lambda: datafree.synthesis_loss(_net(), Z(0, 3, 4, 4), L0, bn_weight=1.0, tv_weight=1.0,
                                                      l2_weight=1.0),
    "peer_kl": lambda: mutual.peer_kl(Z(0, 5), Z(0, 5)),
    "mutual_learning_losses": lambda: mutual.mutual_learning_losses([Z(0, 5), Z(0, 5)], L0),
    "mutual_learning_loss": lambda: mutual.mutual_learning_loss([Z(0, 5), Z(0, 5)], L0),
    "average_logits": lambda: mutual.average_logits([Z(0, 5), Z(0, 5)]),
    "average_probs_as_logits": lambda: mutual.average_probs_as_logits([Z(0, 5), Z(0, 5)]),
    "masked_mse": lambda: tl.masked_mse(Z(0, 5, 8), Z(0, 5, 8)),
    "hidden_state_loss": lambda: tl.hidden_state_loss([Z(0, 5, 8)] * 3, [Z(0, 5, 8)] * 3, [1, 2]),
    "embedding_loss": lambda: tl.embedding_loss(Z(0, 5, 8), Z(0, 5, 8)),
    "attention_kl": lambda: tl.attention_kl(_probs(0, 2, 5, 5), _probs(0, 2, 5, 5)),
    "attention_loss": lambda: tl.attention_loss([_probs(0, 2, 5, 5)] * 2, [_probs(0, 2, 5, 5)] * 2, [1, 2]),
    "prediction_loss": lambda: tl.prediction_loss(Z(0, 3), Z(0, 3)),
    "token_soft_ce": lambda: distilbert.token_soft_ce(Z(0, 5, 7), Z(0, 5, 7), torch.ones(0, 5)),
    "masked_lm_loss": lambda: distilbert.masked_lm_loss(Z(0, 5, 7), torch.zeros(0, 5, dtype=torch.long)),
    "hidden_cosine_loss": lambda: distilbert.hidden_cosine_loss(Z(0, 5, 8), Z(0, 5, 8)),
    "distilbert_loss": lambda: distilbert.distilbert_loss(Z(0, 5, 7), Z(0, 5, 7), torch.zeros(0, 5, dtype=torch.long),
                                                          Z(0, 5, 8), Z(0, 5, 8)),
}

# one value per sample (or per pair): an empty batch gives an empty result of the documented shape
EMPTY_IS_EMPTY = {
    "soft_targets": (lambda: response.soft_targets(Z(0, 5), T=2.0), (0, 5)),
    "entropy_bits": (lambda: response.entropy_bits(_probs(0, 5)), (0,)),
    "pairwise_distances": (lambda: relation.pairwise_distances(Z(0, 4)), (0, 0)),
    "normalized_distances": (lambda: relation.normalized_distances(Z(0, 4)), (0, 0)),
    "triplet_angles": (lambda: relation.triplet_angles(Z(0, 4)), (0, 0, 0)),
    "sp_gram": (lambda: relation.sp_gram(Z(0, 4)), (0, 0)),
    "safe_unit": (lambda: relation.safe_unit(Z(0, 4)), (0, 4)),
    "sample_negatives": (lambda: contrastive.sample_negatives(L0, 16, 4), (0, 4)),
    "importance_map": (lambda: detection.importance_map(Z(0, 4, 3, 3)), (0, 1, 3, 3)),
}

NOT_ON_A_BATCH = {"uniform_layer_map", "batch_norm_layers"}  # numbers of layers, a model's modules


def test_every_public_loss_function_is_listed():
    """A new function in kdcourse.losses must say what it does with B = 0."""
    public = {name for m in MODULES for name, f in inspect.getmembers(m, inspect.isfunction)
              if f.__module__ == m.__name__ and not name.startswith("_")}
    listed = set(EMPTY_IS_AN_ERROR) | set(EMPTY_IS_EMPTY) | NOT_ON_A_BATCH
    assert public - listed == set(), "say what these do with an empty batch"


@pytest.mark.parametrize("name", sorted(EMPTY_IS_AN_ERROR))
def test_empty_batch_is_an_error_in_every_loss(name):
    with pytest.raises(ValueError, match=r"empty batch|at least [23]") as exc:
        EMPTY_IS_AN_ERROR[name]()
    assert "got 0" in str(exc.value) or "shape (0," in str(exc.value)


@pytest.mark.parametrize("name", sorted(EMPTY_IS_EMPTY))
def test_per_sample_functions_give_an_empty_result(name):
    call, shape = EMPTY_IS_EMPTY[name]
    assert tuple(call().shape) == shape


def test_similarity_entropy_of_one_sample_is_zero_and_needs_a_tensor():
    assert float(relation.similarity_entropy(Z(1, 4))) == 0.0  # log(B) = 0: one sample is its own neighbour
    with pytest.raises(ValueError, match="logits must be a floating-point"):
        relation.similarity_entropy([[1.0, 2.0]])


# ---- masked-LM targets: -100 is the documented "not predicted"; floats and other ids are errors ----
def test_masked_lm_loss_ignores_minus_100_as_documented():
    logits, labels = Z(2, 4, 7), torch.tensor([[3, -100, 0, -100], [-100, 6, -100, -100]])
    picked = labels != -100
    log_p = np.log(np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(-1, keepdims=True))
    want = -np.mean([log_p[b, s, labels[b, s]] for b, s in zip(*np.nonzero(picked.numpy()))])
    assert float(distilbert.masked_lm_loss(logits, labels)) == pytest.approx(want, rel=1e-12)
    assert float(distilbert.masked_lm_loss(logits, torch.full((2, 4), -100))) == 0.0


@pytest.mark.parametrize("labels,match", [
    (torch.tensor([[3.0, -100.0], [2.9, -100.0]]), "integer token ids"),  # .long() would make 2.9 a 2
    (torch.tensor([[3, -100], [7, -100]]), "contains 7"),
    (torch.tensor([[3, -5], [2, -100]]), "contains -5"),
    (torch.tensor([[3, -100, 1]]), "shape"),
])
def test_masked_lm_labels_errors_name_the_argument_and_fix(labels, match):
    with pytest.raises(ValueError, match=rf"^mlm_labels .*{match}"):
        distilbert.masked_lm_loss(Z(2, 2, 7), labels)


@pytest.mark.parametrize("targets,match", [
    (torch.tensor([0, -100]), "-100"),
    (torch.tensor([0.0, 2.0]), "integer class indices"),
    (torch.tensor([0, 3]), "class 3"),
])
def test_synthesis_targets_are_class_indices(targets, match):
    with pytest.raises(ValueError, match=rf"^targets .*{match}"):
        datafree.synthesis_loss(_net(), Z(2, 3, 4, 4), targets, bn_weight=1.0, tv_weight=1.0, l2_weight=1.0)


def test_total_variation_needs_neighbours():
    with pytest.raises(ValueError, match="at least 2 x 2"):
        datafree.total_variation(Z(2, 3, 1, 5))


# ---- probabilities that are not probabilities ---------------------------------------------------
def test_entropy_bits_refuses_rows_that_do_not_sum_to_one():
    scores = Z(3, 4).abs()  # non-negative, but not normalised
    with pytest.raises(ValueError, match="probs must be probabilities"):
        response.entropy_bits(scores)
    p = scores / scores.sum(-1, keepdim=True)
    want = -(p.numpy() * np.log2(p.numpy())).sum(-1)
    assert np.allclose(response.entropy_bits(p).numpy(), want, rtol=1e-12)
    assert float(response.entropy_bits(torch.zeros(4))) == 0.0  # an all-zero (padding) row: 0 bits


def test_attention_loss_refuses_scores_in_any_layer():
    probs = [_probs(2, 2, 5, 5) for _ in range(2)]
    with pytest.raises(ValueError, match="student_attention must be probabilities"):
        tl.attention_loss([probs[0], Z(2, 2, 5, 5)], probs, [1, 2])


# ---- layer maps through the public losses ------------------------------------------------------
@pytest.mark.parametrize("bad", [1.5, 2.0, "2"])
def test_non_integer_layer_map_entry_in_the_layer_losses(bad):
    hs = [Z(2, 5, 8) for _ in range(3)]
    att = [_probs(2, 2, 5, 5) for _ in range(2)]
    with pytest.raises(ValueError, match=r"layer_map\[1\] must be a whole layer number"):
        tl.hidden_state_loss(hs, hs, [1, bad])
    with pytest.raises(ValueError, match=r"layer_map\[1\] must be a whole layer number"):
        tl.attention_loss(att, att, [1, bad])


# ---- student and teacher of one shape: the error names both and the fix --------------------------
@pytest.mark.parametrize("call,names,fix", [
    (lambda: tl.masked_mse(Z(2, 5, 8), Z(2, 5, 6)), ("student", "teacher"), "project the student"),
    (lambda: distilbert.hidden_cosine_loss(Z(2, 5, 8), Z(2, 5, 6)), ("student_hidden", "teacher_hidden"),
     "project the student"),
    (lambda: distilbert.token_soft_ce(Z(2, 5, 7), Z(2, 5, 6), torch.ones(2, 5)), ("student_logits", "teacher_logits"),
     r"\(B, S, V\)"),
    (lambda: tl.prediction_loss(Z(2, 3), Z(2, 4)), ("student_logits", "teacher_logits"), r"\(N, C\)"),
    (lambda: tl.attention_kl(_probs(2, 2, 5, 5), _probs(2, 4, 5, 5)), ("student_attention", "teacher_attention"),
     "num_attention_heads"),
])
def test_shape_mismatch_names_both_arguments_and_the_fix(call, names, fix):
    with pytest.raises(ValueError, match=fix) as exc:
        call()
    assert all(n in str(exc.value) for n in names)


def test_pair_returns_the_shape_and_checks_each_side_first():
    assert _pair("a", Z(2, 3), "b", Z(2, 3), 2, "(N, C)") == (2, 3)
    with pytest.raises(ValueError, match=r"^b must have shape \(N, C\)"):
        _pair("a", Z(2, 3), "b", Z(2, 3, 1), 2, "(N, C)")
    with pytest.raises(ValueError, match="a must be a floating-point"):
        _pair("a", torch.ones(2, 3, dtype=torch.long), "b", Z(2, 3), 2, "(N, C)")
    with pytest.raises(ValueError, match="same sequences"):
        _pair("a", Z(2, 3), "b", Z(2, 4), 2, "(N, C)", lambda s, t: f" ({s[1]} vs {t[1]}); same sequences")


# ---- classification_kd: sum(w * L_anchor) / max(1, sum(w)), weights not renormalised -------------
def _np_anchor_kl(s, t, T, kind):
    zs, zt = s / T, t / T
    if kind == "sigmoid":
        q, p = 1 / (1 + np.exp(-zt)), 1 / (1 + np.exp(-zs))
        return (q * np.log(q / p) + (1 - q) * np.log((1 - q) / (1 - p))).sum(-1)
    pt = np.exp(zt) / np.exp(zt).sum(-1, keepdims=True)
    ps = np.exp(zs) / np.exp(zs).sum(-1, keepdims=True)
    return (pt * np.log(pt / ps)).sum(-1)


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
@pytest.mark.parametrize("weights", [[0.2, 0.1, 0.0, 0.3, 0.0, 0.1],  # sum 0.7 < 1: divided by 1, not 0.7
                                     [0.5, 1.0, 2.0, 0.0, 0.0, 1.5]])  # sum 5: a weighted mean
def test_classification_kd_weights_follow_the_docstring(kind, weights):
    s, t, T = Z(1, 6, 4), Z(1, 6, 4), 3.0
    w = torch.tensor([weights], dtype=torch.float64)
    per = _np_anchor_kl(s.numpy(), t.numpy(), T, kind)
    want = T * T * (per * w.numpy()).sum() / max(1.0, float(w.sum()))
    got = detection.classification_kd(s, t, T=T, kind=kind, mask=w)
    assert float(got) == pytest.approx(want, rel=1e-10)
    assert float(detection.classification_kd(s, t, T=T, kind=kind)) == pytest.approx(T * T * per.mean(), rel=1e-10)


def test_classification_kd_bool_mask_is_the_mean_over_masked_anchors():
    s, t = Z(2, 5, 3), Z(2, 5, 3)
    mask = torch.tensor([[True, False, False, True, False], [False, False, True, False, False]])
    per = _np_anchor_kl(s.numpy(), t.numpy(), 2.0, "sigmoid")
    want = 4.0 * per[mask.numpy()].mean()
    assert float(detection.classification_kd(s, t, T=2.0, mask=mask)) == pytest.approx(want, rel=1e-10)

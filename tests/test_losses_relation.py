"""Relation losses (RKD distance/angle, similarity-preserving, batch-similarity
KL) against loop-by-loop float64 oracles written from the papers."""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcourse.losses.relation import (batch_similarity_kl, normalized_distances, pairwise_distances, rkd_angle,
                                      rkd_distance, similarity_entropy, similarity_preserving, triplet_angles)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def huber(x):
    x = abs(x)
    return 0.5 * x * x if x < 1 else x - 0.5


# ---- oracles: explicit loops over pairs / triplets (Park et al. 2019) ----------
def np_rkd_distance(s, t):
    def psi(e):
        b = len(e)
        d = np.array([[np.linalg.norm(e[i] - e[j]) for j in range(b)] for i in range(b)])
        mu = np.mean([d[i, j] for i in range(b) for j in range(b) if i != j])
        return d / mu
    ds, dt = psi(s), psi(t)
    b = len(s)
    return sum(huber(ds[i, j] - dt[i, j]) for i in range(b) for j in range(b)) / b ** 2


def np_rkd_angle(s, t):
    def cos(e, i, j, k):
        if i == j or k == j:
            return 0.0
        a, c = e[i] - e[j], e[k] - e[j]
        return float(a @ c / (np.linalg.norm(a) * np.linalg.norm(c)))
    b = len(s)
    return sum(huber(cos(s, i, j, k) - cos(t, i, j, k)) for i, j, k in itertools.product(range(b), repeat=3)) / b ** 3


def np_sp(s, t):  # Tung & Mori 2019, eq. (2)-(4)
    def g(q):
        q = q.reshape(len(q), -1)
        G = q @ q.T
        return G / np.linalg.norm(G, axis=1, keepdims=True)
    b = len(s)
    return ((g(t) - g(s)) ** 2).sum() / b ** 2


def test_rkd_distance_matches_loop_oracle():
    s, t = rand(6, 4, seed=1), rand(6, 9, seed=2) * 5
    assert float(rkd_distance(s, t)) == pytest.approx(np_rkd_distance(s.numpy(), t.numpy()), rel=1e-10)


def test_rkd_distance_normalises_by_mean_not_max():
    # SEED_NOTES: the reference chapter divides by the max distance
    s, t = rand(6, 4, seed=3), rand(6, 4, seed=4)
    t[0] *= 50  # an outlier
    by_max = F.smooth_l1_loss(pairwise_distances(s) / pairwise_distances(s).max(),
                              pairwise_distances(t) / pairwise_distances(t).max())
    assert float(rkd_distance(s, t)) != pytest.approx(float(by_max), rel=1e-3)
    d = normalized_distances(t)
    off = ~torch.eye(6, dtype=torch.bool)
    assert float(d[off].mean()) == pytest.approx(1.0, rel=1e-12)


def test_rkd_angle_matches_triplet_loop_oracle():
    s, t = rand(5, 3, seed=5), rand(5, 7, seed=6) + 3
    assert float(rkd_angle(s, t)) == pytest.approx(np_rkd_angle(s.numpy(), t.numpy()), rel=1e-9)


def test_triplet_angles_equal_normalised_difference_products():
    e = rand(7, 4, seed=7) + 10  # offset: the Gram form centres first
    u = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), dim=2)
    assert torch.allclose(triplet_angles(e), torch.bmm(u, u.transpose(1, 2)), atol=1e-10)


def test_rkd_invariances():
    s, t = rand(6, 4, seed=8), rand(6, 5, seed=9)
    q, _ = torch.linalg.qr(rand(4, 4, seed=10))
    moved = 7.0 * s @ q + 3.0  # scale, rotation, translation
    assert float(rkd_distance(moved, t)) == pytest.approx(float(rkd_distance(s, t)), rel=1e-9)
    assert float(rkd_angle(moved, t)) == pytest.approx(float(rkd_angle(s, t)), rel=1e-8)
    assert float(rkd_distance(t, t)) == 0.0 and float(rkd_angle(t, t)) == pytest.approx(0.0, abs=1e-15)


def test_equal_samples_give_finite_gradients():
    # SEED_NOTES: normalising a zero difference vector explodes the angle gradient
    s = rand(6, 4, seed=11)
    s[4] = s[1]
    s.requires_grad_(True)
    t = rand(6, 5, seed=12)
    (rkd_distance(s, t) + rkd_angle(s, t)).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().max() < 10
    # the naive version (F.normalize, eps=1e-12 floor) has a gradient of order 1/eps
    s2 = s.detach().clone().requires_grad_(True)
    u = F.normalize(s2.unsqueeze(0) - s2.unsqueeze(1), dim=2)
    ut = F.normalize(t.unsqueeze(0) - t.unsqueeze(1), dim=2)
    F.smooth_l1_loss(torch.bmm(u, u.transpose(1, 2)), torch.bmm(ut, ut.transpose(1, 2))).backward()
    assert not torch.isfinite(s2.grad).all() or s2.grad.abs().max() > 1e6


def test_all_equal_student_does_not_divide_by_zero():
    s = torch.ones(4, 3, dtype=torch.float64, requires_grad=True)
    loss = rkd_distance(s, rand(4, 3, seed=13)) + rkd_angle(s, rand(4, 3, seed=13))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_rkd_gradcheck():
    s = rand(5, 3, seed=14).requires_grad_(True)
    t = rand(5, 4, seed=15)
    assert torch.autograd.gradcheck(lambda x: rkd_distance(x, t), (s,))
    assert torch.autograd.gradcheck(lambda x: rkd_angle(x, t), (s,))


def test_similarity_preserving_matches_oracle_and_flattens_maps():
    s, t = rand(4, 3, 2, 2, seed=16), rand(4, 5, 4, 4, seed=17)
    assert float(similarity_preserving(s, t)) == pytest.approx(np_sp(s.numpy(), t.numpy()), rel=1e-10)


def test_similarity_preserving_is_not_the_cosine_variant():
    # SEED_NOTES: the reference chapter compares cosine-similarity matrices
    s, t = rand(5, 6, seed=18), rand(5, 8, seed=19) + 1
    cos = lambda x: F.cosine_similarity(x.unsqueeze(1), x.unsqueeze(0), dim=2)  # noqa: E731
    assert float(similarity_preserving(s, t)) != pytest.approx(float(F.mse_loss(cos(s), cos(t))), rel=1e-2)


def test_similarity_preserving_gradcheck():
    s = rand(4, 3, seed=20).requires_grad_(True)
    t = rand(4, 6, seed=21)
    assert torch.autograd.gradcheck(lambda x: similarity_preserving(x, t), (s,))


def test_batch_similarity_kl_matches_oracle():
    zs, zt = rand(5, 4, seed=22), rand(5, 4, seed=23)

    def np_kl(zs, zt, tau):
        def logp(z):
            S = z @ z.T / tau
            S = S - S.max(1, keepdims=True)
            return S - np.log(np.exp(S).sum(1, keepdims=True))
        ls, lt = logp(zs), logp(zt)
        return (np.exp(lt) * (lt - ls)).sum(1).mean()
    assert float(batch_similarity_kl(zs, zt, 0.5)) == pytest.approx(np_kl(zs.numpy(), zt.numpy(), 0.5), rel=1e-10)
    zn = lambda z: z / np.linalg.norm(z, axis=1, keepdims=True)  # noqa: E731
    assert float(batch_similarity_kl(zs, zt, 0.5, normalize=True)) == pytest.approx(
        np_kl(zn(zs.numpy()), zn(zt.numpy()), 0.5), rel=1e-10)
    assert float(batch_similarity_kl(zt, zt)) == pytest.approx(0.0, abs=1e-12)


def test_similarity_entropy_shows_diagonal_dominance_of_large_logits():
    z = rand(16, 10, seed=24) * 5
    assert float(similarity_entropy(z, 0.5)) < 0.05  # nearly one-hot on the diagonal
    assert float(similarity_entropy(z, 0.5, normalize=True)) > 1.0
    assert float(similarity_entropy(torch.zeros(8, 3))) == pytest.approx(math.log(8))


def test_relation_errors_name_the_fix():
    with pytest.raises(ValueError, match="same B samples"):
        rkd_distance(rand(4, 3), rand(5, 3))
    with pytest.raises(ValueError, match="at least 2"):
        similarity_preserving(rand(1, 3), rand(1, 3))
    with pytest.raises(ValueError, match="at least 3"):
        rkd_angle(rand(2, 3), rand(2, 3))
    with pytest.raises(ValueError, match="tau"):
        batch_similarity_kl(rand(4, 3), rand(4, 3), tau=0)
    with pytest.raises(ValueError, match="floating-point"):
        rkd_distance(torch.ones(4, 3, dtype=torch.long), rand(4, 3))


@settings(max_examples=25, deadline=None)
@given(b=st.integers(3, 7), d=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_relation_losses_non_negative_and_finite(b, d, seed):
    s, t = rand(b, d, seed=seed), rand(b, d + 2, seed=seed + 1)
    for value in (rkd_distance(s, t), rkd_angle(s, t), similarity_preserving(s, t), batch_similarity_kl(s, t)):
        assert torch.isfinite(value) and value >= -1e-12


def test_golden_values():
    s, t = rand(6, 4, seed=200), rand(6, 7, seed=201)
    got = [float(f(s, t)) for f in (rkd_distance, rkd_angle, similarity_preserving, batch_similarity_kl)]
    assert got == pytest.approx(GOLDEN, rel=1e-9)


GOLDEN = [0.020512618570959158, 0.03785073516983962, 0.06675729080049621, 0.06321106574997089]

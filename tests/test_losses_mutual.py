"""Mutual-learning and ensemble losses against a NumPy float64 oracle written
from the DML paper (Zhang et al. 2018), gradcheck, golden values and
properties."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcourse.losses.mutual import (average_logits, average_probs_as_logits, mutual_learning_loss,
                                    mutual_learning_losses, peer_kl)


# ---- independent oracle (NumPy, float64) ---------------------------------
def np_softmax(z, T):
    z = np.asarray(z, dtype=np.float64) / T
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def np_dml_losses(zs, y, T, alpha):
    K, out = len(zs), []
    for k in range(K):
        p_k = np_softmax(zs[k], T)
        ce = -np.log(np_softmax(zs[k], 1.0)[np.arange(len(y)), y]).mean()
        kls = [(np_softmax(zs[l], T) * (np.log(np_softmax(zs[l], T)) - np.log(p_k))).sum(-1).mean()
               for l in range(K) if l != k]
        out.append((1 - alpha) * ce + alpha * T * T * np.mean(kls))
    return np.array(out)


Z1 = [[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]]
Z2 = [[1.0, 1.0, 0.0], [-1.0, 2.0, 0.5]]
Z3 = [[0.0, -2.0, 1.0], [1.5, 0.0, 0.0]]
Y = [0, 2]


def _t(z):
    return torch.tensor(z, dtype=torch.float64)


def test_golden_values():
    y = torch.tensor(Y)
    assert float(mutual_learning_loss([_t(Z1), _t(Z2)], y, T=1.0, alpha=0.5)) == pytest.approx(1.4907664676174857, rel=1e-12)
    assert float(mutual_learning_loss([_t(Z1), _t(Z2), _t(Z3)], y, T=2.0, alpha=0.7)) == pytest.approx(3.6877563383724716, rel=1e-12)


@pytest.mark.parametrize("K,T,alpha", [(2, 1.0, 0.5), (3, 2.0, 0.7), (4, 4.0, 0.2), (2, 0.5, 1.0), (3, 1.0, 0.0)])
def test_matches_float64_oracle(K, T, alpha):
    g = torch.Generator().manual_seed(K * 100 + int(T * 10))
    zs = [torch.randn(7, 6, generator=g, dtype=torch.float64) * (1 + k) for k in range(K)]
    y = torch.randint(0, 6, (7,), generator=g)
    got = mutual_learning_losses(zs, y, T=T, alpha=alpha).numpy()
    np.testing.assert_allclose(got, np_dml_losses([z.numpy() for z in zs], y.numpy(), T, alpha), rtol=1e-10)
    assert float(mutual_learning_loss(zs, y, T=T, alpha=alpha)) == pytest.approx(got.sum(), rel=1e-12)
    # a stacked (K, N, C) tensor is accepted too
    assert torch.allclose(mutual_learning_losses(torch.stack(zs), y, T=T, alpha=alpha), torch.from_numpy(got))


def test_two_peers_equal_half_the_papers_loss():
    # DML eq. 1-2: L_1 = CE_1 + KL(p2 || p1), L_2 = CE_2 + KL(p1 || p2), T = 1.
    z1, z2, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 4, (5,))
    kl = lambda p, q: F.kl_div(F.log_softmax(q, -1), F.softmax(p, -1), reduction="batchmean")  # KL(p || q)  # noqa: E731
    paper = F.cross_entropy(z1, y) + kl(z2, z1) + F.cross_entropy(z2, y) + kl(z1, z2)
    assert float(mutual_learning_loss([z1, z2], y, T=1.0, alpha=0.5)) == pytest.approx(0.5 * float(paper), rel=1e-12)


def test_alpha_zero_is_independent_cross_entropy():
    zs = [torch.randn(6, 5) for _ in range(3)]
    y = torch.randint(0, 5, (6,))
    want = sum(F.cross_entropy(z, y) for z in zs)
    assert torch.allclose(mutual_learning_loss(zs, y, alpha=0.0), want)


def test_gradient_of_each_peer_is_its_own_loss_only():
    g = torch.Generator().manual_seed(0)
    zs = [torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    y = torch.randint(0, 5, (4,), generator=g)
    total = mutual_learning_loss(zs, y, T=2.0, alpha=0.6)
    grads_total = torch.autograd.grad(total, zs)
    per = mutual_learning_losses(zs, y, T=2.0, alpha=0.6)
    for k in range(3):
        own = torch.autograd.grad(per[k], zs, retain_graph=True, allow_unused=True)
        assert torch.allclose(own[k], grads_total[k], atol=1e-12)
        # L_k sends no gradient to the other peers' logits
        assert all(o is None or torch.count_nonzero(o) == 0 for j, o in enumerate(own) if j != k)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_gradcheck_each_peer_with_the_others_fixed(k):
    g = torch.Generator().manual_seed(1)
    zs = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    y = torch.randint(0, 4, (3,), generator=g)

    def L_k(z):
        peers = list(zs)
        peers[k] = z
        return mutual_learning_losses(peers, y, T=3.0, alpha=0.7)[k]

    assert torch.autograd.gradcheck(L_k, (zs[k].clone().requires_grad_(True),))


def test_the_total_is_not_differentiable_as_a_plain_function_of_all_peers():
    # The detach is deliberate: autograd's gradient of the total is NOT the
    # numerical gradient of its value (which would move the targets too).
    zs = tuple(torch.randn(3, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    y = torch.tensor([0, 1, 2])
    with pytest.raises(RuntimeError, match="Jacobian mismatch"):
        torch.autograd.gradcheck(lambda a, b: mutual_learning_loss([a, b], y, T=1.0, alpha=0.5), zs)


def test_peer_kl_matches_pytorch_and_detaches_the_peer():
    z, q = torch.randn(5, 3, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    T = 2.0
    want = F.kl_div(F.log_softmax(z / T, -1), F.softmax(q / T, -1), reduction="batchmean") * T * T
    got = peer_kl(z, q, T)
    assert torch.allclose(got, want, atol=1e-6)
    got.backward()
    assert q.grad is None and z.grad is not None


def test_average_logits_and_probs():
    g = torch.Generator().manual_seed(2)
    zs = [torch.randn(6, 5, generator=g, dtype=torch.float64) * 3 for _ in range(3)]
    assert torch.allclose(average_logits(zs), (zs[0] + zs[1] + zs[2]) / 3)
    for T in (1.0, 4.0):
        out = average_probs_as_logits(zs, T=T)
        mean_p = torch.stack([torch.softmax(z / T, -1) for z in zs]).mean(0)
        assert torch.allclose(torch.softmax(out / T, -1), mean_p, atol=1e-12)
    # the two averages are different distributions in general
    assert not torch.allclose(torch.softmax(average_logits(zs), -1), torch.softmax(average_probs_as_logits(zs), -1), atol=1e-3)
    # one member: both give back that member's distribution
    assert torch.allclose(torch.softmax(average_probs_as_logits(zs[:1], T=2.0) / 2.0, -1), torch.softmax(zs[0] / 2.0, -1))


def test_average_probs_is_stable_for_huge_logits():
    zs = [torch.tensor([[1e4, 0.0, -1e4]]), torch.tensor([[-1e4, 1e4, 0.0]])]
    out = average_probs_as_logits(zs, T=1.0)
    assert torch.isfinite(torch.softmax(out, -1)).all()
    assert torch.allclose(torch.softmax(out, -1), torch.tensor([[0.5, 0.5, 0.0]]), atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(K=st.integers(2, 4), n=st.integers(1, 6), c=st.integers(2, 7), T=st.floats(0.5, 10.0),
       alpha=st.floats(0.0, 1.0), seed=st.integers(0, 10_000))
def test_properties(K, n, c, T, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    zs = [torch.randn(n, c, generator=g, dtype=torch.float64) * 4 for _ in range(K)]
    y = torch.randint(0, c, (n,), generator=g)
    per = mutual_learning_losses(zs, y, T=T, alpha=alpha)
    ce = torch.stack([F.cross_entropy(z, y) for z in zs])
    assert torch.all(per >= (1 - alpha) * ce - 1e-12)  # KL >= 0
    same = mutual_learning_losses([zs[0]] * K, y, T=T, alpha=alpha)  # identical peers: no KL
    assert torch.allclose(same, (1 - alpha) * F.cross_entropy(zs[0], y).expand(K))


@pytest.mark.parametrize("call,match", [
    (lambda: mutual_learning_loss([torch.randn(2, 3)], torch.tensor([0, 1])), "at least 2"),
    (lambda: mutual_learning_loss([torch.randn(2, 3), torch.randn(2, 4)], torch.tensor([0, 1])), r"peer_logits\[1\]"),
    (lambda: mutual_learning_loss(torch.randn(2, 3), torch.tensor([0, 1])), r"\(K, N, C\)"),
    (lambda: mutual_learning_loss("logits", torch.tensor([0, 1])), "list"),
    (lambda: mutual_learning_loss([torch.randn(2, 3)] * 2, torch.tensor([0.0, 1.0])), "int64"),
    (lambda: mutual_learning_loss([torch.randn(2, 3)] * 2, torch.tensor([0, 1, 2])), r"shape \(2,\)"),
    (lambda: mutual_learning_loss([torch.randn(2, 3)] * 2, torch.tensor([0, 1]), T=0.0), "T"),
    (lambda: mutual_learning_loss([torch.randn(2, 3)] * 2, torch.tensor([0, 1]), alpha=1.5), "alpha"),
    (lambda: mutual_learning_loss([torch.randn(2, 3, 4)] * 2, torch.tensor([0, 1])), r"\(N, C\)"),
    (lambda: average_logits([]), "at least 1"),
    (lambda: average_probs_as_logits([torch.randn(2, 3)], T=-1.0), "T"),
    (lambda: peer_kl(torch.randn(2, 3), torch.randn(3, 3)), "same shape"),
])
def test_bad_inputs_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_float32_and_large_K_are_finite():
    zs = [torch.randn(8, 10) * 20 for _ in range(6)]
    y = torch.randint(0, 10, (8,))
    out = mutual_learning_loss(zs, y, T=math.pi, alpha=0.5)
    assert out.dtype == torch.float32 and torch.isfinite(out)

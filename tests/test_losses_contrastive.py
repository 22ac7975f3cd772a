"""In-batch InfoNCE and the simplified CRD (memory banks by sample index)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcourse.losses import contrastive
from kdcourse.losses.contrastive import CRDInfoNCE, Embed, info_nce, sample_negatives


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def np_log_softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def test_info_nce_matches_oracle():
    s, t, tau = rand(6, 5, seed=1), rand(6, 5, seed=2), 0.2
    u = s.numpy() / np.linalg.norm(s.numpy(), axis=1, keepdims=True)
    v = t.numpy() / np.linalg.norm(t.numpy(), axis=1, keepdims=True)
    want = -np.diag(np_log_softmax(u @ v.T / tau)).mean()
    assert float(info_nce(s, t, tau)) == pytest.approx(want, rel=1e-12)


def test_info_nce_limits():
    same = torch.ones(8, 4, dtype=torch.float64)
    assert float(info_nce(same, same)) == pytest.approx(math.log(8))  # nothing tells the samples apart
    eye = torch.eye(8, dtype=torch.float64)
    assert float(info_nce(eye, eye, temperature=0.01)) < 1e-10  # each picks out its own teacher embedding


def test_info_nce_gradcheck_and_teacher_constant():
    s = rand(4, 3, seed=3).requires_grad_(True)
    t = rand(4, 3, seed=4).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: info_nce(x, t.detach(), 0.5), (s,))
    info_nce(s, t).backward()
    assert t.grad is None


def test_info_nce_errors():
    with pytest.raises(ValueError, match="Embed"):
        info_nce(rand(4, 3), rand(4, 5))
    with pytest.raises(ValueError, match="pool"):
        info_nce(rand(4, 3, 2, 2), rand(4, 3, 2, 2))
    with pytest.raises(ValueError, match="temperature"):
        info_nce(rand(4, 3), rand(4, 3), temperature=0)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 50), b=st.integers(1, 8), k=st.integers(1, 20), seed=st.integers(0, 10_000))
def test_negatives_never_hit_the_own_index(n, b, k, seed):
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, n, (b,), generator=g)
    neg = sample_negatives(index, n, k, generator=g)
    assert neg.shape == (b, k)
    assert (neg != index.view(-1, 1)).all() and neg.min() >= 0 and neg.max() < n


def test_negatives_cover_every_other_index():
    neg = sample_negatives(torch.tensor([3]), 6, 3000, generator=torch.Generator().manual_seed(0))
    assert set(neg.flatten().tolist()) == {0, 1, 2, 4, 5}


def _crd(seed=0, **kw):
    torch.manual_seed(seed)
    return CRDInfoNCE(3, 5, n_data=10, dim=4, k=4, temperature=0.5, momentum=0.5, **kw).double()


def test_crd_loss_matches_manual_computation(monkeypatch):
    crd = _crd()
    s, t, index = rand(3, 3, seed=5), rand(3, 5, seed=6), torch.tensor([7, 0, 4])
    neg = torch.tensor([[1, 2, 3, 9], [5, 6, 8, 9], [0, 1, 2, 3]])
    monkeypatch.setattr(contrastive, "sample_negatives", lambda *a, **k: neg)
    bank_t, bank_s = crd.bank_t.clone(), crd.bank_s.clone()
    crd.eval()  # no bank update
    got = crd(s, t, index)

    def ce(anchor, bank):
        idx = torch.cat([index.view(-1, 1), neg], 1)
        logits = torch.einsum("bkd,bd->bk", bank[idx], anchor).numpy() / 0.5
        return -np_log_softmax(logits)[:, 0].mean()
    u = F.normalize(crd.embed_s.linear(s), dim=1).detach()
    v = F.normalize(crd.embed_t.linear(t), dim=1).detach()
    assert float(got.detach()) == pytest.approx(ce(u, bank_t) + ce(v, bank_s), rel=1e-10)
    assert torch.equal(crd.bank_t, bank_t) and torch.equal(crd.bank_s, bank_s)


def test_crd_updates_banks_at_the_batch_indices_only():
    crd = _crd()
    s, t, index = rand(3, 3, seed=7), rand(3, 5, seed=8), torch.tensor([2, 5, 9])
    before = crd.bank_t.clone()
    crd.train()
    crd(s, t, index)
    v = crd.embed_t(t).detach()
    want = F.normalize(0.5 * before[index] + 0.5 * v, dim=1)
    assert torch.allclose(crd.bank_t[index], want, atol=1e-12)
    untouched = torch.ones(10, dtype=torch.bool)
    untouched[index] = False
    assert torch.equal(crd.bank_t[untouched], before[untouched])
    assert torch.allclose(crd.bank_t.norm(dim=1), torch.ones(10, dtype=torch.float64))


def test_crd_gradients_reach_both_heads_not_the_banks():
    crd = _crd()
    loss = crd(rand(3, 3, seed=9), rand(3, 5, seed=10), torch.tensor([0, 1, 2]))
    loss.backward()
    assert crd.embed_s.linear.weight.grad is not None and crd.embed_t.linear.weight.grad is not None
    assert not crd.bank_t.requires_grad and [n for n, _ in crd.named_parameters()] == [
        "embed_s.linear.weight", "embed_s.linear.bias", "embed_t.linear.weight", "embed_t.linear.bias"]


def test_crd_fill_and_errors():
    crd = _crd()
    t_all = rand(10, 5, seed=11)
    crd.fill(t_all)
    assert torch.allclose(crd.bank_t, crd.embed_t(t_all).detach())
    with pytest.raises(ValueError, match="one row per training sample"):
        crd.fill(rand(9, 5))
    with pytest.raises(ValueError, match="batch.index"):
        crd(rand(3, 3), rand(3, 5), torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        crd(rand(3, 3), rand(3, 5), torch.tensor([0, 1, 10]))
    with pytest.raises(ValueError, match="n_data"):
        CRDInfoNCE(3, 5, n_data=1)
    assert _crd().k == 4 and CRDInfoNCE(3, 5, n_data=10, k=100).k == 9
    assert "simplified" in repr(_crd())


def test_embed_is_unit_norm():
    e = Embed(6, 3).double()
    assert torch.allclose(e(rand(4, 6)).norm(dim=1), torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="dim"):
        Embed(6, 0)


def test_golden_values():
    s, t = rand(5, 4, seed=300), rand(5, 4, seed=301)
    assert float(info_nce(s, t, 0.1)) == pytest.approx(GOLDEN_INFO_NCE, rel=1e-9)


GOLDEN_INFO_NCE = 4.94975111256761

"""Transformer distillation losses against independent oracles (float64
re-derivations from the papers, PyTorch's own loss functions, gradcheck), on
tiny Hugging Face BERT models built from a config (nothing downloaded)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kdcourse.losses import transformer as tl  # noqa: E402


# --------------------------------------------------------------------------
# Tiny HF BERTs (random weights, built from a config)
# --------------------------------------------------------------------------

def _bert(layers, hidden, heads, seed):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=40, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=2 * hidden, max_position_embeddings=32, type_vocab_size=1,
                     attn_implementation="eager", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     initializer_range=0.3)  # sharper attention than the default 0.02
    return BertModel(cfg).eval()


@pytest.fixture(scope="module")
def berts():
    return _bert(6, 32, 2, 0), _bert(3, 16, 2, 1)


def _ids(lengths, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 40, (len(lengths), width), generator=g)
    for i, n in enumerate(lengths):
        ids[i, n:] = 0
    return ids


def _run(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=(ids != 0).long(), output_hidden_states=True,
                     output_attentions=True)


# --------------------------------------------------------------------------
# Layer map
# --------------------------------------------------------------------------

@pytest.mark.parametrize("n_s,n_t,expected", [
    (4, 12, [3, 6, 9, 12]),  # TinyBERT-4 from BERT-base
    (6, 12, [2, 4, 6, 8, 10, 12]),
    (2, 6, [3, 6]),
    (4, 8, [2, 4, 6, 8]),
    (3, 8, [2, 5, 8]),
    (4, 6, [1, 3, 4, 6]),
    (4, 4, [1, 2, 3, 4]),
    (1, 5, [5]),
])
def test_uniform_layer_map_for_several_depth_pairs(n_s, n_t, expected):
    assert tl.uniform_layer_map(n_s, n_t) == expected


@given(st.integers(1, 24), st.integers(0, 24))
@settings(max_examples=200, deadline=None)
def test_uniform_layer_map_properties(n_s, extra):
    n_t = n_s + extra
    m = tl.uniform_layer_map(n_s, n_t)
    assert len(m) == n_s and m[-1] == n_t and m[0] >= 1
    assert all(a < b for a, b in zip(m, m[1:]))  # strictly increasing: no teacher layer used twice
    if n_t % n_s == 0:
        assert m == [(i + 1) * (n_t // n_s) for i in range(n_s)]


@pytest.mark.parametrize("args,word", [((5, 4), "n_student"), ((0, 4), "n_student"), ((2, 0), "n_teacher"),
                                       ((True, 4), "n_student"), ((2.0, 4), "n_student")])
def test_uniform_layer_map_rejects_bad_depths(args, word):
    with pytest.raises(ValueError, match=word):
        tl.uniform_layer_map(*args)


def test_hf_hidden_states_start_with_embeddings(berts):
    """The convention the losses rely on: hidden_states[0] is the embedding
    output, hidden_states[k] the output of layer k; attentions[k-1] is layer k."""
    teacher, _ = berts
    ids = _ids([7, 4], 9)
    out = _run(teacher, ids)
    assert len(out.hidden_states) == 6 + 1 and len(out.attentions) == 6
    with torch.no_grad():
        emb = teacher.embeddings(input_ids=ids)
    assert torch.allclose(out.hidden_states[0], emb, atol=1e-6)
    assert torch.allclose(out.hidden_states[-1], out.last_hidden_state)
    # attentions are probabilities: rows sum to 1, padded keys get exactly 0
    a = out.attentions[0]
    assert torch.allclose(a.sum(-1), torch.ones_like(a.sum(-1)), atol=1e-5)
    assert (a[1, :, :, 4:] == 0).all()


# --------------------------------------------------------------------------
# Hidden states and embeddings
# --------------------------------------------------------------------------

def _oracle_masked_mse(s, t, mask):
    s, t = s.double(), t.double()
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if mask[b, i]:
                total += float(((s[b, i] - t[b, i]) ** 2).sum())
                count += 1
    return total / (count * s.shape[-1])


def test_masked_mse_matches_oracle_and_pytorch():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    got = tl.masked_mse(s, t, mask)
    assert float(got) == pytest.approx(_oracle_masked_mse(s, t, mask), rel=1e-6)
    sel = mask.bool()
    assert float(got) == pytest.approx(float(F.mse_loss(s[sel], t[sel])), rel=1e-6)
    assert float(tl.masked_mse(s, t, None)) == pytest.approx(float(F.mse_loss(s, t)), rel=1e-6)


def test_hidden_state_loss_on_tiny_berts_matches_oracle(berts):
    teacher, student = berts
    ids = _ids([9, 6, 3], 9, seed=1)
    t_out, s_out = _run(teacher, ids), _run(student, ids)
    torch.manual_seed(0)
    proj = nn.Linear(16, 32)
    layer_map = tl.uniform_layer_map(3, 6)  # [2, 4, 6]
    got = tl.hidden_state_loss(s_out.hidden_states, t_out.hidden_states, layer_map, proj, ids != 0)
    with torch.no_grad():
        expected = sum(_oracle_masked_mse(proj(s_out.hidden_states[i]), t_out.hidden_states[2 * i], ids != 0)
                       for i in (1, 2, 3)) / 3
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # zip-mapping (the seed's mistake) pairs student layers with teacher layers 1, 2, 3: a different number
    zipped = tl.hidden_state_loss(s_out.hidden_states, t_out.hidden_states, [1, 2, 3], proj, ids != 0)
    assert zipped.item() != pytest.approx(got.item(), rel=1e-5)


def test_hidden_state_loss_ignores_padding(berts):
    """The same reviews padded to two widths give the same loss, and values
    at padded positions do not matter."""
    teacher, student = berts
    short, long_ = _ids([7, 5, 2], 7, seed=2), None
    long_ = torch.cat([short, torch.zeros(3, 6, dtype=torch.int64)], 1)
    torch.manual_seed(0)
    proj = nn.Linear(16, 32)
    vals = []
    for ids in (short, long_):
        t_out, s_out = _run(teacher, ids), _run(student, ids)
        vals.append(tl.hidden_state_loss(s_out.hidden_states, t_out.hidden_states, [2, 4, 6], proj, ids != 0).item())
    assert vals[0] == pytest.approx(vals[1], rel=1e-5)
    # garbage at padded positions changes nothing; ignoring the mask would
    s_out, t_out = _run(student, long_), _run(teacher, long_)
    noisy = tuple(h.clone() for h in s_out.hidden_states)
    for h in noisy:
        h[long_ == 0] = 100.0
    a = tl.hidden_state_loss(noisy, t_out.hidden_states, [2, 4, 6], proj, long_ != 0)
    assert a.item() == pytest.approx(vals[1], rel=1e-5)
    unmasked = tl.hidden_state_loss(noisy, t_out.hidden_states, [2, 4, 6], proj, None)
    assert unmasked.item() > 10 * vals[1]


def test_hidden_state_loss_gradcheck():
    g = torch.Generator().manual_seed(3)
    s_hs = [torch.randn(2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    t_hs = [torch.randn(2, 4, 5, generator=g, dtype=torch.float64) for _ in range(5)]
    proj = nn.Linear(3, 5).double()
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert torch.autograd.gradcheck(lambda *h: tl.hidden_state_loss(h, t_hs, [2, 4], proj, mask), tuple(s_hs))


def test_hidden_state_loss_needs_a_projection_when_widths_differ(berts):
    teacher, student = berts
    ids = _ids([5, 5], 5)
    t_out, s_out = _run(teacher, ids), _run(student, ids)
    with pytest.raises(ValueError, match="projection"):
        tl.hidden_state_loss(s_out.hidden_states, t_out.hidden_states, [2, 4, 6], None, ids != 0)
    with pytest.raises(ValueError, match="layer_map has 2 entries"):
        tl.hidden_state_loss(s_out.hidden_states, t_out.hidden_states, [3, 6], nn.Linear(16, 32), ids != 0)
    with pytest.raises(ValueError, match="embedding"):
        tl.hidden_state_loss(s_out.hidden_states, t_out.hidden_states, [0, 3, 6], nn.Linear(16, 32), ids != 0)
    with pytest.raises(ValueError, match="attention_mask"):
        tl.hidden_state_loss(s_out.hidden_states, t_out.hidden_states, [2, 4, 6], nn.Linear(16, 32), ids[:, :3] != 0)


def test_embedding_loss_uses_hidden_states_zero(berts):
    teacher, student = berts
    ids = _ids([6, 3], 6, seed=4)
    t_out, s_out = _run(teacher, ids), _run(student, ids)
    torch.manual_seed(1)
    proj = nn.Linear(16, 32)
    got = tl.embedding_loss(s_out.hidden_states[0], t_out.hidden_states[0], proj, ids != 0)
    with torch.no_grad():
        expected = _oracle_masked_mse(proj(s_out.hidden_states[0]), t_out.hidden_states[0], ids != 0)
    assert got.item() == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------
# Attention: KL(teacher || student) on probabilities, padding masked
# --------------------------------------------------------------------------

def _oracle_attention_kl(s, t, mask):
    s, t = s.double(), t.double()
    total, rows = 0.0, 0
    B, H, S, _ = s.shape
    for b in range(B):
        for h in range(H):
            for q in range(S):
                if not mask[b, q]:
                    continue
                rows += 1
                for k in range(S):
                    if mask[b, k] and t[b, h, q, k] > 0:
                        total += float(t[b, h, q, k] * (torch.log(t[b, h, q, k]) - torch.log(s[b, h, q, k])))
    return total / rows


def _probs(B, H, S, mask, seed, dtype=torch.float64):
    """HF-like attention: softmax over scores with padded keys masked (padded
    query rows still hold distributions over the real keys)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, H, S, S, generator=g, dtype=dtype) * 2
    scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    return scores.softmax(-1)


def test_attention_kl_matches_oracle_and_pytorch():
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    s, t = _probs(3, 2, 6, mask, 0), _probs(3, 2, 6, mask, 1)
    got = tl.attention_kl(s, t, mask)
    assert float(got) == pytest.approx(_oracle_attention_kl(s, t, mask), rel=1e-9)
    rows = mask.bool()[:, None, :].expand(3, 2, 6)  # real query rows, every head
    ref = F.kl_div(s[rows].log().clamp_min(-1e4), t[rows], reduction="sum") / rows.sum()
    assert float(got) == pytest.approx(float(ref), rel=1e-9)
    assert float(tl.attention_kl(t, t, mask)) == pytest.approx(0.0, abs=1e-12)


def test_attention_kl_padded_rows_and_keys_do_not_count():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    s, t = _probs(2, 2, 5, mask, 2), _probs(2, 2, 5, mask, 3)
    base = tl.attention_kl(s, t, mask)
    s2 = s.clone()
    s2[0, :, 3:, :] = torch.tensor([0.1, 0.2, 0.3, 0.2, 0.2], dtype=s.dtype)  # garbage padded query rows
    assert float(tl.attention_kl(s2, t, mask)) == pytest.approx(float(base), rel=1e-12)
    assert abs(float(tl.attention_kl(s, t, None)) - float(base)) > 1e-3  # the mask matters


def test_attention_kl_on_tiny_berts_is_padding_invariant_and_finite(berts):
    t_model = _bert(2, 16, 2, 5)
    _, s_model = berts
    short = _ids([8, 5, 2], 8, seed=6)
    long_ = torch.cat([short, torch.zeros(3, 5, dtype=torch.int64)], 1)
    vals = []
    for ids in (short, long_):
        s_att, t_att = _run(s_model, ids).attentions, _run(t_model, ids).attentions
        vals.append(float(tl.attention_loss(s_att[:2], t_att, [1, 2], ids != 0)))
        assert torch.isfinite(torch.tensor(vals[-1]))
    assert vals[0] > 1e-2  # the two models attend differently
    assert vals[0] == pytest.approx(vals[1], rel=1e-4)


def test_attention_kl_gradcheck_and_zero_probabilities():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    g = torch.Generator().manual_seed(7)
    scores = torch.randn(2, 2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = _probs(2, 2, 4, mask, 8)
    key_mask = ~mask.bool()[:, None, None, :]

    def f(sc):
        return tl.attention_kl(sc.masked_fill(key_mask, float("-inf")).softmax(-1), t, mask)

    assert torch.autograd.gradcheck(f, (scores,))
    # exact zeros at padded keys (as HF gives them) must not produce NaN
    out = f(scores)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(scores.grad).all()


def test_attention_loss_uses_attentions_k_minus_1():
    mask = torch.ones(2, 4)
    t_att = [_probs(2, 2, 4, mask, 10 + k) for k in range(4)]
    s_att = [_probs(2, 2, 4, mask, 20 + k) for k in range(2)]
    got = tl.attention_loss(s_att, t_att, [2, 4], mask)
    expected = (tl.attention_kl(s_att[0], t_att[1], mask) + tl.attention_kl(s_att[1], t_att[3], mask)) / 2
    assert float(got) == pytest.approx(float(expected), rel=1e-12)


def test_attention_kl_rejects_different_head_counts():
    mask = torch.ones(1, 3)
    with pytest.raises(ValueError, match="heads"):
        tl.attention_kl(_probs(1, 2, 3, mask, 0), _probs(1, 4, 3, mask, 1), mask)


# --------------------------------------------------------------------------
# Prediction layer and DistilBERT
# --------------------------------------------------------------------------

def test_prediction_loss_is_soft_cross_entropy():
    g = torch.Generator().manual_seed(9)
    s, t = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    for T in (1.0, 2.0):
        ref = F.cross_entropy(s / T, F.softmax(t / T, -1))  # PyTorch's CE with probability targets
        assert float(tl.prediction_loss(s, t, T)) == pytest.approx(float(ref), rel=1e-10)
    with pytest.raises(ValueError, match="T"):
        tl.prediction_loss(s, t, 0)


def _mlm_case(seed=11):
    g = torch.Generator().manual_seed(seed)
    B, S, V = 3, 6, 7
    s, t = torch.randn(B, S, V, generator=g, dtype=torch.float64), torch.randn(B, S, V, generator=g, dtype=torch.float64)
    labels = torch.full((B, S), -100)
    labels[0, 1], labels[0, 3], labels[1, 0], labels[2, 2] = 3, 5, 6, 1
    return s, t, labels


def test_token_soft_ce_normalises_by_selected_tokens():
    s, t, labels = _mlm_case()
    sel = labels != -100
    T = 2.0
    # DistilBERT's code: KLDivLoss(batchmean) over the selected rows, times T^2
    ref = F.kl_div(F.log_softmax(s[sel] / T, -1), F.softmax(t[sel] / T, -1), reduction="batchmean") * T * T
    got = tl.token_soft_ce(s, t, sel, T)
    assert float(got) == pytest.approx(float(ref), rel=1e-10)
    # the seed's version (batchmean over the whole (B, S, V) tensor) divides by B = 3, not by 4 tokens
    seed_version = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T * T
    assert abs(float(seed_version) - float(got)) > 0.1


def test_masked_lm_and_cosine_losses():
    s, t, labels = _mlm_case()
    assert float(tl.masked_lm_loss(s, labels)) == pytest.approx(
        float(F.cross_entropy(s[labels != -100], labels[labels != -100])), rel=1e-10)
    g = torch.Generator().manual_seed(12)
    hs, ht = torch.randn(2, 5, 4, generator=g, dtype=torch.float64), torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    sel = mask.bool()
    ref = nn.CosineEmbeddingLoss()(hs[sel], ht[sel], torch.ones(int(sel.sum()), dtype=torch.float64))
    assert float(tl.hidden_cosine_loss(hs, ht, mask)) == pytest.approx(float(ref), rel=1e-10)
    hs2 = hs.clone()
    hs2[0, 3:] = -ht[0, 3:]  # padded positions pointing the wrong way change nothing
    assert float(tl.hidden_cosine_loss(hs2, ht, mask)) == pytest.approx(float(ref), rel=1e-10)


def test_distilbert_loss_is_the_weighted_sum():
    s, t, labels = _mlm_case()
    g = torch.Generator().manual_seed(13)
    hs, ht = torch.randn(3, 6, 4, generator=g, dtype=torch.float64), torch.randn(3, 6, 4, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 6)
    total, parts = tl.distilbert_loss(s, t, labels, hs, ht, mask, T=2.0, return_parts=True)
    expected = 5 * tl.token_soft_ce(s, t, labels != -100, 2.0) + 2 * tl.masked_lm_loss(s, labels) + \
        1 * tl.hidden_cosine_loss(hs, ht, mask)
    assert float(total) == pytest.approx(float(expected), rel=1e-12)
    assert set(parts) == {"ce", "mlm", "cos"}


# --------------------------------------------------------------------------
# Golden values (float64, fixed seeds): a regression fence for refactoring
# --------------------------------------------------------------------------

GOLDEN = {
    "masked_mse": 2.500972775215807,
    "attention_kl": 1.30956493120061,
    "token_soft_ce": 1.0054706700053204,
}


def _golden_values():
    g = torch.Generator().manual_seed(2024)
    s, t = torch.randn(2, 4, 3, generator=g, dtype=torch.float64), torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    a_s, a_t = _probs(2, 2, 4, mask, 2025), _probs(2, 2, 4, mask, 2026)
    ls, lt, labels = _mlm_case(2027)
    return {
        "masked_mse": float(tl.masked_mse(s, t, mask)),
        "attention_kl": float(tl.attention_kl(a_s, a_t, mask)),
        "token_soft_ce": float(tl.token_soft_ce(ls, lt, labels != -100, 2.0)),
    }


def test_golden_values():
    got = _golden_values()
    for k, v in GOLDEN.items():
        assert got[k] == pytest.approx(v, rel=1e-9), k

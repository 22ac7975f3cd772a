"""Lab 3 checks accept the reference (and independent correct versions) and
reject each known-wrong variant with its hint."""
import pytest
import torch
import torch.nn.functional as F

from kdcourse.checks import CheckFailed
from kdcourse.checks import lab3
from kdcourse.losses import transformer as tl


def test_checks_accept_the_reference(capsys):
    assert lab3.check_layer_map(tl.uniform_layer_map)
    assert lab3.check_hidden_loss(tl.hidden_state_loss)
    assert lab3.check_attention_loss(tl.attention_kl)
    assert capsys.readouterr().out.count("✓") == 3


def test_checks_accept_independent_correct_versions():
    def my_map(n_s, n_t):
        out, i = [], 1
        while i <= n_s:
            out.append(int(i * n_t / n_s + 1e-9))
            i += 1
        return out

    def my_hidden(s_hs, t_hs, layer_map, projection, mask):
        sel = mask.bool()
        losses = [F.mse_loss(projection(s_hs[i])[sel], t_hs[t][sel]) for i, t in zip(range(1, len(s_hs)), layer_map)]
        return torch.stack(losses).mean()

    def my_attention(s, t, mask):
        rows = mask.bool()[:, None, :].expand(-1, s.shape[1], -1)  # (B, H, S) real query rows
        s_rows, t_rows = s[rows], t[rows]  # (N, S)
        return F.kl_div(s_rows.clamp_min(1e-12).log(), t_rows, reduction="batchmean")

    assert lab3.check_layer_map(my_map)
    assert lab3.check_hidden_loss(my_hidden)
    assert lab3.check_attention_loss(my_attention)


@pytest.mark.parametrize("name", sorted(lab3.LAYER_MAP_VARIANTS))
def test_layer_map_check_rejects_each_variant(name):
    fn, hint = lab3.LAYER_MAP_VARIANTS[name]
    with pytest.raises(CheckFailed) as err:
        lab3.check_layer_map(fn)
    assert hint in str(err.value)


@pytest.mark.parametrize("name", sorted(lab3.HIDDEN_LOSS_VARIANTS))
def test_hidden_loss_check_rejects_each_variant(name):
    fn, hint = lab3.HIDDEN_LOSS_VARIANTS[name]
    with pytest.raises(CheckFailed) as err:
        lab3.check_hidden_loss(fn)
    assert hint in str(err.value)


@pytest.mark.parametrize("name", sorted(lab3.ATTENTION_VARIANTS))
def test_attention_check_rejects_each_variant(name):
    fn, hint = lab3.ATTENTION_VARIANTS[name]
    with pytest.raises(CheckFailed) as err:
        lab3.check_attention_loss(fn)
    assert hint in str(err.value)


def test_hints_name_the_mistakes_in_words():
    with pytest.raises(CheckFailed, match="zip"):
        lab3.check_layer_map(lambda s, t: list(range(1, s + 1)))
    with pytest.raises(CheckFailed, match=r"hidden_states\[0\] is the embedding output"):
        lab3.check_hidden_loss(lab3.HIDDEN_LOSS_VARIANTS["teacher_off_by_one"][0])
    with pytest.raises(CheckFailed, match="padded"):
        lab3.check_attention_loss(lab3.ATTENTION_VARIANTS["mask_ignored"][0])


def test_missing_projection_is_named():
    def no_proj(s_hs, t_hs, layer_map, projection, mask):
        return sum(tl.masked_mse(s_hs[i], t_hs[t], mask) for i, t in enumerate(layer_map, 1)) / len(layer_map)

    with pytest.raises(CheckFailed, match="projection"):
        lab3.check_hidden_loss(no_proj)


def test_projection_must_receive_gradients():
    def detached(s_hs, t_hs, layer_map, projection, mask):
        with torch.no_grad():
            ref = tl.hidden_state_loss(s_hs, t_hs, layer_map, projection, mask)
        return ref + 0 * sum(h.sum() for h in s_hs)

    with pytest.raises(CheckFailed, match="gradient"):
        lab3.check_hidden_loss(detached)


def test_nan_gradient_at_padded_keys_is_named():
    def where_masked(s, t, mask):
        kl = torch.where(t > 0, t * (t.log() - s.log()), torch.zeros_like(t))  # finite value, NaN gradient
        rows = mask.to(s.dtype)[:, None, :, None]
        return (kl * rows).sum() / (s.shape[1] * mask.sum())

    with pytest.raises(CheckFailed, match="gradient is NaN"):
        lab3.check_attention_loss(where_masked)


def test_bad_return_types_and_stubs():
    with pytest.raises(CheckFailed, match="list of ints"):
        lab3.check_layer_map(lambda s, t: [float(x) for x in tl.uniform_layer_map(s, t)])

    def stub(*args):
        raise NotImplementedError()

    for check in (lab3.check_layer_map, lab3.check_hidden_loss, lab3.check_attention_loss):
        with pytest.raises(NotImplementedError):
            check(stub)
    with pytest.raises(CheckFailed, match="differs from the reference"):
        lab3.check_attention_loss(lambda s, t, m: tl.attention_kl(s, t, m) * 1.5)

"""Feature losses (FitNets hints, statistics, attention transfer) against a
NumPy float64 re-derivation from the papers, gradcheck and golden values."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcourse.losses.feature import (HintRegressor, attention_map, attention_transfer_loss, feature_stats_loss,
                                     hint_loss, match_spatial)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---- oracle: NumPy, written from the formulas --------------------------------
def np_block_mean(x, h, w):
    b, c, H, W = x.shape
    return x.reshape(b, c, h, H // h, w, W // w).mean(axis=(3, 5))


def np_conv1x1(x, weight, bias):
    return np.einsum("oc,bchw->bohw", weight[:, :, 0, 0], x) + bias[None, :, None, None]


def np_at_map(x, p=2.0):
    a = (np.abs(x) ** p).mean(axis=1).reshape(x.shape[0], -1)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_hint_loss_matches_oracle_with_regressor_and_pooling():
    s, t = rand(3, 4, 4, 4, seed=1), rand(3, 6, 8, 8, seed=2)
    reg = HintRegressor(4, 6).double()
    got = float(hint_loss(s, t, reg).detach())
    rs = np_conv1x1(s.numpy(), reg.proj.weight.detach().numpy(), reg.proj.bias.detach().numpy())
    want = ((rs - np_block_mean(t.numpy(), 4, 4)) ** 2).mean()
    assert got == pytest.approx(want, rel=1e-12)


def test_hint_loss_vectors_with_linear_regressor():
    s, t = rand(5, 3, seed=3), rand(5, 7, seed=4)
    reg = HintRegressor(3, 7, kind="linear").double()
    want = ((s.numpy() @ reg.proj.weight.detach().numpy().T + reg.proj.bias.detach().numpy() - t.numpy()) ** 2).mean()
    assert float(hint_loss(s, t, reg).detach()) == pytest.approx(want, rel=1e-12)


def test_hint_loss_student_larger_than_teacher_pools_the_student():
    s, t = rand(2, 3, 8, 8, seed=5), rand(2, 3, 4, 4, seed=6)
    want = ((np_block_mean(s.numpy(), 4, 4) - t.numpy()) ** 2).mean()
    assert float(hint_loss(s, t)) == pytest.approx(want, rel=1e-12)


def test_hint_loss_is_not_the_normalised_variant():
    # SEED_NOTES: the reference chapter L2-normalises both sides first; FitNets does not.
    s, t = rand(2, 4, 4, 4, seed=7) * 3, rand(2, 4, 4, 4, seed=8)
    normalised = F.mse_loss(F.normalize(s, dim=1), F.normalize(t, dim=1))
    assert float(hint_loss(s, t)) != pytest.approx(float(normalised), rel=1e-3)


def test_regressor_commutes_with_average_pooling():
    # why the order "regress, then pool" does not matter for a 1x1 conv
    s = rand(2, 4, 8, 8, seed=9)
    reg = HintRegressor(4, 5).double()
    a = F.adaptive_avg_pool2d(reg(s), (4, 4))
    b = reg(F.adaptive_avg_pool2d(s, (4, 4)))
    assert torch.allclose(a, b, atol=1e-12)


def test_hint_loss_gradcheck_student_and_regressor():
    s = rand(2, 3, 4, 4, seed=10).requires_grad_(True)
    t = rand(2, 5, 8, 8, seed=11)
    reg = HintRegressor(3, 5).double()
    assert torch.autograd.gradcheck(lambda s_, w: hint_loss(s_, t, lambda x: F.conv2d(x, w, reg.proj.bias)),
                                    (s, reg.proj.weight.detach().clone().requires_grad_(True)))


def test_hint_loss_does_not_train_the_teacher():
    s, t = rand(2, 3, 4, 4, seed=12).requires_grad_(True), rand(2, 3, 4, 4, seed=13).requires_grad_(True)
    hint_loss(s, t).backward()
    assert t.grad is None and s.grad is not None


def test_hint_loss_errors_name_the_fix():
    with pytest.raises(ValueError, match="HintRegressor"):
        hint_loss(rand(2, 3, 4, 4), rand(2, 5, 4, 4))
    with pytest.raises(ValueError, match="batch size"):
        hint_loss(rand(2, 3, 4, 4), rand(3, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        hint_loss(rand(2, 3, 4), rand(2, 3, 4))
    with pytest.raises(ValueError, match="floating-point"):
        hint_loss(torch.ones(2, 3, dtype=torch.long), rand(2, 3))
    with pytest.raises(ValueError, match="expects"):
        HintRegressor(3, 5)(rand(2, 4, 4, 4))
    with pytest.raises(ValueError, match="kind"):
        HintRegressor(3, 5, kind="mlp")
    with pytest.raises(ValueError, match="student_channels"):
        HintRegressor(0, 5)


def test_match_spatial_pools_the_larger():
    s, t = rand(1, 2, 4, 4), rand(1, 3, 8, 8)
    s2, t2 = match_spatial(s, t)
    assert s2 is s and t2.shape == (1, 3, 4, 4)
    assert torch.allclose(t2, torch.from_numpy(np_block_mean(t.numpy(), 4, 4)))
    s3, t3 = match_spatial(t, s)
    assert s3.shape == (1, 3, 4, 4) and t3 is s


def test_feature_stats_loss_matches_oracle():
    s, t = rand(3, 4, 4, 4, seed=14), rand(3, 6, 8, 8, seed=15)
    reg = HintRegressor(4, 6).double()
    rs = np_conv1x1(s.numpy(), reg.proj.weight.detach().numpy(), reg.proj.bias.detach().numpy())
    want = ((rs.mean(axis=(2, 3)) - t.numpy().mean(axis=(2, 3))) ** 2).mean()
    assert float(feature_stats_loss(s, t, reg).detach()) == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="HintRegressor"):
        # the handout's exercise 2: ResNet-18 vs ResNet-50 stages differ in channels (128 vs 512 at layer2)
        feature_stats_loss(rand(1, 128, 4, 4), rand(1, 512, 4, 4))


@pytest.mark.parametrize("p", [1.0, 2.0, 4.0])
def test_attention_map_matches_oracle(p):
    x = rand(3, 5, 4, 6, seed=16)
    assert np.allclose(attention_map(x, p).numpy(), np_at_map(x.numpy(), p), atol=1e-14)
    assert torch.allclose(attention_map(x, p).norm(dim=1), torch.ones(3, dtype=torch.float64))


def test_attention_map_mean_equals_sum_but_not_channel_l2_norm():
    x = rand(2, 7, 4, 4, seed=17)
    by_sum = F.normalize(x.pow(2).sum(1).flatten(1), dim=1)
    assert torch.allclose(attention_map(x), by_sum, atol=1e-14)
    # SEED_NOTES: the handout takes the L2 norm over channels — a different map
    handout = F.normalize(x.norm(p=2, dim=1).flatten(1), dim=1)
    assert (attention_map(x) - handout).abs().max() > 1e-3


def test_attention_transfer_loss_matches_oracle_with_pooling():
    s, t = rand(2, 3, 4, 4, seed=18), rand(2, 9, 8, 8, seed=19)
    want = ((np_at_map(s.numpy()) - np_at_map(np_block_mean(t.numpy(), 4, 4))) ** 2).mean()
    assert float(attention_transfer_loss(s, t)) == pytest.approx(want, rel=1e-12)


def test_attention_transfer_loss_is_scale_invariant_and_zero_on_itself():
    s, t = rand(2, 3, 4, 4, seed=20), rand(2, 9, 4, 4, seed=21)
    assert float(attention_transfer_loss(s * 100, t * 0.01)) == pytest.approx(float(attention_transfer_loss(s, t)), rel=1e-10)
    assert float(attention_transfer_loss(s, s)) == 0.0


def test_attention_transfer_gradcheck():
    s = rand(2, 3, 4, 4, seed=22).requires_grad_(True)
    t = rand(2, 4, 8, 8, seed=23)
    assert torch.autograd.gradcheck(lambda x: attention_transfer_loss(x, t), (s,))


def test_attention_map_rejects_bad_p():
    with pytest.raises(ValueError, match="p must be"):
        attention_map(rand(1, 2, 3, 3), p=0)


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 4), c=st.integers(1, 6), h=st.sampled_from([2, 4]), k=st.sampled_from([1, 2]), seed=st.integers(0, 10_000))
def test_feature_losses_are_non_negative_and_finite(b, c, h, k, seed):
    s, t = rand(b, c, h, h, seed=seed), rand(b, c + 1, h * k, h * k, seed=seed + 1)
    reg = HintRegressor(c, c + 1).double()
    for value in (hint_loss(s, t, reg), feature_stats_loss(s, t, reg), attention_transfer_loss(s, t)):
        assert torch.isfinite(value) and value >= 0


# ---- golden values (float64, fixed seeds), recorded from this implementation and
# ---- cross-checked by the oracle tests above
def test_golden_values():
    reg = HintRegressor(4, 6).double()
    with torch.no_grad():  # fixed weights: independent of the initialiser
        reg.proj.weight.copy_(rand(6, 4, 1, 1, seed=102))
        reg.proj.bias.copy_(rand(6, seed=103))
    s, t = rand(2, 4, 4, 4, seed=100), rand(2, 6, 8, 8, seed=101)
    with torch.no_grad():
        got = [float(hint_loss(s, t, reg)), float(feature_stats_loss(s, t, reg)), float(attention_transfer_loss(s, t))]
    assert got == pytest.approx(GOLDEN, rel=1e-9)


GOLDEN = [7.571725629772466, 2.955667559852424, 0.04134573922194205]

"""Detection KD pieces: classification with temperature, masked box
regression, importance-weighted multi-scale features with real adapters."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdcourse.losses.detection import (FeatureAdapters, classification_kd, importance_map, masked_box_regression,
                                       multiscale_feature_loss)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def np_sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_sigmoid_classification_kd_matches_binary_kl_oracle():
    zs, zt, T = rand(2, 5, 3, seed=1) * 3, rand(2, 5, 3, seed=2) * 3, 2.0
    p, q = np_sigmoid(zs.numpy() / T), np_sigmoid(zt.numpy() / T)
    kl = (q * np.log(q / p) + (1 - q) * np.log((1 - q) / (1 - p))).sum(-1).mean()
    assert float(classification_kd(zs, zt, T)) == pytest.approx(T * T * kl, rel=1e-10)


def test_binary_kl_is_the_seeds_bce_minus_teacher_entropy():
    zs, zt, T = rand(2, 4, 3, seed=3), rand(2, 4, 3, seed=4), 2.0
    q = torch.sigmoid(zt / T)
    bce = F.binary_cross_entropy(torch.sigmoid(zs / T), q, reduction="none").sum(-1).mean()
    ent = F.binary_cross_entropy(q, q, reduction="none").sum(-1).mean()
    assert float(classification_kd(zs, zt, T)) == pytest.approx(float((bce - ent) * T * T), rel=1e-9)
    assert float(classification_kd(zt, zt, T)) == pytest.approx(0.0, abs=1e-12)


def test_classification_kd_is_stable_for_huge_logits():
    zs = torch.tensor([[[500.0, -500.0]]], requires_grad=True)
    zt = torch.tensor([[[-500.0, 500.0]]])
    loss = classification_kd(zs, zt, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zs.grad).all()


def test_softmax_classification_kd_and_mask():
    zs, zt, T = rand(2, 4, 6, seed=5), rand(2, 4, 6, seed=6), 3.0
    per = F.kl_div(F.log_softmax(zs / T, -1), F.softmax(zt / T, -1), reduction="none").sum(-1)
    assert float(classification_kd(zs, zt, T, kind="softmax")) == pytest.approx(float(per.mean() * T * T), rel=1e-10)
    mask = torch.tensor([[1, 0, 0, 1], [0, 0, 1, 0]])
    want = per[mask.bool()].mean() * T * T
    assert float(classification_kd(zs, zt, T, kind="softmax", mask=mask)) == pytest.approx(float(want), rel=1e-10)
    with pytest.raises(ValueError, match="kind"):
        classification_kd(zs, zt, kind="logits")
    with pytest.raises(ValueError, match="T"):
        classification_kd(zs, zt, T=0)
    with pytest.raises(ValueError, match="mask"):
        classification_kd(zs, zt, mask=torch.ones(2, 5))


def test_masked_box_regression_averages_over_masked_anchors():
    s, t = rand(2, 6, 4, seed=7), rand(2, 6, 4, seed=8)
    mask = torch.zeros(2, 6)
    mask[0, 1] = mask[1, 4] = 1
    d = (s - t).abs().numpy()
    huber = np.where(d < 1, 0.5 * d * d, d - 0.5).sum(-1)
    want = (huber[0, 1] + huber[1, 4]) / 2
    assert float(masked_box_regression(s, t, mask)) == pytest.approx(want, rel=1e-10)
    # more background anchors do not dilute the loss (the reference chapter's .mean() over all anchors does)
    s2 = torch.cat([s, rand(2, 30, 4, seed=9)], 1)
    t2 = torch.cat([t, rand(2, 30, 4, seed=10)], 1)
    m2 = torch.cat([mask, torch.zeros(2, 30)], 1)
    assert float(masked_box_regression(s2, t2, m2)) == pytest.approx(want, rel=1e-10)


def test_masked_box_regression_empty_mask_and_errors():
    s = rand(1, 3, 4, seed=11).requires_grad_(True)
    loss = masked_box_regression(s, rand(1, 3, 4, seed=12), torch.zeros(1, 3))
    loss.backward()
    assert float(loss.detach()) == 0.0 and s.grad is not None
    with pytest.raises(ValueError, match=r"\(B, A, 4\)"):
        masked_box_regression(rand(1, 3, 5), rand(1, 3, 5), torch.ones(1, 3))
    with pytest.raises(ValueError, match="mask"):
        masked_box_regression(rand(1, 3, 4), rand(1, 3, 4), torch.ones(3))


def test_multiscale_feature_loss_with_real_adapters_matches_oracle():
    torch.manual_seed(0)
    student = {"p3": rand(2, 4, 8, 8, seed=13), "p4": rand(2, 8, 4, 4, seed=14)}
    teacher = {"p3": rand(2, 16, 8, 8, seed=15), "p4": rand(2, 8, 4, 4, seed=16)}
    adapters = FeatureAdapters({"p3": 4, "p4": 8}, {"p3": 16, "p4": 8}).double()
    assert isinstance(adapters["p3"], nn.Conv2d) and isinstance(adapters["p4"], nn.Identity)
    got = multiscale_feature_loss(student, teacher, adapters)

    def level(s, t):
        imp = np.abs(t).mean(1, keepdims=True)
        imp = imp / imp.max(axis=(2, 3), keepdims=True)
        return ((imp * s - imp * t) ** 2).mean()
    conv = adapters["p3"]
    s3 = np.einsum("oc,bchw->bohw", conv.weight.detach().numpy()[:, :, 0, 0], student["p3"].numpy()) \
        + conv.bias.detach().numpy()[None, :, None, None]
    want = (level(s3, teacher["p3"].numpy()) + level(student["p4"].numpy(), teacher["p4"].numpy())) / 2
    assert float(got.detach()) == pytest.approx(want, rel=1e-10)
    got.backward()
    assert conv.weight.grad is not None  # the adaptation layer is trained


def test_multiscale_feature_loss_needs_adapters_when_channels_differ():
    with pytest.raises(ValueError, match="FeatureAdapters"):
        multiscale_feature_loss({"p3": rand(1, 4, 4, 4)}, {"p3": rand(1, 8, 4, 4)})
    with pytest.raises(ValueError, match="levels"):
        multiscale_feature_loss({"p3": rand(1, 4, 4, 4)}, {"p4": rand(1, 4, 4, 4)})
    with pytest.raises(ValueError, match="unmatched"):
        FeatureAdapters({"p3": 4}, {"p4": 8})


def test_multiscale_feature_loss_pools_to_the_smaller_size():
    s = {"p3": rand(1, 4, 8, 8, seed=17)}
    t = {"p3": rand(1, 4, 4, 4, seed=18)}
    pooled = {"p3": F.adaptive_avg_pool2d(s["p3"], 4)}
    assert float(multiscale_feature_loss(s, t)) == pytest.approx(float(multiscale_feature_loss(pooled, t)), rel=1e-12)


def test_importance_map_is_in_unit_range_per_image():
    imp = importance_map(rand(3, 5, 4, 4, seed=19))
    assert imp.shape == (3, 1, 4, 4)
    assert torch.allclose(imp.amax(dim=(2, 3)).flatten(), torch.ones(3, dtype=torch.float64)) and imp.min() >= 0

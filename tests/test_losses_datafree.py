"""DeepInversion losses against a NumPy float64 re-derivation (a network whose
every layer is computed by hand, so no hook is involved), gradcheck, and the
refusals."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from kdcourse.losses.datafree import (batch_norm_layers, bn_statistics_loss, channel_statistics, image_prior,
                                      synthesis_loss, total_variation)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class Net(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN -> mean-pool -> BN1d -> linear."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(5)
        self.bn3 = nn.BatchNorm1d(5)
        self.fc = nn.Linear(5, 3)
        self.double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5 + (1.0 if p.ndim == 1 else 0.0))
            for bn in (self.bn1, self.bn2, self.bn3):
                bn.running_mean.copy_(torch.randn(bn.num_features, generator=g, dtype=torch.float64) * 0.3)
                bn.running_var.copy_(torch.rand(bn.num_features, generator=g, dtype=torch.float64) + 0.5)
        self.eval()

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return self.fc(self.bn3(h.mean((2, 3))))


def np_conv(x, w):  # 3x3, padding 1, stride 1
    b, c, hh, ww = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((b, w.shape[0], hh, ww))
    for i in range(3):
        for j in range(3):
            out += np.einsum("oc,bchw->bohw", w[:, :, i, j], xp[:, :, i:i + hh, j:j + ww])
    return out


def np_bn_eval(x, bn):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    rm, rv = bn.running_mean.numpy().reshape(shape), bn.running_var.numpy().reshape(shape)
    w, b = bn.weight.detach().numpy().reshape(shape), bn.bias.detach().numpy().reshape(shape)
    return (x - rm) / np.sqrt(rv + bn.eps) * w + b


def np_stats_term(x, bn):
    axes = (0,) + tuple(range(2, x.ndim))
    n = np.prod([x.shape[a] for a in axes])
    mean = x.sum(axis=axes) / n
    var = ((x - mean.reshape((1, -1) + (1,) * (x.ndim - 2))) ** 2).sum(axis=axes) / n  # biased
    return np.sqrt(((mean - bn.running_mean.numpy()) ** 2).sum()) + np.sqrt(((var - bn.running_var.numpy()) ** 2).sum())


def oracle(net, x):
    x = x.detach().numpy()
    a1 = np_conv(x, net.conv1.weight.detach().numpy())
    h = np.maximum(np_bn_eval(a1, net.bn1), 0)
    a2 = np_conv(h, net.conv2.weight.detach().numpy())
    a3 = np_bn_eval(a2, net.bn2).mean(axis=(2, 3))
    logits = np_bn_eval(a3, net.bn3) @ net.fc.weight.detach().numpy().T + net.fc.bias.detach().numpy()
    loss = np_stats_term(a1, net.bn1) + np_stats_term(a2, net.bn2) + np_stats_term(a3, net.bn3)
    return loss, logits


def test_bn_statistics_loss_matches_a_hand_computed_network():
    net = Net()
    x = rand(3, 3, 6, 5, seed=1)
    loss, logits = bn_statistics_loss(net, x)
    want_loss, want_logits = oracle(net, x)
    assert float(loss.detach()) == pytest.approx(want_loss, rel=1e-10)
    np.testing.assert_allclose(logits.detach().numpy(), want_logits, rtol=1e-10, atol=1e-12)
    assert len(batch_norm_layers(net)) == 3


def test_bn_statistics_loss_gradcheck_and_no_trace_left():
    net = Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = rand(2, 3, 4, 4, seed=2).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda im: bn_statistics_loss(net, im)[0], (x,))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()), "buffers or weights changed"
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in net.modules()), "a hook was left behind"


def test_bn_statistics_loss_is_zero_at_matching_statistics():
    bn = nn.BatchNorm2d(2).double().eval()
    x = rand(4, 2, 3, 3, seed=3)
    mean, var = channel_statistics(x)
    with torch.no_grad():
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
    assert float(bn_statistics_loss(nn.Sequential(bn).eval(), x)[0]) == pytest.approx(0.0, abs=1e-12)
    # unbiased statistics would not be zero: N / (N - 1) differs from 1 for N = 36
    assert torch.allclose(var * 36 / 35, x.transpose(0, 1).reshape(2, -1).var(1, unbiased=True))


def test_bn_statistics_loss_refuses_train_mode_and_removes_hooks_on_error():
    net = Net().train()
    with pytest.raises(ValueError, match="train mode"):
        bn_statistics_loss(net, rand(2, 3, 4, 4))
    net.eval()
    with pytest.raises(RuntimeError):
        bn_statistics_loss(net, rand(2, 5, 4, 4))  # wrong channel count: the conv fails
    assert all(not m._forward_pre_hooks for m in net.modules())
    with pytest.raises(ValueError, match="batch-norm"):
        bn_statistics_loss(nn.Sequential(nn.Conv2d(3, 2, 1)).double().eval(), rand(1, 3, 2, 2))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        bn_statistics_loss(net, rand(3, 4))
    # require_eval=False computes it anyway (and then BN moves its buffers, as train mode does)
    net.train()
    before = net.bn1.running_mean.clone()
    bn_statistics_loss(net, rand(2, 3, 4, 4), require_eval=False)
    assert not torch.equal(before, net.bn1.running_mean)


def np_tv(x):
    x = x.numpy()
    dx = [(x[b, c, i, j + 1] - x[b, c, i, j]) ** 2 for b in range(x.shape[0]) for c in range(x.shape[1])
          for i in range(x.shape[2]) for j in range(x.shape[3] - 1)]
    dy = [(x[b, c, i + 1, j] - x[b, c, i, j]) ** 2 for b in range(x.shape[0]) for c in range(x.shape[1])
          for i in range(x.shape[2] - 1) for j in range(x.shape[3])]
    return sum(dx) / len(dx) + sum(dy) / len(dy)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 1, 2, 9), (3, 2, 6, 6)])
def test_total_variation_and_prior_match_loops(shape):
    x = rand(*shape, seed=sum(shape))
    assert float(total_variation(x)) == pytest.approx(np_tv(x), rel=1e-12)
    want = 0.7 * np_tv(x) + 0.03 * float((x.numpy() ** 2).mean())
    assert float(image_prior(x, 0.7, 0.03)) == pytest.approx(want, rel=1e-12)
    xg = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda im: image_prior(im, 0.7, 0.03), (xg,))


def test_total_variation_of_a_constant_image_is_zero_and_inputs_are_checked():
    assert float(total_variation(torch.full((2, 3, 4, 4), 0.3, dtype=torch.float64))) == 0.0
    with pytest.raises(ValueError, match="tv_weight"):
        image_prior(rand(1, 3, 4, 4), -1.0, 0.0)
    with pytest.raises(ValueError, match="floating-point"):
        total_variation(torch.zeros(1, 3, 4, 4, dtype=torch.long))


def test_synthesis_loss_adds_the_three_terms():
    net = Net()
    x = rand(4, 3, 4, 4, seed=9)
    y = torch.tensor([0, 1, 2, 0])
    bn, logits = bn_statistics_loss(net, x)
    want = torch.nn.functional.cross_entropy(logits, y) + 0.2 * bn + image_prior(x, 0.5, 0.1)
    got = synthesis_loss(net, x, y, bn_weight=0.2, tv_weight=0.5, l2_weight=0.1)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-12)
    with pytest.raises(ValueError, match="targets"):
        synthesis_loss(net, x, y[:2], bn_weight=0.2, tv_weight=0.5, l2_weight=0.1)

"""Runtime memory: activation sizes against a hand count, peak RSS of a child process."""
import os

import pytest
import torch
import torch.nn as nn

from kdcourse import deploy
from kdcourse.deploy import memory


def test_activation_bytes_match_a_hand_count():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 5 * 5, 4))
    a = memory.activation_bytes(net, torch.randn(2, 3, 5, 5))
    conv = relu = flat = 2 * 8 * 5 * 5 * 4  # float32 bytes
    assert a.total_mb == pytest.approx((conv + relu + flat + 2 * 4 * 4) / 1e6)
    assert a.largest_mb == pytest.approx(conv / 1e6) and a.largest_layer == "0"
    assert a.layers == 4
    assert not any(m._forward_hooks for m in net.modules())  # hooks removed


def test_peak_rss_grows_with_the_model(tmp_path):
    x = torch.randn(1, 16)
    small = deploy.export_onnx(nn.Linear(16, 4).eval(), x, os.path.join(tmp_path, "small.onnx"))
    big = deploy.export_onnx(nn.Sequential(nn.Linear(16, 4096), nn.Linear(4096, 4096)).eval(), x,
                             os.path.join(tmp_path, "big.onnx"))  # 67 MB of weights
    r_small, r_big = memory.peak_rss_mb(small, (1, 16), runs=2), memory.peak_rss_mb(big, (1, 16), runs=2)
    assert r_big.model_mb > 60 > r_small.model_mb
    assert r_small.baseline_mb > 0 and r_small.process_mb >= r_small.baseline_mb


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="no file"):
        memory.peak_rss_mb(os.path.join(tmp_path, "missing.onnx"), (1, 3))
    with pytest.raises(ValueError, match="nn.Module"):
        memory.activation_bytes(lambda x: x, torch.zeros(1))

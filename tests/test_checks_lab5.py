"""Lab 5 checks accept the reference and reject each known mistake with its hint."""
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from kdcourse import data, deploy, models
from kdcourse.checks import CheckFailed
from kdcourse.checks import lab5


# --------------------------------------------------------------------------
# float layers
# --------------------------------------------------------------------------

def _ref_float_layers(model):
    return {"Conv2d": sum(isinstance(m, nn.Conv2d) for m in model.modules()),
            "Linear": sum(isinstance(m, nn.Linear) for m in model.modules())}


def test_float_layers_accepts_reference_and_package(capsys):
    assert lab5.check_float_layers(_ref_float_layers)
    assert lab5.check_float_layers(deploy.float_layers)
    assert "✓" in capsys.readouterr().out


@pytest.mark.parametrize("fn, hint", [
    (lambda m: {k: sum(type(x).__name__ == k for x in m.modules()) for k in ("Conv2d", "Linear")}, "isinstance"),
    (lambda m: {"Conv2d": sum(isinstance(x, nn.Conv2d) for x in m.children()),
                "Linear": sum(isinstance(x, nn.Linear) for x in m.children())}, "model.modules()"),
    (lambda m: {"conv": 1}, "keys"),
    (lambda m: {"Conv2d": 0, "Linear": 0}, "expected"),
    (lambda m: 1 / 0, "ZeroDivisionError"),
])
def test_float_layers_rejects_mistakes(fn, hint):
    with pytest.raises(CheckFailed, match=hint):
        lab5.check_float_layers(fn)


def test_float_layers_passes_not_implemented_through():
    def stub(model):
        raise NotImplementedError()

    with pytest.raises(NotImplementedError):
        lab5.check_float_layers(stub)


# --------------------------------------------------------------------------
# latency
# --------------------------------------------------------------------------

def _timed(model, x, runs, warmup, *, grad=False, seconds=False, include_warmup=False, stat="median", q99=99,
           swap=False):
    ctx = torch.enable_grad() if grad else torch.inference_mode()
    times = []
    with ctx:
        for i in range(warmup + runs):
            t0 = time.perf_counter()
            model(x)
            dt = time.perf_counter() - t0
            if i >= warmup or include_warmup:
                times.append(dt if seconds else 1e3 * dt)
    p50 = float(np.mean(times)) if stat == "mean" else float(np.percentile(times, 50))
    p99 = float(np.percentile(times, q99))
    return (p99, p50) if swap else (p50, p99)


def ref_latency(model, x, runs=100, warmup=10):
    return _timed(model, x, runs, warmup)


def test_latency_accepts_reference_and_package(capsys):
    assert lab5.check_latency_fn(ref_latency)

    def via_package(model, x, runs=100, warmup=10):
        lat = deploy.measure_latency(model, x, runs=runs, warmup=warmup)
        return lat.p50_ms, lat.p99_ms

    assert lab5.check_latency_fn(via_package)
    assert "✓" in capsys.readouterr().out


@pytest.mark.parametrize("fn, hint", [
    (lambda m, x, runs=100, warmup=10: _timed(m, x, runs, 0), "warm-up calls are"),
    (lambda m, x, runs=100, warmup=10: _timed(m, x, runs, warmup + 2), "expected warmup"),
    (lambda m, x, runs=100, warmup=10: _timed(m, x, runs, warmup, grad=True), "inference_mode"),
    (lambda m, x, runs=100, warmup=10: _timed(m, x, runs, warmup, seconds=True), "seconds"),
    (lambda m, x, runs=100, warmup=10: _timed(m, x, runs, warmup, swap=True), "swapped"),
    (lambda m, x, runs=100, warmup=10: _timed(m, x, runs, warmup, include_warmup=True), "warm-up calls were timed"),
    (lambda m, x, runs=100, warmup=10: _timed(m, x, runs, warmup, stat="mean"), "mean"),
    (lambda m, x, runs=100, warmup=10: _timed(m, x, runs, warmup, q99=50), "99th percentile"),
    (lambda m, x, runs=100, warmup=10: 3.0, "pair"),
])
def test_latency_rejects_mistakes(fn, hint):
    with pytest.raises(CheckFailed, match=hint):
        lab5.check_latency_fn(fn)


# --------------------------------------------------------------------------
# calibration data
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ds():
    return data.shapes(200, 64, 64, seed=0)


def ref_calibration(d, n, batch_size=32):
    return deploy.calibration_batches(d.train, n=n, batch_size=batch_size)


def test_calibration_accepts_reference(ds, capsys):
    assert lab5.check_calibration_set(ref_calibration, ds, n=40)
    assert "✓" in capsys.readouterr().out


def _raw_pixels(d, n):
    x = deploy.calibration_batches(d.train, n=n)
    mean = torch.tensor(d.train.mean).view(1, 3, 1, 1)
    std = torch.tensor(d.train.std).view(1, 3, 1, 1)
    return [(b * std + mean) * 255 for b in x]


def _one_class(d, n):
    idx = (d.train.labels == 0).nonzero().flatten()
    return [d.train.images[idx][:n]] if len(idx) >= n else [d.train.images[idx[torch.arange(n) % len(idx)]]]


@pytest.mark.parametrize("fn, hint", [
    (lambda d, n: deploy.calibration_batches(d.test, n=n), "test images"),
    (lambda d, n: deploy.calibration_batches(d.val, n=n), "validation"),
    (lambda d, n: [torch.randn(n, 3, 32, 32)], "not from data.train"),
    (_raw_pixels, "raw pixels"),
    (lambda d, n: deploy.calibration_batches(d.train, n=n // 2), "asked for n="),
    (lambda d, n: [b.to(torch.uint8) for b in deploy.calibration_batches(d.train, n=n)], "float"),
    (lambda d, n: [b[0] for b in deploy.calibration_batches(d.train, n=n)], r"\(B, 3, 32, 32\)"),
    (_one_class, "classes"),
    (lambda d, n: None, "list of tensors"),
])
def test_calibration_rejects_mistakes(ds, fn, hint):
    with pytest.raises(CheckFailed, match=hint):
        lab5.check_calibration_set(fn, ds, n=40)


# --------------------------------------------------------------------------
# static INT8
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def float_model(tmp_path_factory, ds):
    torch.manual_seed(0)
    model = models.build({"arch": "resnet", "depth": 8, "width": 8}, 10).eval()
    tmp = tmp_path_factory.mktemp("int8")
    path = deploy.export_onnx(model, ds.train.images[:1], str(tmp / "f.onnx"))
    return tmp, path, deploy.calibration_batches(ds.train, n=64)


def test_static_int8_accepts_reference(float_model, capsys):
    tmp, f, calib = float_model
    q = deploy.quantize_static_onnx(f, str(tmp / "ok.onnx"), calib)
    assert lab5.check_static_int8(q, f, calib)
    assert "✓" in capsys.readouterr().out


@pytest.mark.parametrize("variant, hint", [
    ("s8", "QUInt8"),
    ("per_tensor", "per_channel=True"),
    ("dynamic", "dynamic"),
    ("qoperator", "QDQ"),
    ("float", "not quantized"),
    ("same_path", "new file"),
    ("missing", "no quantized ONNX file"),
    ("other_model", "agrees with the float one on only"),
])
def test_static_int8_rejects_mistakes(float_model, ds, variant, hint):
    tmp, f, calib = float_model
    out = str(tmp / f"{variant}.onnx")
    if variant == "s8":
        q = deploy.quantize_static_onnx(f, out, calib, activation_type="QInt8")
    elif variant == "per_tensor":
        q = deploy.quantize_static_onnx(f, out, calib, per_channel=False)
    elif variant == "dynamic":
        q = deploy.quantize_dynamic_onnx(f, out)
    elif variant == "qoperator":
        q = deploy.quantize_static_onnx(f, out, calib, quant_format="QOperator")
    elif variant == "float":
        q = deploy.export_onnx(models.build({"arch": "resnet", "depth": 8, "width": 8}, 10), ds.train.images[:1], out)
    elif variant == "same_path":
        q = f
    elif variant == "missing":
        q = str(tmp / "nothing.onnx")
    else:  # a correctly quantized file of a *different* network
        torch.manual_seed(123)
        other = models.build({"arch": "resnet", "depth": 8, "width": 8}, 10).eval()
        of = deploy.export_onnx(other, ds.train.images[:1], str(tmp / "other-f.onnx"))
        q = deploy.quantize_static_onnx(of, out, calib)
    with pytest.raises(CheckFailed, match=hint):
        lab5.check_static_int8(q, f, calib)

"""Deployment helpers: latency statistics, size, INT8 that really is INT8,
artefacts that reload. No test asserts a speed."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from kdcourse import data, deploy, models


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return models.build({"arch": "cnn", "widths": (8, 16, 32)}, 10).eval()


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(1)
    return models.build({"arch": "resnet", "depth": 8, "width": 8}, 10).eval()


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory, cnn, resnet):
    """fp32 and static INT8 ONNX files of two small conv nets (random init)."""
    tmp = tmp_path_factory.mktemp("onnx")
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(16, 3, 32, 32, generator=g) for _ in range(4)]
    out = {}
    for name, model in (("cnn", cnn), ("resnet", resnet)):
        f = deploy.export_onnx(model, torch.randn(1, 3, 32, 32), str(tmp / f"{name}.onnx"))
        out[name] = {
            "fp32": f,
            "int8": deploy.quantize_static_onnx(f, str(tmp / f"{name}-int8.onnx"), calib),
            "s8act": deploy.quantize_static_onnx(f, str(tmp / f"{name}-s8.onnx"), calib, activation_type="QInt8"),
            "per_tensor": deploy.quantize_static_onnx(f, str(tmp / f"{name}-pt.onnx"), calib, per_channel=False),
        }
    return out


def _inputs(n=64, seed=3):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------
# latency statistics
# --------------------------------------------------------------------------

def test_percentiles_match_numpy_and_are_ordered():
    samples = [5.0, 1.0, 2.0, 100.0, 3.0, 4.0]
    p50, p99 = deploy.percentiles(samples)
    assert p50 == pytest.approx(np.percentile(samples, 50)) == pytest.approx(3.5)
    assert p99 == pytest.approx(np.percentile(samples, 99))
    assert min(samples) <= p50 <= p99 <= max(samples)
    with pytest.raises(ValueError, match="samples_ms"):
        deploy.percentiles([])


def test_measure_latency_is_sane_and_restores_threads(cnn):
    torch.set_num_threads(1)
    lat = deploy.measure_latency(cnn, torch.randn(3, 3, 32, 32), runs=15, warmup=2, threads=2, repeats=2)
    assert torch.get_num_threads() == 1, "the thread count must be restored"
    assert 0 < lat.min_ms <= lat.p50_ms <= lat.p99_ms
    assert lat.batch_size == 3 and lat.threads == 2 and lat.runs == 15 and lat.warmup == 2 and lat.repeats == 2
    assert len(lat.samples_ms) == 30 and len(lat.repeat_p50s) == 2
    assert "batch 3" in str(lat) and "2 threads" in str(lat)


def test_measure_latency_counts_warmup_and_runs_without_grad():
    calls = []

    def model(x):
        calls.append(torch.is_grad_enabled())
        return x

    deploy.measure_latency(model, torch.zeros(1), runs=7, warmup=3)
    assert len(calls) == 10 and not any(calls)


def test_measure_latency_percentiles_see_the_slow_calls():
    import time

    n = [0]

    def model(x):  # every 4th call sleeps 20 ms, the others 0
        n[0] += 1
        if n[0] % 4 == 0:
            time.sleep(0.02)
        return x

    lat = deploy.measure_latency(model, torch.zeros(1), runs=40, warmup=0)
    assert lat.p50_ms < 10 <= 19 < lat.p99_ms


@pytest.mark.parametrize("kwargs, word", [({"runs": 0}, "runs"), ({"warmup": -1}, "warmup"),
                                          ({"repeats": 0}, "repeats"), ({"threads": 0}, "threads")])
def test_measure_latency_rejects_bad_arguments(cnn, kwargs, word):
    with pytest.raises(ValueError, match=word):
        deploy.measure_latency(cnn, torch.randn(1, 3, 32, 32), **kwargs)


def test_compare_latency_interleaves_and_keeps_names(cnn, resnet):
    x = torch.randn(1, 3, 32, 32)
    out = deploy.compare_latency({"a": (cnn, x), "b": (resnet, x)}, runs=5, warmup=1, repeats=3)
    assert list(out) == ["a", "b"]
    for lat in out.values():
        assert lat.repeats == 3 and len(lat.repeat_p50s) == 3 and lat.p50_ms <= lat.p99_ms


def test_onnx_model_threads_are_fixed_per_session(onnx_files):
    m = deploy.OnnxModel(onnx_files["cnn"]["fp32"], threads=1)
    assert deploy.measure_latency(m, torch.randn(1, 3, 32, 32), runs=3, warmup=1).threads == 1
    with pytest.raises(ValueError, match="OnnxModel"):
        deploy.measure_latency(m, torch.randn(1, 3, 32, 32), runs=3, threads=2)


# --------------------------------------------------------------------------
# size and counting
# --------------------------------------------------------------------------

def test_size_and_params(cnn, onnx_files, tmp_path):
    n = deploy.count_params(cnn)
    assert n == models.count_params(cnn)
    # a float32 state dict holds at least 4 bytes per parameter
    assert deploy.size_mb(cnn) >= 4 * n / 1e6
    assert deploy.size_mb(onnx_files["cnn"]["fp32"]) >= 4 * n / 1e6
    ep = torch.export.export(cnn, (torch.randn(1, 3, 32, 32),))
    assert deploy.size_mb(ep) > 4 * n / 1e6
    with pytest.raises(ValueError, match="no file"):
        deploy.size_mb(str(tmp_path / "missing.onnx"))
    with pytest.raises(ValueError, match="size_mb"):
        deploy.size_mb(3)


def test_int8_file_is_smaller_for_a_model_with_real_weights(tmp_path):
    torch.manual_seed(0)
    big = models.build({"arch": "resnet", "depth": 8, "width": 32}, 10).eval()
    f = deploy.export_onnx(big, torch.randn(1, 3, 32, 32), str(tmp_path / "big.onnx"))
    q = deploy.quantize_static_onnx(f, str(tmp_path / "big-int8.onnx"), [torch.randn(8, 3, 32, 32)])
    assert deploy.size_mb(q) < 0.4 * deploy.size_mb(f)


def test_count_macs_matches_hand_count():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert deploy.count_macs(conv, torch.randn(2, 3, 10, 10)) == 8 * 10 * 10 * 3 * 9
    dw = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
    assert deploy.count_macs(dw, torch.randn(1, 4, 6, 6)) == 4 * 6 * 6 * 1 * 9
    mlp = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2))
    assert deploy.count_macs(mlp, torch.randn(3, 5)) == 5 * 7 + 7 * 2
    assert deploy.count_macs(nn.Linear(4, 6), torch.randn(2, 9, 4)) == 9 * 4 * 6  # per sample, all positions
    assert not conv._forward_hooks, "hooks must be removed"
    import torchvision

    # He et al. (2016), Table 1: ResNet-18 at 224x224 is 1.8 x 10^9 FLOPs (multiply-adds)
    assert deploy.count_macs(torchvision.models.resnet18(weights=None), torch.randn(1, 3, 224, 224)) / 1e9 == \
        pytest.approx(1.8, abs=0.05)


def test_seed_recipe_leaves_every_convolution_in_float(cnn):
    before = deploy.module_types(cnn)
    q = deploy.seed_recipe_dynamic(cnn)
    after = deploy.module_types(q)
    assert before["Conv2d"] == after["Conv2d"] == 4
    assert before["Linear"] == 1 and after["Linear"] == 0
    assert after["DynamicQuantizedLinear"] == 1 and "LinearPackedParams" not in after
    assert deploy.float_layers(cnn) == {"Conv2d": 4, "Linear": 1}
    assert deploy.float_layers(q) == {"Conv2d": 4, "Linear": 0}
    assert isinstance(cnn.fc, nn.Linear), "the recipe must work on a copy"
    # containers are not counted
    assert "Sequential" not in before and "SmallCNN" not in before


# --------------------------------------------------------------------------
# static INT8: quantized convolutions, outputs close to float
# --------------------------------------------------------------------------

@pytest.mark.parametrize("name, n_convs", [("cnn", 4), ("resnet", 9)])
def test_static_int8_runs_every_convolution_in_int8(onnx_files, name, n_convs):
    f, q = onnx_files[name]["fp32"], onnx_files[name]["int8"]
    assert deploy.conv_precision(f) == {"int8": 0, "float": n_convs, "ops": deploy.conv_precision(f)["ops"]}
    cp = deploy.conv_precision(q)
    assert cp["int8"] == n_convs and cp["float"] == 0
    assert cp["ops"]["QLinearConv"] == n_convs
    assert deploy.qdq_wrapped(q) == {"wrapped": n_convs, "total": n_convs}
    assert deploy.qdq_wrapped(f) == {"wrapped": 0, "total": n_convs}
    assert deploy.weight_scales_per_channel(q)
    assert not deploy.weight_scales_per_channel(onnx_files[name]["per_tensor"])


def test_signed_activations_leave_residual_convolutions_in_float(onnx_files):
    # ONNX Runtime (x86) fuses fewer QDQ convolutions into QLinearConv when
    # activations are int8 rather than uint8: here the ones feeding a residual add.
    cp = deploy.conv_precision(onnx_files["resnet"]["s8act"])
    assert cp["float"] > 0 and cp["int8"] + cp["float"] == 9


@pytest.mark.parametrize("name, model_fixture", [("cnn", "cnn"), ("resnet", "resnet")])
def test_int8_outputs_close_to_float(onnx_files, name, model_fixture, request):
    model = request.getfixturevalue(model_fixture)
    x = _inputs()
    with torch.no_grad():
        ref = model(x)
    got = deploy.OnnxModel(onnx_files[name]["int8"])(x)
    assert got.shape == ref.shape
    assert float((got - ref).norm() / ref.norm()) < 0.05
    assert deploy.agreement(got, ref) >= 0.9


def test_quantize_static_validates(onnx_files, tmp_path):
    f = onnx_files["cnn"]["fp32"]
    with pytest.raises(ValueError, match="calibration"):
        deploy.quantize_static_onnx(f, str(tmp_path / "q.onnx"), [])
    with pytest.raises(ValueError, match="QUInt8"):
        deploy.quantize_static_onnx(f, str(tmp_path / "q.onnx"), [torch.randn(2, 3, 32, 32)], activation_type="int4")
    with pytest.raises(ValueError, match="method"):
        deploy.quantize_static_onnx(f, str(tmp_path / "q.onnx"), [torch.randn(2, 3, 32, 32)], method="best")


def test_calibration_batches_come_from_the_given_split():
    ds = data.shapes(64, 16, 16, seed=0)
    batches = deploy.calibration_batches(ds.train, n=40, batch_size=16)
    assert [len(b) for b in batches] == [16, 16, 8]
    pool = {tuple(r.flatten()[:20].tolist()) for r in ds.train.images}
    assert all(tuple(r.flatten()[:20].tolist()) in pool for b in batches for r in b)
    assert deploy.calibration_batches(ds.train, n=40)[0].equal(deploy.calibration_batches(ds.train, n=40)[0])
    with pytest.raises(ValueError, match="n must be"):
        deploy.calibration_batches(ds.train, n=0)


# --------------------------------------------------------------------------
# dynamic INT8 for Linear-heavy models
# --------------------------------------------------------------------------

class _TinyEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(32, 2)

    def forward(self, ids):
        return self.head(self.layer(self.emb(ids)).mean(1))


def test_dynamic_int8_uses_integer_matmuls_and_stays_close(tmp_path):
    torch.manual_seed(0)
    model = _TinyEncoder().eval()
    ids = torch.randint(0, 50, (4, 12))
    f = deploy.export_onnx(model, ids, str(tmp_path / "enc.onnx"), input_names=("ids",), dynamic_axes={0: {1: "seq"}})
    q = deploy.quantize_dynamic_onnx(f, str(tmp_path / "enc-int8.onnx"))
    ops = deploy.onnx_op_types(q)
    assert ops["MatMulInteger"] >= 3 and ops["DynamicQuantizeLinear"] >= 1
    with torch.no_grad():
        ref = model(ids)
    got = deploy.OnnxModel(q)(ids)
    assert float((got - ref).norm() / ref.norm()) < 0.1
    assert deploy.OnnxModel(q)(torch.randint(0, 50, (2, 7))).shape == (2, 2), "sequence length is dynamic"


# --------------------------------------------------------------------------
# saved artefacts reload and predict the same
# --------------------------------------------------------------------------

def test_onnx_artefact_reloads_with_same_predictions(cnn, onnx_files):
    x = _inputs(9)
    with torch.no_grad():
        ref = cnn(x)
    reloaded = deploy.OnnxModel(onnx_files["cnn"]["fp32"])
    got = reloaded(x)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.argmax(1), ref.argmax(1))
    assert reloaded(x[:1]).shape == (1, 10), "batch size is dynamic"
    # and the INT8 artefact gives the same predictions every time it is loaded
    q = onnx_files["cnn"]["int8"]
    assert torch.equal(deploy.OnnxModel(q)(x), deploy.OnnxModel(q, threads=1)(x))


def test_torch_export_artefact_reloads_with_same_predictions(cnn, tmp_path):
    x = _inputs(4)
    path = deploy.save_exported(cnn, x, str(tmp_path / "cnn.pt2"))
    reloaded = deploy.load_exported(path)
    with torch.no_grad():
        assert torch.allclose(reloaded(x), cnn(x), atol=1e-6)
    # the package's helpers take the reloaded program too (it refuses .eval())
    ds = data.shapes(8, 4, 4, seed=0)
    assert torch.allclose(deploy.predict(reloaded, ds.test, batch_size=4), deploy.predict(cnn, ds.test), atol=1e-5)
    assert deploy.measure_latency(reloaded, x, runs=2, warmup=1).runs == 2
    with pytest.raises(ValueError, match="no file"):
        deploy.load_exported(str(tmp_path / "nothing.pt2"))


def test_export_onnx_validates(cnn, tmp_path):
    with pytest.raises(ValueError, match="input_names"):
        deploy.export_onnx(cnn, torch.randn(1, 3, 32, 32), str(tmp_path / "a.onnx"), input_names=("a", "b"))
    with pytest.raises(ValueError, match="nn.Module"):
        deploy.export_onnx(lambda x: x, torch.randn(1), str(tmp_path / "a.onnx"))
    with pytest.raises(ValueError, match="no ONNX file"):
        deploy.OnnxModel(str(tmp_path / "nothing.onnx"))


# --------------------------------------------------------------------------
# accuracy rows
# --------------------------------------------------------------------------

def test_agreement_and_variant_row(cnn, onnx_files):
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]])
    b = torch.tensor([[3.0, 0.0], [1.0, 0.0], [5.0, 1.0]])
    assert deploy.agreement(a, b) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="shape"):
        deploy.agreement(a, b[:2])
    ds = data.shapes(32, 16, 48, seed=0)
    ref = deploy.predict(cnn, ds.test)
    x = ds.test.images[:1]
    row = deploy.variant_row("int8", deploy.OnnxModel(onnx_files["cnn"]["int8"]), ds.test, x, params=123,
                             reference_logits=ref, runs=3, warmup=1)
    assert set(row) == {"model", "params", "size MB", "p50 ms", "p99 ms", "accuracy %", "agreement %"}
    assert row["params"] == 123 and 0 <= row["accuracy %"] <= 100 and row["p50 ms"] <= row["p99 ms"]
    fp = deploy.variant_row("fp32", cnn, ds.test, x, reference_logits=ref, runs=3, warmup=1)
    assert fp["agreement %"] == 100 and fp["params"] == deploy.count_params(cnn)


# --------------------------------------------------------------------------
# torchao PT2E (optional dependency)
# --------------------------------------------------------------------------

def test_pt2e_quantizes_every_convolution(cnn):
    if deploy.torchao_version() is None:
        pytest.skip("torchao is not installed")
    x = torch.randn(1, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    q = deploy.quantize_pt2e(cnn, x, [torch.randn(8, 3, 32, 32, generator=g) for _ in range(2)])
    assert deploy.pt2e_conv_precision(q) == {"int8": 4, "float": 0}
    xs = _inputs(1)
    with torch.no_grad():
        ref, got = cnn(xs), q(xs)
    assert float((got - ref).norm() / ref.norm()) < 0.05


def test_pt2e_compiled_with_freezing_matches_the_converted_model(cnn):
    # one compilation (tens of seconds on two cores): the path the benchmark times
    if deploy.torchao_version() is None:
        pytest.skip("torchao is not installed")
    x = torch.randn(1, 3, 32, 32)
    q = deploy.quantize_pt2e(cnn, x, [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))])
    fast = deploy.compile_frozen(q, x)
    with torch.no_grad():
        ref = q(x)
        # Inductor's fused INT8 kernels may round an intermediate activation
        # one quantization step differently from the converted graph: allow
        # 1 % of the output's range, and the same prediction.
        got = fast(x)
        assert torch.allclose(got, ref, atol=1e-3 + 0.01 * float(ref.abs().max()))
        assert torch.equal(got.argmax(1), ref.argmax(1))

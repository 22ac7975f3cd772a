"""Lab 5 checks: which layers are still float, timing a model, calibration
data, static INT8.

Each check runs the student's function (or inspects what it produced), prints
one ``✓`` line when it is right, and otherwise raises :class:`CheckFailed`
naming the usual mistake.
"""
from __future__ import annotations

import os
import time
from typing import Callable

import torch
import torch.nn as nn

from . import CheckFailed

# --------------------------------------------------------------------------
# Exercise: which layers are still float?
# --------------------------------------------------------------------------


def _float_layers(model: nn.Module) -> dict:
    return {"Conv2d": sum(isinstance(m, nn.Conv2d) for m in model.modules()),
            "Linear": sum(isinstance(m, nn.Linear) for m in model.modules())}


def _by_name(model: nn.Module) -> dict:
    return {k: sum(type(m).__name__ == k for m in model.modules()) for k in ("Conv2d", "Linear")}


def _children_only(model: nn.Module) -> dict:
    return {"Conv2d": sum(isinstance(m, nn.Conv2d) for m in model.children()),
            "Linear": sum(isinstance(m, nn.Linear) for m in model.children())}


def _float_cases() -> list[tuple[str, nn.Module]]:
    import warnings

    from torch.ao.quantization import quantize_dynamic

    from ..models import build

    torch.manual_seed(0)
    cnn = build({"arch": "cnn", "widths": (4, 8, 16)}, 10)
    resnet = build({"arch": "resnet", "depth": 8, "width": 4}, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q_cnn = quantize_dynamic(build({"arch": "cnn", "widths": (4, 8, 16)}, 10).eval(), {nn.Linear, nn.Conv2d},
                                 dtype=torch.qint8)
        mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 16), nn.ReLU()), nn.Linear(16, 2))
        q_mlp = quantize_dynamic(mlp.eval(), {nn.Linear}, dtype=torch.qint8)
    return [("a small CNN", cnn), ("a CIFAR ResNet", resnet), ("a CNN after quantize_dynamic", q_cnn),
            ("an MLP after quantize_dynamic", q_mlp)]


def check_float_layers(fn: Callable) -> bool:
    """``fn(model)`` must return ``{"Conv2d": n, "Linear": m}``: how many
    ``nn.Conv2d`` and ``nn.Linear`` modules anywhere in ``model`` are still
    float."""
    cases = _float_cases()
    for label, model in cases:
        try:
            out = fn(model)
        except NotImplementedError:
            raise
        except Exception as exc:
            raise CheckFailed(f"float_layers raised {type(exc).__name__}: {exc} (on {label})") from exc
        if not isinstance(out, dict) or set(out) != {"Conv2d", "Linear"}:
            raise CheckFailed(f"float_layers must return a dict with the keys 'Conv2d' and 'Linear', got {out!r}")
        try:
            got = {k: int(v) for k, v in out.items()}
        except (TypeError, ValueError) as exc:
            raise CheckFailed(f"the counts must be integers, got {out!r}") from exc
        want = _float_layers(model)
        if got == want:
            continue
        if got == _by_name(model):
            raise CheckFailed("a dynamically quantized Linear is a class that is *also named* 'Linear' "
                              "(torch.ao.nn.quantized.dynamic.Linear): comparing type names counts it as float. "
                              "Use isinstance(m, nn.Linear).")
        if got == _children_only(model):
            raise CheckFailed("only the top-level children are counted: layers sit inside Sequential blocks. "
                              "Use model.modules(), which walks the whole tree.")
        raise CheckFailed(f"on {label}: expected {want}, got {got}")
    print(f"✓ float_layers counts the float Conv2d and Linear modules correctly on {len(cases)} models "
          f"(two of them after quantize_dynamic)")
    return True


# --------------------------------------------------------------------------
# Exercise: time a model
# --------------------------------------------------------------------------


class _ScriptedModel:
    """A fake model with a known timing pattern: the first ``warmup`` calls
    take ``cold_s`` (a cold start); after that, two calls in every five take
    ``slow_s`` and the others ``fast_s``. Records calls and grad mode."""

    def __init__(self, warmup: int, fast_s=0.001, slow_s=0.06, cold_s=0.2):
        self.warmup, self.fast_s, self.slow_s, self.cold_s = warmup, fast_s, slow_s, cold_s
        self.calls = 0
        self.grad_enabled = []

    def __call__(self, x):
        i = self.calls
        self.calls += 1
        self.grad_enabled.append(torch.is_grad_enabled())
        if i < self.warmup:
            time.sleep(self.cold_s)
        elif (i - self.warmup) % 5 in (1, 3):
            time.sleep(self.slow_s)
        else:
            time.sleep(self.fast_s)
        return x

    def eval(self):
        return self


def check_latency_fn(fn: Callable, runs: int = 25, warmup: int = 3) -> bool:
    """``fn(model, x, runs=, warmup=)`` must return ``(p50_ms, p99_ms)``.

    Tested on a fake model whose timings are known: ``warmup`` cold calls of
    200 ms, then 60% of calls at 1 ms and 40% at 60 ms. Expected: p50 about
    1 ms (tolerance: below 12 ms), p99 about 60 ms (between 40 and 130 ms).
    """
    fake = _ScriptedModel(warmup)
    try:
        out = fn(fake, torch.zeros(1, 3, 8, 8), runs=runs, warmup=warmup)
    except NotImplementedError:
        raise
    except Exception as exc:
        raise CheckFailed(f"latency_ms raised {type(exc).__name__}: {exc}") from exc
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise CheckFailed(f"latency_ms must return a pair (p50_ms, p99_ms), got {out!r}")
    try:
        p50, p99 = (float(v) for v in out)
    except (TypeError, ValueError) as exc:
        raise CheckFailed(f"latency_ms must return two numbers, got {out!r}") from exc
    if fake.calls == runs:
        raise CheckFailed(f"the model was called {fake.calls} times = runs: the {warmup} warm-up calls are "
                          f"missing. Call the model `warmup` times (untimed) before timing `runs` calls.")
    if fake.calls != runs + warmup:
        raise CheckFailed(f"the model was called {fake.calls} times; expected warmup + runs = {warmup + runs} "
                          f"(untimed warm-up calls first, then one timed call per run).")
    if any(fake.grad_enabled):
        raise CheckFailed("the model ran with autograd enabled: wrap the calls in torch.inference_mode() "
                          "(or torch.no_grad()) — recording the graph for a backward pass costs time.")
    if p99 < 0.2:
        raise CheckFailed(f"p99 = {p99:.4g} but the slow calls take 60 ms: the times look like seconds — "
                          f"multiply by 1000 to report milliseconds.")
    if p50 > 1000 * 12:
        raise CheckFailed(f"p50 = {p50:.4g}: the times look like microseconds or nanoseconds; report milliseconds.")
    if p50 > p99:
        raise CheckFailed(f"p50 = {p50:.3g} ms is above p99 = {p99:.3g} ms: the two are swapped "
                          f"(p50 is the median; p99 the value 99% of the calls stay below).")
    if p99 > 130:
        raise CheckFailed(f"p99 = {p99:.3g} ms: the 200 ms warm-up calls were timed too. Time only the calls "
                          f"after the warm-up.")
    if p50 > 12:
        raise CheckFailed(f"p50 = {p50:.3g} ms but 60% of the calls take 1 ms: this looks like the mean "
                          f"(pulled up by the slow calls). The p50 is the median, e.g. np.percentile(times, 50).")
    if p99 < 40:
        raise CheckFailed(f"p99 = {p99:.3g} ms but 40% of the calls take 60 ms: the 99th percentile must be "
                          f"about 60 ms — use np.percentile(times, 99).")
    print(f"✓ latency_ms: warm-up excluded, {runs} timed runs, p50 {p50:.2f} ms (expect ≈1), p99 {p99:.1f} ms "
          f"(expect ≈60) on a fake model with known timings")
    return True


# --------------------------------------------------------------------------
# Exercise: calibration data
# --------------------------------------------------------------------------


def _fingerprints(split, batch_size: int = 512) -> set:
    keys = set()
    for b in split.batches(batch_size):
        for row in b.x.float().reshape(len(b.x), -1):
            keys.add(_key(row))
    return keys


def _key(row: torch.Tensor) -> bytes:
    return torch.round(row.float() * 1e3).to(torch.int32).numpy().tobytes()


def check_calibration_set(fn: Callable, data, n: int = 96) -> bool:
    """``fn(data, n)`` must return a list of float batches (B, C, H, W) holding
    ``n`` images from ``data.train`` (normalised as in training), covering
    several classes."""
    try:
        out = fn(data, n)
    except NotImplementedError:
        raise
    except Exception as exc:
        raise CheckFailed(f"calibration_set raised {type(exc).__name__}: {exc}") from exc
    if isinstance(out, torch.Tensor):
        out = [out]
    if not isinstance(out, (list, tuple)) or not out or not all(isinstance(b, torch.Tensor) for b in out):
        raise CheckFailed(f"calibration_set must return a non-empty list of tensors (B, C, H, W), got {type(out).__name__}")
    shape = tuple(data.train.images.shape[1:])
    for b in out:
        if b.ndim != 4 or tuple(b.shape[1:]) != shape:
            raise CheckFailed(f"every batch must be (B, {', '.join(map(str, shape))}), got {tuple(b.shape)}")
        if not b.is_floating_point():
            raise CheckFailed(f"batches must be float tensors (the model's input), got {b.dtype}: use "
                              f"split.batches(), which normalises the images the way training did")
    total = sum(len(b) for b in out)
    want = min(n, len(data.train))
    if total != want:
        raise CheckFailed(f"asked for n={n} images, got {total} in {len(out)} batches")
    rows = torch.cat([b.float().reshape(len(b), -1) for b in out])
    keys = [_key(r) for r in rows]
    train = _fingerprints(data.train)
    if all(k in train for k in keys):
        labels_of = {}
        for b in data.train.batches(512):
            for r, y in zip(b.x.float().reshape(len(b.x), -1), b.labels):
                labels_of[_key(r)] = int(y)
        classes = {labels_of[k] for k in keys}
        if len(classes) < min(data.num_classes, n) // 2:
            raise CheckFailed(f"the {total} calibration images cover only {len(classes)} of {data.num_classes} "
                              f"classes: draw them at random from the training set so the activation ranges "
                              f"of every class are seen")
        print(f"✓ calibration_set: {total} training images in {len(out)} batches, {len(classes)} classes, "
              f"normalised like the training inputs")
        return True
    if all(k in _fingerprints(data.test) for k in keys):
        raise CheckFailed("these are test images: calibrating on the set you report accuracy on lets it leak "
                          "into the model. Use data.train.")
    if all(k in _fingerprints(data.val) for k in keys):
        raise CheckFailed("these are validation images: keep val and test for measuring the model and "
                          "calibrate on data.train.")
    lo, hi = float(rows.min()), float(rows.max())
    if lo >= 0 and hi > 1.5:
        raise CheckFailed(f"values run from {lo:.3g} to {hi:.3g}: raw pixels, not the normalised inputs the "
                          f"model was trained on. Take batches from split.batches().")
    raise CheckFailed("these images are not from data.train (random noise?): calibration must see real inputs, "
                      "or the activation ranges it records will not match deployment.")


# --------------------------------------------------------------------------
# Exercise: static INT8
# --------------------------------------------------------------------------


def _activation_zero_point_types(path: str) -> set:
    import onnx

    g = onnx.load(path, load_external_data=False).graph
    inits = {i.name: i for i in g.initializer}
    types = set()
    for n in g.node:
        if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits:
            types.add(onnx.helper.tensor_dtype_to_np_dtype(inits[n.input[2]].data_type).name)
    return types


def check_static_int8(int8_path: str, float_path: str, inputs, min_agreement: float = 0.9) -> bool:
    """The file at ``int8_path`` must be a static INT8 model in QDQ format,
    with per-channel weights and uint8 activations, every convolution run in
    INT8 by ONNX Runtime, and predictions agreeing with the float model at
    ``float_path`` on ``inputs`` (a list of batches) for at least
    ``min_agreement`` of the samples."""
    from .. import deploy

    if not isinstance(int8_path, (str, os.PathLike)) or not os.path.exists(int8_path):
        raise CheckFailed(f"no quantized ONNX file at {int8_path!r}: return the path you wrote")
    if os.path.abspath(int8_path) == os.path.abspath(float_path):
        raise CheckFailed("the INT8 path is the float model's path: write the quantized model to a new file")
    ops = deploy.onnx_op_types(int8_path)
    if ops.get("DynamicQuantizeLinear") or ops.get("ConvInteger") or ops.get("MatMulInteger"):
        raise CheckFailed("this is *dynamic* quantization (activations quantized at run time): use static "
                          "quantization with calibration data (onnxruntime.quantization.quantize_static).")
    if ops.get("QLinearConv"):
        raise CheckFailed("the file holds QLinearConv nodes: that is the QOperator format. Use the QDQ format "
                          "(quant_format=QuantFormat.QDQ), which ONNX Runtime fuses into the same INT8 kernels.")
    if not ops.get("QuantizeLinear"):
        raise CheckFailed("the file has no QuantizeLinear/DequantizeLinear nodes: it is not quantized.")
    if not deploy.weight_scales_per_channel(int8_path):
        raise CheckFailed("the convolution weights are quantized per tensor (one scale per layer): use "
                          "per_channel=True, one scale per output channel — it keeps small channels accurate.")
    zp = _activation_zero_point_types(int8_path)
    cp = deploy.conv_precision(int8_path)
    if "int8" in zp:
        raise CheckFailed(f"activations are signed int8: ONNX Runtime on x86 then runs {cp['float']} of "
                          f"{cp['int8'] + cp['float']} convolutions in float here, and is slower. Use "
                          f"activation_type=QuantType.QUInt8 (weights stay QInt8).")
    if cp["float"] or not cp["int8"]:
        raise CheckFailed(f"ONNX Runtime runs {cp['float']} convolution(s) in float and {cp['int8']} in INT8: "
                          f"every convolution should be INT8 ({dict(cp['ops'])}).")
    fp32, int8 = deploy.OnnxModel(float_path), deploy.OnnxModel(int8_path)
    ref = torch.cat([fp32(b) for b in inputs])
    got = torch.cat([int8(b) for b in inputs])
    agree = deploy.agreement(got, ref)
    if agree < min_agreement:
        raise CheckFailed(f"the INT8 model agrees with the float one on only {100 * agree:.1f}% of "
                          f"{len(ref)} inputs (want at least {100 * min_agreement:.0f}%): calibrate on real, "
                          f"normalised training images.")
    print(f"✓ static INT8: QDQ, per-channel weights, uint8 activations; {cp['int8']}/{cp['int8'] + cp['float']} "
          f"convolutions run as QLinearConv; agrees with float on {100 * agree:.1f}% of {len(ref)} inputs")
    return True

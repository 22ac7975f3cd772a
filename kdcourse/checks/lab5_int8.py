"""Lab 5 checks of the static INT8 path: the calibration set (training images,
normalised, never the test or validation split) and the student quantized
with ONNX Runtime (QDQ, per-channel int8 weights, uint8 activations, every
convolution run as ``QLinearConv``), with their probes and known-wrong
variants. Re-exported by :mod:`kdcourse.checks.lab5`."""
from __future__ import annotations

import os
import time
from typing import Callable

import torch
import torch.nn as nn

from . import CheckFailed, contract

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



def _calibration_data(seed: int):
    """Seeded uint8 images, the training labels sorted by class (the first
    images of a split are then one class)."""
    from ..data import ImageData, Split

    g = contract.generator(seed)

    def split(n, sort):
        labels = torch.randint(0, 6, (n,), generator=g)
        labels = labels.sort().values if sort else labels
        return Split(torch.randint(0, 256, (n, 3, 6, 6), generator=g, dtype=torch.uint8), labels, tuple("abcdef"))
    return ImageData("probe", split(120, True), split(40, False), split(40, False))


def probe_calibration_set(fn: Callable, seed: int) -> dict:
    """Seeded data whose training labels are sorted by class, n from 20 to 60:
    how many images came back, of which shape and dtype, from which split,
    whether they are normalised, distinct, and cover half the classes."""
    data = _calibration_data(seed)
    n = 20 + (seed * 7) % 41
    out = fn(data, n)
    if isinstance(out, torch.Tensor):
        out = [out]
    if not isinstance(out, (list, tuple)) or not all(isinstance(b, torch.Tensor) for b in out):
        raise contract.PlainDataError("calibration_set must return a list of tensors (B, C, H, W)")
    keys = {}
    for name in ("train", "val", "test"):
        sp = getattr(data, name)
        for i, r in enumerate(next(sp.with_augment(False).batches(len(sp))).x.reshape(len(sp), -1)):
            keys.setdefault(_key(r), (name, int(sp.labels[i]), i))
    rows = [r for b in out for r in b.float().reshape(len(b), -1)] if all(b.ndim == 4 for b in out) else []
    found = [keys.get(_key(r), ("other", -1, -1)) for r in rows]
    where = {s: sum(f[0] == s for f in found) for s in ("train", "val", "test", "other")}
    classes = {f[1] for f in found if f[0] == "train"}
    return {"total": sum(len(b) for b in out), "shape_ok": all(b.ndim == 4 and tuple(b.shape[1:]) == (3, 6, 6) for b in out),
            "float": all(b.is_floating_point() for b in out), "from": where,
            "distinct": len({f for f in found}) == len(found),
            "raw": bool(rows) and float(torch.stack(rows).min()) >= 0 and float(torch.stack(rows).max()) > 1.5,
            "covers_half": len(classes) >= min(data.num_classes, n) // 2}


def reference_calibration_set(data, n, batch_size=32):
    """The reference answer of ``calibration_set`` (refused in the grading kernel)."""
    from .. import deploy

    return deploy.calibration_batches(data.train, n, batch_size)


def _calib_from(split_name=None, first=False, raw=False):
    def calibration_set(data, n, batch_size=32):
        split = getattr(data, split_name or "train")
        if raw:
            return [split.images[:n].float()]
        idx = torch.arange(min(n, len(split))) if first else \
            torch.randperm(len(split), generator=torch.Generator().manual_seed(0))[:n]
        return [b.x for b in split.subset(idx).with_augment(False).batches(batch_size)]
    return calibration_set


CALIBRATION_VARIANTS = {
    "test": (_calib_from("test"), "these are test images: calibrating on the set you report accuracy on lets it leak "
                                  "into the model. Use data.train."),
    "val": (_calib_from("val"), "these are validation images: keep val and test for measuring the model and "
                                "calibrate on data.train."),
    "raw": (_calib_from(raw=True), "raw pixels, not the normalised inputs the model was trained on. Take batches "
                                   "from split.batches()."),
    "first_n": (_calib_from(first=True), "the first n training images cover only a few classes: draw them at "
                                         "random from the training set so the activation ranges of every class "
                                         "are seen"),
}


_PROBE_DIR = []  # one TemporaryDirectory per process, removed when the process exits


def _probe_dir() -> str:
    """This process's folder for the probes' ONNX files (deleted at exit, so
    repeated checks leave nothing in the system's temporary folder)."""
    import tempfile

    if not _PROBE_DIR:
        _PROBE_DIR.append(tempfile.TemporaryDirectory(prefix="kdcourse-probe-"))
    return _PROBE_DIR[0].name


def _tiny_onnx(seed: int) -> str:
    """A seeded tiny CNN exported to ONNX (cached per process)."""
    import warnings

    path = os.path.join(_probe_dir(), f"tiny-{seed % 2}.onnx")
    if not os.path.exists(path):
        torch.manual_seed(seed % 2)
        model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1),
                              nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.zeros(1, 3, 12, 12),), path + ".tmp", dynamo=False, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "batch"}})
        os.replace(path + ".tmp", path)
    return path


def probe_quantize_student(fn: Callable, seed: int) -> dict:
    """A seeded tiny exported CNN and calibration batches: which quantization
    operators the returned file holds, per-channel weights, the activation
    zero-point types, how many convolutions ONNX Runtime runs in INT8, and
    the INT8 model's logits on seeded inputs."""
    import tempfile

    g = contract.generator(seed)
    float_path = _tiny_onnx(seed)
    calibration = [torch.randn(8, 3, 12, 12, generator=g) for _ in range(3)]
    with tempfile.TemporaryDirectory(dir=_probe_dir()) as out_dir:  # removed with whatever fn wrote there
        return _probe_quantized(fn(float_path, os.path.join(out_dir, "int8.onnx"), calibration), float_path, g)


def _probe_quantized(got, float_path: str, g: torch.Generator) -> dict:
    from .. import deploy

    if not isinstance(got, (str, os.PathLike)) or not os.path.isfile(got):
        return {"file": "no quantized ONNX file at the returned path"}
    if os.path.abspath(got) == os.path.abspath(float_path):
        return {"file": "the float model's path"}
    ops = deploy.onnx_op_types(got)
    cp = deploy.conv_precision(got, threads=1)
    x = torch.randn(16, 3, 12, 12, generator=g)
    return {"file": "new", "ops": {k: int(ops.get(k, 0)) > 0 for k in ("QuantizeLinear", "DequantizeLinear",
                                                                         "QLinearConv", "DynamicQuantizeLinear",
                                                                         "ConvInteger", "MatMulInteger")},
            "per_channel": deploy.weight_scales_per_channel(got), "zero_points": sorted(_activation_zero_point_types(got)),
            "int8_convs": cp["int8"], "float_convs": cp["float"],
            "logits": contract.plain(deploy.OnnxModel(got, threads=1)(x).double())}


def compare_quantized(a, b, seed) -> str | None:
    """Everything equal except the logits, whose predicted classes must agree
    on 90% of the inputs (and their values within 0.05 on average)."""
    if set(a) != set(b) or "logits" not in b:
        return contract.compare(a, b)
    d = contract.compare({k: v for k, v in a.items() if k != "logits"}, {k: v for k, v in b.items() if k != "logits"})
    if d:
        return d
    la, lb = contract.as_tensor(a["logits"]), contract.as_tensor(b["logits"])
    if la.shape != lb.shape:
        return f"['logits']: shape {tuple(la.shape)}, expected {tuple(lb.shape)}"
    agree = float((la.argmax(-1) == lb.argmax(-1)).double().mean())
    gap = float((la - lb).abs().mean())
    return None if agree >= 0.9 and gap <= 0.05 else \
        f"['logits']: the INT8 model's predictions agree with the reference INT8 model on {100 * agree:.0f}% of the inputs (mean |difference| {gap:.3g})"


def reference_quantize_student(float_path, out_path, calibration):
    """The reference answer of ``quantize_student`` (refused in the grading kernel)."""
    from .. import deploy

    return deploy.quantize_static_onnx(float_path, out_path, calibration)


def _quantize_with(**kw):
    def quantize_student(float_path, out_path, calibration):
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.feeds = iter([{"input": b.numpy()} for b in calibration])

            def get_next(self):
                return next(self.feeds, None)

        opts = dict(quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
                    activation_type=QuantType.QUInt8)
        opts.update({k: (getattr(QuantFormat, v) if k == "quant_format" else getattr(QuantType, v)
                         if k.endswith("_type") else v) for k, v in kw.items()})
        quantize_static(float_path, out_path, Reader(), **opts)
        return out_path
    return quantize_student


def _dynamic(float_path, out_path, calibration):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(float_path, out_path, weight_type=QuantType.QInt8)
    return out_path


QUANTIZE_VARIANTS = {
    "dynamic": (_dynamic, "this is *dynamic* quantization (activations quantized at run time): use static "
                          "quantization with calibration data (onnxruntime.quantization.quantize_static)."),
    "qoperator": (_quantize_with(quant_format="QOperator"),
                  "the file holds QLinearConv nodes: that is the QOperator format. Use the QDQ format "
                  "(quant_format=QuantFormat.QDQ), which ONNX Runtime fuses into the same INT8 kernels."),
    "per_tensor": (_quantize_with(per_channel=False),
                   "the convolution weights are quantized per tensor (one scale per layer): use per_channel=True, "
                   "one scale per output channel — it keeps small channels accurate."),
    "int8_activations": (_quantize_with(activation_type="QInt8"),
                         "activations are signed int8: ONNX Runtime on x86 then runs convolutions in float and is "
                         "slower. Use activation_type=QuantType.QUInt8 (weights stay QInt8)."),
    "float_path": (lambda float_path, out_path, calibration: float_path,
                   "the INT8 path is the float model's path: write the quantized model to a new file"),
}



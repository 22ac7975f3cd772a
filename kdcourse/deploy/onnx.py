"""ONNX export, ONNX Runtime, its INT8 quantizers, and what is really INT8.

* **Static INT8 for convolutions** (:func:`quantize_static_onnx`): the model
  is exported with ``torch.onnx.export(..., dynamo=True)`` and quantized by
  ONNX Runtime's ``quantize_static`` in QDQ format, per-channel weights
  (``QInt8``) and unsigned activations (``QUInt8``) calibrated on real
  training images. On x86 ONNX Runtime fuses every QDQ-wrapped ``Conv`` into
  a ``QLinearConv`` only with unsigned activations; with signed (``QInt8``)
  activations part of the convolutions stay in float — count them with
  :func:`conv_precision`.
* **Dynamic INT8 for Linear-heavy models** (:func:`quantize_dynamic_onnx`):
  weights stored as int8, activations quantized on the fly (``MatMulInteger``).
* **Which layers are really INT8**: :func:`module_types` counts leaf module
  types (after ``quantize_dynamic`` a ``Conv2d`` is still a ``Conv2d``);
  :func:`onnx_op_types` counts the nodes of an ONNX file and
  :func:`runtime_op_types` the kernels ONNX Runtime actually runs after its
  graph optimisations; :func:`conv_precision` classifies every convolution.
"""
from __future__ import annotations

import contextlib
import logging
import os
import statistics
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from ._common import DEFAULT_THREADS, _as_args, _eval

# --------------------------------------------------------------------------
# What is really INT8?
# --------------------------------------------------------------------------


def module_types(model: nn.Module) -> Counter:
    """Counter of ``model``'s layers by the name ``print(model)`` shows them
    under (``Conv2d``, ``DynamicQuantizedLinear``, ...).

    Layers are leaf modules (containers such as ``Sequential`` are not
    counted). A dynamically quantized ``Linear`` keeps its int8 weights in a
    ``LinearPackedParams`` child; it is counted as one layer, under its own name.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"module_types needs an nn.Module, got {type(model).__name__}")

    def packed(m):
        return type(m).__name__.endswith("PackedParams")

    counts = Counter()
    for m in model.modules():
        kids = list(m.children())
        if (not kids and not packed(m)) or (kids and all(packed(k) for k in kids)):
            counts[m._get_name()] += 1
    return counts


def float_layers(model: nn.Module) -> dict:
    """How many ``nn.Conv2d`` and ``nn.Linear`` modules are still float
    (``isinstance`` checks: a quantized Linear is no ``nn.Linear``)."""
    return {"Conv2d": sum(isinstance(m, nn.Conv2d) for m in model.modules()),
            "Linear": sum(isinstance(m, nn.Linear) for m in model.modules())}


def _load_onnx(model):
    import onnx

    if isinstance(model, OnnxModel):
        model = model.path
    if isinstance(model, (str, os.PathLike)):
        return onnx.load(os.fspath(model), load_external_data=False)
    return model


def onnx_op_types(model) -> Counter:
    """Counter of node types in an ONNX graph (a path, ``ModelProto`` or
    :class:`OnnxModel`): what the file *asks* for."""
    return Counter(n.op_type for n in _load_onnx(model).graph.node)


def runtime_op_types(path, threads: int = DEFAULT_THREADS) -> Counter:
    """Counter of node types after ONNX Runtime's graph optimisations (CPU):
    the kernels that actually run (``QLinearConv`` is an INT8 convolution;
    ``Conv``/``FusedConv`` are float)."""
    import onnx

    path = path.path if isinstance(path, OnnxModel) else os.fspath(path)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "optimized.onnx")
        _session(path, threads, optimized_path=out)
        return Counter(n.op_type for n in onnx.load(out, load_external_data=False).graph.node)


def _is_int8_kernel(op: str) -> bool:
    return "QLinear" in op or op.endswith("Integer")


def conv_precision(path, threads: int = DEFAULT_THREADS) -> dict:
    """How many convolutions ONNX Runtime runs in INT8 and how many in float.

    Returns ``{"int8": n, "float": m, "ops": Counter}`` counted on the graph
    after ONNX Runtime's optimisations, where every convolution is a node
    whose type contains ``Conv``.
    """
    ops = runtime_op_types(path, threads)
    convs = {op: n for op, n in ops.items() if "Conv" in op}
    int8 = sum(n for op, n in convs.items() if _is_int8_kernel(op))
    return {"int8": int8, "float": sum(convs.values()) - int8, "ops": Counter(convs)}


def qdq_wrapped(model, op_type: str = "Conv") -> dict:
    """In a QDQ-format ONNX file, how many ``op_type`` nodes read every input
    (activations and weights) from a ``DequantizeLinear``: those are the ones
    the quantizer meant to run in INT8. Returns ``{"wrapped": n, "total": m}``."""
    g = _load_onnx(model).graph
    producer = {o: n.op_type for n in g.node for o in n.output}
    nodes = [n for n in g.node if n.op_type == op_type]
    wrapped = sum(all(producer.get(i) == "DequantizeLinear" for i in n.input[:2]) for n in nodes)
    return {"wrapped": wrapped, "total": len(nodes)}


def weight_scales_per_channel(model) -> bool:
    """True when the weights of the QDQ convolutions are quantized per output
    channel (their ``DequantizeLinear`` scales are vectors, not scalars)."""
    import onnx.numpy_helper as nh

    g = _load_onnx(model).graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    sizes = []
    for n in g.node:
        if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in producer:
            dq = producer[n.input[1]]
            if dq.op_type == "DequantizeLinear" and dq.input[1] in inits:
                sizes.append(nh.to_array(inits[dq.input[1]]).size)
    return bool(sizes) and all(s > 1 for s in sizes)


# --------------------------------------------------------------------------
# ONNX export and ONNX Runtime
# --------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's / quantizer's progress chatter (not errors)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def export_onnx(model: nn.Module, example, path: str, *, input_names: Sequence[str] = ("input",),
                output_names: Sequence[str] = ("logits",), dynamic_batch: bool = True,
                dynamic_axes: Mapping[int, dict] | None = None) -> str:
    """Export ``model`` (eval mode) to one self-contained ONNX file at ``path``
    with ``torch.onnx.export(..., dynamo=True)``; returns ``path``.

    ``example`` is one tensor or a tuple of them. The batch dimension is
    dynamic (``dynamic_batch``), so the same file serves batch 1 and
    evaluation batches. ``dynamic_axes`` maps an input position to extra
    named dynamic dimensions, e.g. ``{0: {1: "seq"}, 1: {1: "seq"}}``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"export_onnx needs an nn.Module, got {type(model).__name__}")
    args = _as_args(example)
    if len(input_names) != len(args):
        raise ValueError(f"input_names has {len(input_names)} names for {len(args)} inputs; give one name per input")
    shapes = None
    if dynamic_batch or dynamic_axes:
        shapes = []
        for i in range(len(args)):
            dims = {0: "batch"} if dynamic_batch else {}
            dims.update((dynamic_axes or {}).get(i, {}))
            shapes.append(dims or None)
        shapes = tuple(shapes)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _eval(model)
    with _quiet(), open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        torch.onnx.export(model, args, path, dynamo=True, external_data=False, input_names=list(input_names),
                          output_names=list(output_names), dynamic_shapes=shapes, verbose=False)
    return path


def _session(path: str, threads: int, optimized_path: str | None = None):
    import onnxruntime as ort

    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return ort.InferenceSession(os.fspath(path), so, providers=["CPUExecutionProvider"])


class OnnxModel:
    """An ONNX file run by ONNX Runtime on the CPU, used like a model:
    ``OnnxModel(path)(x)`` takes tensors and returns the first output as a
    float tensor. ``threads`` is fixed for the session's lifetime."""

    def __init__(self, path: str, threads: int = DEFAULT_THREADS):
        if not os.path.exists(path):
            raise ValueError(f"OnnxModel: no ONNX file at {path!r}; export one with export_onnx(model, example, path)")
        self.path = os.fspath(path)
        self.threads = threads
        self.session = _session(self.path, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *inputs) -> torch.Tensor:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"this model takes {len(self.input_names)} inputs {self.input_names}, got {len(inputs)}")
        feed = {n: (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x))
                for n, x in zip(self.input_names, inputs)}
        return torch.from_numpy(self.session.run(None, feed)[0])

    def eval(self) -> "OnnxModel":  # lets code written for nn.Module call .eval()
        return self

    def __repr__(self) -> str:
        return f"OnnxModel({os.path.basename(self.path)!r}, threads={self.threads})"


# --------------------------------------------------------------------------
# Calibration and INT8 with ONNX Runtime
# --------------------------------------------------------------------------


def calibration_batches(split, n: int = 256, batch_size: int = 32, seed: int = 0) -> list[torch.Tensor]:
    """``n`` images drawn at random (seeded) from ``split`` — the *training*
    split, never the test set — as float batches (B, C, H, W), normalised the
    way the model saw them in training (augmentation off)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(split), generator=gen)[: min(n, len(split))]
    sub = split.subset(idx).with_augment(False)
    return [b.x.float().cpu() for b in sub.batches(batch_size)]


def _reader(calibration, input_names: Sequence[str]):
    from onnxruntime.quantization import CalibrationDataReader

    feeds = []
    for item in calibration:
        if isinstance(item, Mapping):
            feeds.append({k: np.ascontiguousarray(np.asarray(v.numpy() if isinstance(v, torch.Tensor) else v))
                          for k, v in item.items()})
            continue
        args = _as_args(item)
        if len(args) != len(input_names):
            raise ValueError(f"each calibration item must hold {len(input_names)} input(s) {list(input_names)}, got {len(args)}")
        feeds.append({k: np.ascontiguousarray(a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a))
                      for k, a in zip(input_names, args)})
    if not feeds:
        raise ValueError("calibration is empty: pass a list of input batches, e.g. calibration_batches(data.train)")

    class _Feeds(CalibrationDataReader):
        def __init__(self):
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

    return _Feeds()


def _quant_type(name: str):
    from onnxruntime.quantization import QuantType

    options = {"quint8": QuantType.QUInt8, "qint8": QuantType.QInt8}
    key = str(name).lower().replace("quanttype.", "")
    if key not in options:
        raise ValueError(f"quantization type {name!r} is not known; use 'QUInt8' or 'QInt8'")
    return options[key]


def quantize_static_onnx(float_path: str, out_path: str, calibration: Iterable, *, per_channel: bool = True,
                         activation_type: str = "QUInt8", weight_type: str = "QInt8", method: str = "minmax",
                         quant_format: str = "QDQ") -> str:
    """Static post-training INT8 with ONNX Runtime; returns ``out_path``.

    ``calibration`` is a list of input batches (tensors, tuples of tensors or
    ``{input_name: array}`` dicts): the ranges of every activation are
    recorded on them (``method``: ``"minmax"``, ``"entropy"`` or
    ``"percentile"``) and fixed in the file. Defaults: QDQ format,
    per-channel int8 weights, uint8 activations (fast on x86).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise ValueError(f"method={method!r} is not known; use one of {sorted(methods)}")
    formats = {"QDQ": QuantFormat.QDQ, "QOperator": QuantFormat.QOperator}
    if quant_format not in formats:
        raise ValueError(f"quant_format={quant_format!r} is not known; use 'QDQ' or 'QOperator'")
    names = [i.name for i in _load_onnx(float_path).graph.input]
    reader = _reader(calibration, names)
    with _quiet():
        quantize_static(os.fspath(float_path), os.fspath(out_path), reader, quant_format=formats[quant_format],
                        per_channel=per_channel, activation_type=_quant_type(activation_type),
                        weight_type=_quant_type(weight_type), calibrate_method=methods[method])
    return out_path


def cpu_has_vnni() -> bool:
    """True where the x86 CPU has VNNI int8 dot products (``avx512_vnni``,
    ``avx_vnni`` or ``amx_int8`` in ``/proc/cpuinfo``). Without them ONNX
    Runtime's u8×s8 kernels add pairs of products in 16 bits and can
    saturate (ONNX Runtime's quantization docs: use ``reduce_range`` on
    non-VNNI machines)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def quantize_dynamic_onnx(float_path: str, out_path: str, *, weight_type: str = "QInt8",
                          reduce_range: bool | None = None) -> str:
    """Dynamic INT8 with ONNX Runtime (for Linear/MatMul-heavy models such as
    transformers): int8 weights in the file, activations quantized at run
    time per batch (``DynamicQuantizeLinear`` + ``MatMulInteger``).

    ``reduce_range`` stores 7-bit weights; ``None`` (default) turns it on
    where the CPU lacks VNNI (:func:`cpu_has_vnni`), whose 16-bit
    accumulation otherwise saturates: on an AVX2-only CPU a small encoder's
    relative output error fell from 0.17 to 0.011 with it."""
    from onnxruntime.quantization import quantize_dynamic

    if reduce_range is None:
        reduce_range = not cpu_has_vnni()
    with _quiet():
        quantize_dynamic(os.fspath(float_path), os.fspath(out_path), weight_type=_quant_type(weight_type),
                         reduce_range=bool(reduce_range))
    return out_path


def seed_recipe_dynamic(model: nn.Module) -> nn.Module:
    """The handout's recipe, ``torch.ao.quantization.quantize_dynamic(model,
    {Linear, Conv2d}, dtype=qint8)``, on a copy. Dynamic quantization has no
    convolution kernels: every ``Conv2d`` comes back unchanged (float). The
    ``torch.ao.quantization`` API is deprecated (its warnings are hidden here)."""
    import copy

    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear, nn.Conv2d}, dtype=torch.qint8)

"""Deployment helpers: honest latency and size, real INT8, saved artefacts.

    lat = measure_latency(model, torch.randn(1, 3, 32, 32), threads=2)   # p50/p99 in ms
    size_mb(model)                                      # bytes on disk / 1e6
    path = export_onnx(student, example, "student.onnx")   # torch.onnx.export(dynamo=True)
    qpath = quantize_static_onnx(path, "student-int8.onnx", calibration_batches(data.train))
    int8 = OnnxModel(qpath, threads=2)                  # tensor in, logits out
    conv_precision(qpath)                               # {'int8': 5, 'float': 0}

What is measured, and how
-------------------------
* **Latency** (:func:`measure_latency`): ``warmup`` untimed calls, then
  ``runs`` calls each timed with ``time.perf_counter``; p50 and p99 in
  milliseconds. PyTorch's thread count is set for the measurement and
  restored afterwards; an :class:`OnnxModel` has its own thread count, fixed
  when its session is created. ``repeats > 1`` repeats the whole measurement
  and reports the median of the repeats' percentiles; :func:`compare_latency`
  interleaves the repeats of several models, so that a burst of load from
  other programs on a shared CPU hits all of them alike.
* **Size** (:func:`size_mb`): the model serialised to a temporary file
  (``torch.save`` of the state dict, ``torch.export.save``) or the artefact
  file itself, in MB of 10^6 bytes.
* **Which layers are really INT8**: :func:`module_types` counts leaf module
  types (after ``quantize_dynamic`` a ``Conv2d`` is still a ``Conv2d``);
  :func:`onnx_op_types` counts the nodes of an ONNX file and
  :func:`runtime_op_types` the kernels ONNX Runtime actually runs after its
  graph optimisations; :func:`conv_precision` classifies every convolution.

The INT8 stacks
---------------
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
* **torchao PT2E** (:func:`quantize_pt2e`, optional, ``pip install torchao``):
  ``torch.export(strict=True)``, ``X86InductorQuantizer``, calibration,
  ``convert_pt2e``, then :func:`compile_frozen` (``torch.compile`` with
  Inductor's ``freezing``). Without compilation the converted model runs its
  quantize/dequantize pairs in float: correct numerics, no speed.
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

DEFAULT_THREADS = 2

# --------------------------------------------------------------------------
# Latency
# --------------------------------------------------------------------------


@contextlib.contextmanager
def num_threads(n: int):
    """Run the block with ``torch.set_num_threads(n)``; restore the old value after."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be a positive int, got {n!r}")
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def percentiles(samples_ms: Sequence[float], qs: Sequence[float] = (50, 99)) -> tuple[float, ...]:
    """Percentiles of ``samples_ms`` (linear interpolation, as ``numpy.percentile``)."""
    if len(samples_ms) == 0:
        raise ValueError("samples_ms is empty: time at least one run")
    return tuple(float(v) for v in np.percentile(np.asarray(samples_ms, dtype=np.float64), list(qs)))


@dataclass(frozen=True)
class Latency:
    """Latency of one model on one input, in milliseconds.

    ``p50_ms`` / ``p99_ms`` are the median over ``repeats`` of each repeat's
    50th / 99th percentile of ``runs`` timed calls (after ``warmup`` untimed
    ones). With 100 runs the p99 is close to the slowest call.
    """

    p50_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    runs: int
    warmup: int
    repeats: int
    batch_size: int
    threads: int
    repeat_p50s: tuple = field(default=(), repr=False)
    samples_ms: tuple = field(default=(), repr=False)

    def __str__(self) -> str:
        rep = f", median of {self.repeats} repeats" if self.repeats > 1 else ""
        return (f"p50 {self.p50_ms:.3f} ms, p99 {self.p99_ms:.3f} ms (batch {self.batch_size}, "
                f"{self.threads} thread{'s' if self.threads != 1 else ''}, {self.runs} runs after {self.warmup} warm-up{rep})")


def _as_args(example) -> tuple:
    return tuple(example) if isinstance(example, (tuple, list)) else (example,)


def _batch_size(args: tuple) -> int:
    for a in args:
        if isinstance(a, (torch.Tensor, np.ndarray)) and a.ndim > 0:
            return int(a.shape[0])
    return 1


def _threads_of(model, threads: int | None) -> int:
    own = getattr(model, "threads", None)
    if isinstance(model, OnnxModel):
        if threads is not None and threads != own:
            raise ValueError(f"threads={threads} but this OnnxModel was created with threads={own}; "
                             f"create it with OnnxModel(path, threads={threads}) (ONNX Runtime fixes threads per session)")
        return own
    return DEFAULT_THREADS if threads is None else threads


def _eval(model) -> None:
    """Eval mode for an ``nn.Module``; modules captured by ``torch.export``
    refuse ``.eval()`` (they were captured in eval mode already)."""
    if isinstance(model, nn.Module):
        try:
            model.eval()
        except NotImplementedError:
            pass


def _time_calls(model, args, runs: int, warmup: int) -> list[float]:
    with torch.inference_mode():
        for _ in range(warmup):
            model(*args)
        out = []
        for _ in range(runs):
            t0 = time.perf_counter()
            model(*args)
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def measure_latency(model: Callable, example, *, runs: int = 100, warmup: int = 10, threads: int | None = None,
                    repeats: int = 1) -> Latency:
    """Time ``model(*example)`` and return p50/p99 in ms (see :class:`Latency`).

    Args:
        model: an ``nn.Module`` (put in eval mode here), an :class:`OnnxModel`
            or any callable.
        example: one input tensor, or a tuple of them; its first dimension is
            the batch size that is reported.
        runs, warmup: timed and untimed calls per repeat.
        threads: PyTorch intra-op threads during the measurement (restored
            afterwards); default :data:`DEFAULT_THREADS`. An :class:`OnnxModel`
            uses the threads it was created with.
        repeats: independent measurements; percentiles are their medians.
    """
    for name, v, lo in (("runs", runs, 1), ("warmup", warmup, 0), ("repeats", repeats, 1)):
        if not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    args = _as_args(example)
    n_threads = _threads_of(model, threads)
    _eval(model)
    reps = []
    with num_threads(n_threads):
        for _ in range(repeats):
            reps.append(_time_calls(model, args, runs, warmup))
    return _summarise(reps, warmup, _batch_size(args), n_threads)


def _summarise(reps: list[list[float]], warmup: int, batch: int, threads: int) -> Latency:
    p50s = [percentiles(r, (50,))[0] for r in reps]
    p99s = [percentiles(r, (99,))[0] for r in reps]
    flat = [t for r in reps for t in r]
    return Latency(statistics.median(p50s), statistics.median(p99s), statistics.fmean(flat), min(flat),
                   len(reps[0]), warmup, len(reps), batch, threads, tuple(p50s), tuple(flat))


def compare_latency(entries: Mapping[str, tuple], *, runs: int = 100, warmup: int = 10, repeats: int = 3,
                    threads: int | None = None) -> dict[str, Latency]:
    """Measure several models with their repeats interleaved (A, B, C, A, B, C, ...).

    ``entries`` maps a name to ``(model, example)``. On a CPU shared with other
    programs a burst of load then slows every model's repeat alike, and the
    medians of the repeats stay comparable.
    """
    reps: dict[str, list] = {k: [] for k in entries}
    info = {}
    for _ in range(repeats):
        for name, (model, example) in entries.items():
            one = measure_latency(model, example, runs=runs, warmup=warmup, threads=threads)
            reps[name].append(list(one.samples_ms))
            info[name] = (one.batch_size, one.threads)
    return {k: _summarise(reps[k], warmup, *info[k]) for k in entries}


# --------------------------------------------------------------------------
# Size and parameters
# --------------------------------------------------------------------------


def _file_bytes(path: str) -> int:
    total = os.path.getsize(path)
    side = path + ".data"  # ONNX external weights, if any
    if os.path.exists(side):
        total += os.path.getsize(side)
    return total


def size_mb(obj) -> float:
    """Size on disk in MB (10^6 bytes).

    ``obj`` is a file path (an ONNX file counts its ``.data`` side file too), an
    :class:`OnnxModel`, a ``torch.export.ExportedProgram`` (saved with
    ``torch.export.save``) or an ``nn.Module`` (its ``state_dict`` saved with
    ``torch.save``) — each serialised to a temporary file and measured there.
    """
    if isinstance(obj, (str, os.PathLike)):
        if not os.path.exists(obj):
            raise ValueError(f"size_mb: no file at {obj!r}")
        return _file_bytes(os.fspath(obj)) / 1e6
    if isinstance(obj, OnnxModel):
        return _file_bytes(obj.path) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.pt")
        if isinstance(obj, torch.export.ExportedProgram):
            torch.export.save(obj, path)
        elif isinstance(obj, nn.Module):
            torch.save(obj.state_dict(), path)
        else:
            raise ValueError(f"size_mb needs a path, OnnxModel, ExportedProgram or nn.Module, got {type(obj).__name__}")
        return os.path.getsize(path) / 1e6


def count_params(model: nn.Module) -> int:
    """Number of parameters of a float ``nn.Module`` (count before quantizing:
    packed int8 weights are not ``nn.Parameter`` s)."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"count_params needs an nn.Module, got {type(model).__name__}")
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example) -> int:
    """Multiply-accumulates of one forward pass *per sample* in the model's
    ``nn.Conv2d`` and ``nn.Linear`` layers (measured with forward hooks on
    ``example``; other operations, e.g. attention's activation×activation
    products, are not counted). A convolution costs
    ``output elements × in_channels / groups × kernel height × kernel width``."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"count_macs needs an nn.Module, got {type(model).__name__}")
    args = _as_args(example)
    total = [0]

    def conv_hook(m, inp, out):
        total[0] += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear_hook(m, inp, out):
        total[0] += out.numel() * m.in_features

    handles = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    handles += [m.register_forward_hook(linear_hook) for m in model.modules() if isinstance(m, nn.Linear)]
    _eval(model)
    try:
        with torch.inference_mode():
            model(*args)
    finally:
        for h in handles:
            h.remove()
    return total[0] // _batch_size(args)


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


def quantize_dynamic_onnx(float_path: str, out_path: str, *, weight_type: str = "QInt8") -> str:
    """Dynamic INT8 with ONNX Runtime (for Linear/MatMul-heavy models such as
    transformers): int8 weights in the file, activations quantized at run
    time per batch (``DynamicQuantizeLinear`` + ``MatMulInteger``)."""
    from onnxruntime.quantization import quantize_dynamic

    with _quiet():
        quantize_dynamic(os.fspath(float_path), os.fspath(out_path), weight_type=_quant_type(weight_type))
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


# --------------------------------------------------------------------------
# torch.export artefacts
# --------------------------------------------------------------------------


def save_exported(model: nn.Module, example, path: str, strict: bool = False) -> str:
    """``torch.export.export`` the model and save the program to ``path`` (.pt2)."""
    _eval(model)
    ep = torch.export.export(model, _as_args(example), strict=strict)
    torch.export.save(ep, path)
    return path


def load_exported(path: str) -> nn.Module:
    """Load a program saved by :func:`save_exported`; returns a callable module."""
    if not os.path.exists(path):
        raise ValueError(f"load_exported: no file at {path!r}")
    return torch.export.load(path).module()


# --------------------------------------------------------------------------
# torchao PT2E (optional)
# --------------------------------------------------------------------------


def torchao_version() -> str | None:
    """torchao's version, or None when it is not installed."""
    try:
        logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
        import torchao
    except ImportError:
        return None
    return getattr(torchao, "__version__", "unknown")


def quantize_pt2e(model: nn.Module, example, calibration: Iterable) -> nn.Module:
    """Static INT8 with torchao's PT2E flow for x86 CPUs; returns the converted
    (not yet compiled) module.

    ``torch.export.export(strict=True)`` → ``prepare_pt2e`` with
    ``X86InductorQuantizer`` (per-channel int8 weights, uint8 activations) →
    one forward per calibration batch → ``convert_pt2e``. Run it through
    :func:`compile_frozen` for INT8 kernels; uncompiled it is a float
    simulation of the INT8 numerics.
    """
    if torchao_version() is None:
        raise ImportError("quantize_pt2e needs torchao: pip install torchao (or use quantize_static_onnx)")
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    batches = list(calibration)
    if not batches:
        raise ValueError("calibration is empty: pass a list of input batches, e.g. calibration_batches(data.train)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _eval(model)
        ep = torch.export.export(model, _as_args(example), strict=True)
        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(ep.module(), quantizer)
        # The program is exported for the example's batch size: feed the
        # calibration images in chunks of that size.
        n = _batch_size(_as_args(example))
        with torch.no_grad():
            for b in batches:
                chunks = zip(*(a.split(n) for a in _as_args(b)))
                for chunk in chunks:
                    if _batch_size(chunk) == n:
                        prepared(*chunk)
        return convert_pt2e(prepared)


def pt2e_conv_precision(gm: nn.Module) -> dict:
    """In a converted PT2E graph, how many ``aten.conv2d`` nodes take both
    input and weight from a dequantize node (``int8``) and how many do not."""
    convs = [n for n in gm.graph.nodes if n.op == "call_function" and "conv2d" in str(n.target)]

    def from_dq(arg) -> bool:
        return isinstance(arg, torch.fx.Node) and "dequantize" in str(arg.target)

    int8 = sum(from_dq(n.args[0]) and from_dq(n.args[1]) for n in convs)
    return {"int8": int8, "float": len(convs) - int8}


def compile_frozen(model: nn.Module, example) -> Callable:
    """``torch.compile`` with Inductor's ``freezing`` (weights folded as
    constants, INT8 patterns lowered to oneDNN kernels), compiled here by a
    first call on ``example`` (slow: tens of seconds on two cores).

    The freezing setting is read while compiling, so it is patched in for that
    first call; a later call with another input shape recompiles *without*
    freezing — use the example's shape. (Passing ``options={"freezing": True}``
    to ``torch.compile`` is not enough for PT2E INT8 graphs in torch 2.14: it
    fails on ``onednn.qconv_prepack``.)
    """
    import torch._inductor.config as inductor_config

    compiled = torch.compile(model)
    with inductor_config.patch(freezing=True), torch.no_grad():
        compiled(*_as_args(example))
    return compiled


# --------------------------------------------------------------------------
# Accuracy, agreement, one table row
# --------------------------------------------------------------------------


def agreement(logits: torch.Tensor, reference_logits: torch.Tensor) -> float:
    """Fraction of samples whose arg-max class equals the reference's. Both (N, C)."""
    if logits.shape != reference_logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and reference_logits {tuple(reference_logits.shape)} differ in shape")
    return (logits.argmax(-1) == reference_logits.argmax(-1)).float().mean().item()


@torch.no_grad()
def predict(model: Callable, split, batch_size: int = 256) -> torch.Tensor:
    """Logits (N, C) of ``model`` on every sample of ``split`` (in order)."""
    _eval(model)
    return torch.cat([model(b.x).float().cpu() for b in split.batches(batch_size)])


def variant_row(name: str, model: Callable, split, example, *, size=None, params: int | None = None,
                reference_logits: torch.Tensor | None = None, latency: Latency | None = None,
                runs: int = 100, warmup: int = 10, threads: int | None = None) -> dict:
    """One row of a deployment table: params, size, p50/p99 latency, accuracy
    on ``split`` and agreement with ``reference_logits`` (the float model's).

    ``size`` is what :func:`size_mb` measures (default: ``model`` itself);
    ``latency`` reuses a measurement (e.g. from :func:`compare_latency`).
    """
    logits = predict(model, split)
    lat = latency or measure_latency(model, example, runs=runs, warmup=warmup, threads=threads)
    row = {
        "model": name,
        "params": params if params is not None else (count_params(model) if isinstance(model, nn.Module) else ""),
        "size MB": size_mb(size if size is not None else model),
        "p50 ms": lat.p50_ms,
        "p99 ms": lat.p99_ms,
        "accuracy %": 100 * (logits.argmax(1) == split.labels).float().mean().item(),
    }
    if reference_logits is not None:
        row["agreement %"] = 100 * agreement(logits, reference_logits)
    return row

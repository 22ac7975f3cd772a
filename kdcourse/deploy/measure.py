"""Honest measurements of a deployed model: latency (p50/p99), size on disk,
parameters, multiply-accumulates, accuracy and agreement, one table row.

* **Latency** (:func:`measure_latency`): ``warmup`` untimed calls, then
  ``runs`` calls each timed with ``time.perf_counter``; p50 and p99 in
  milliseconds. PyTorch's thread count is set for the measurement and
  restored afterwards (:func:`kdcourse.runtime.num_threads`); an
  :class:`~kdcourse.deploy.onnx.OnnxModel` has its own thread count, fixed
  when its session is created. ``repeats > 1`` repeats the whole measurement
  and reports the median of the repeats' percentiles; :func:`compare_latency`
  interleaves the repeats of several models, so that a burst of load from
  other programs on a shared CPU hits all of them alike.
* **Size** (:func:`size_mb`): the model serialised to a temporary file
  (``torch.save`` of the state dict, ``torch.export.save``) or the artefact
  file itself, in MB of 10^6 bytes.
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

from ..models import count_params as _count_params
from ..runtime import num_threads
from ._common import DEFAULT_THREADS, _as_args, _batch_size, _eval
from .onnx import OnnxModel

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


def _threads_of(model, threads: int | None) -> int:
    own = getattr(model, "threads", None)
    if isinstance(model, OnnxModel):
        if threads is not None and threads != own:
            raise ValueError(f"threads={threads} but this OnnxModel was created with threads={own}; "
                             f"create it with OnnxModel(path, threads={threads}) (ONNX Runtime fixes threads per session)")
        return own
    return DEFAULT_THREADS if threads is None else threads


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
    return _count_params(model)


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

"""Runtime memory: what a deployed model holds while it answers.

Two measures, because "memory" means two things on a device:

* :func:`activation_bytes` — the tensors a PyTorch model's layers produce
  on one input (forward hooks on every leaf module): their sum (what an
  implementation that keeps every activation would hold) and the largest
  single output (a lower bound on what any implementation must hold at
  once, with its input);
* :func:`peak_rss_mb` — the peak resident set of a fresh process that loads
  an ONNX file in ONNX Runtime and runs it: the memory the operating system
  actually gives a server of this model. Measured in a child process
  (its ``VmHWM`` high-water mark on Linux — ``ru_maxrss`` would include the
  parent's peak, which survives ``exec`` — or ``ru_maxrss`` on macOS), minus the same process's peak just before
  the model is loaded (the Python interpreter, NumPy and ONNX Runtime
  themselves), so each model is measured alone.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn

from ._common import _as_args


@dataclass(frozen=True)
class Activations:
    total_mb: float  # sum of every leaf module's output, MB (10^6 bytes)
    largest_mb: float  # the largest single output
    largest_layer: str
    layers: int  # leaf modules that produced a tensor


def activation_bytes(model: nn.Module, example) -> Activations:
    """Sizes of the outputs of ``model``'s leaf modules on ``example`` (one
    forward pass under ``torch.inference_mode``, eval mode)."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"activation_bytes needs an nn.Module, got {type(model).__name__}")
    sizes: dict[str, int] = {}

    def hook(name):
        def record(_m, _inp, out):
            outs = out if isinstance(out, (tuple, list)) else (out,)
            sizes[name] = sizes.get(name, 0) + sum(t.numel() * t.element_size() for t in outs
                                                   if isinstance(t, torch.Tensor))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if not list(m.children())]
    was = model.training
    model.eval()
    try:
        with torch.inference_mode():
            model(*_as_args(example))
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    if not sizes:
        raise ValueError("activation_bytes: no leaf module produced a tensor")
    largest = max(sizes, key=sizes.get)
    return Activations(sum(sizes.values()) / 1e6, sizes[largest] / 1e6, largest, len(sizes))


_CHILD = r"""
import json, resource, sys
import numpy as np
import onnxruntime as ort
path, shape, runs, threads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def peak():
    try:  # Linux: the high-water mark of this process's own memory map (exec starts a new one)
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    except OSError:  # macOS: ru_maxrss is in bytes there
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
before = peak()
opts = ort.SessionOptions()
opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
name = sess.get_inputs()[0].name
for _ in range(runs):
    sess.run(None, {name: x})
after = peak()
print(json.dumps({"before": before, "after": after}))
"""


@dataclass(frozen=True)
class PeakRss:
    model_mb: float  # peak RSS growth from loading and running the model
    process_mb: float  # the whole process's peak RSS
    baseline_mb: float  # the process before the model (interpreter + NumPy + ONNX Runtime)


def peak_rss_mb(path: str, input_shape, runs: int = 20, threads: int = 2, timeout: float = 120.0) -> PeakRss:
    """Peak resident memory of a fresh process that loads the ONNX file
    ``path`` and runs it ``runs`` times on a float32 input of
    ``input_shape`` (see the module docstring)."""
    if not os.path.exists(path):
        raise ValueError(f"peak_rss_mb: no file at {path!r}")
    shape = [int(s) for s in input_shape]
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"input_shape must be positive sizes, e.g. (1, 3, 32, 32), got {input_shape!r}")
    if not isinstance(runs, int) or runs < 1:
        raise ValueError(f"runs must be an int >= 1, got {runs!r}")
    proc = subprocess.run([sys.executable, "-c", _CHILD, os.fspath(path), json.dumps(shape), str(runs), str(threads)],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"peak_rss_mb: the measuring process failed: {proc.stderr.strip()[-500:]}")
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    return PeakRss((got["after"] - got["before"]) / 1e6, got["after"] / 1e6, got["before"] / 1e6)

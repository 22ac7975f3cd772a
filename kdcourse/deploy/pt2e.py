"""``torch.export`` artefacts and torchao's PT2E static INT8 (optional,
``pip install torchao``): ``torch.export(strict=True)``, ``X86InductorQuantizer``,
calibration, ``convert_pt2e``, then :func:`compile_frozen` (``torch.compile``
with Inductor's ``freezing``). Without compilation the converted model runs
its quantize/dequantize pairs in float: correct numerics, no speed."""
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

from ._common import _as_args, _batch_size, _eval
from .onnx import _quiet

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

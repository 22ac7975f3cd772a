"""Lab 5 checks, second part: affine quantization by hand.

Two exercises: ``qparams(x_min, x_max, qmin, qmax)`` (the scale and zero
point that map the range [x_min, x_max] onto the integers qmin..qmax) and
``fake_quantize(x, scale, zero_point, qmin, qmax, axis=None)`` (quantize,
clamp, dequantize; per tensor or per channel along ``axis``).

As in :mod:`kdcourse.checks.lab3_recipe`, the visible checks run the
exercise's probe (the grader's) on a few seeds and decide from that plain
data. Quantization has no useful gradient (rounding), so the probes record
values, integer-ness and in-place changes of the inputs.
"""
from __future__ import annotations

from typing import Callable

import torch

from .contract import draw_int
from . import CheckFailed, contract
from .lab3_recipe import INPLACE, visible_check

QRANGES = ((-128, 127), (0, 255), (-127, 127))


# --------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------

def qparams(x_min, x_max, qmin: int, qmax: int):
    """Asymmetric affine quantization parameters.

    The range is first widened to contain 0 (so that 0 is exactly
    representable: padding, ReLU outputs), then
    ``scale = (x_max - x_min) / (qmax - qmin)`` and
    ``zero_point = round(qmin - x_min / scale)``. An empty range (all zeros)
    gets ``scale = 1, zero_point = 0`` (ONNX Runtime's rule). ``x_min`` and
    ``x_max`` are numbers (per tensor) or tensors of shape (C,) (per channel).
    Returns ``(scale, zero_point)`` as float64 and int64 tensors.
    """
    lo = torch.clamp(torch.as_tensor(x_min, dtype=torch.float64), max=0.0)
    hi = torch.clamp(torch.as_tensor(x_max, dtype=torch.float64), min=0.0)
    scale = (hi - lo) / (qmax - qmin)
    empty = scale <= torch.finfo(torch.float32).tiny
    scale = torch.where(empty, torch.ones_like(scale), scale)
    zp = torch.where(empty, torch.zeros_like(scale), torch.round(qmin - lo / scale))
    return scale, zp.clamp(qmin, qmax).to(torch.int64)


def _along(t: torch.Tensor, x: torch.Tensor, axis):
    t = torch.as_tensor(t, dtype=x.dtype if t is not None and torch.as_tensor(t).is_floating_point() else None)
    if axis is None:
        return t
    shape = [1] * x.ndim
    shape[axis] = -1
    return t.reshape(shape)


def fake_quantize(x: torch.Tensor, scale, zero_point, qmin: int, qmax: int, axis=None):
    """``q = clamp(round(x / scale) + zero_point, qmin, qmax)`` and
    ``x_hat = (q - zero_point) * scale``; ``scale`` and ``zero_point`` are
    numbers / 0-dim tensors (``axis=None``) or tensors of shape
    ``(x.shape[axis],)`` broadcast along ``axis``. Returns ``(q, x_hat)``:
    q as int64, x_hat with x's dtype."""
    s = _along(torch.as_tensor(scale, dtype=x.dtype), x, axis)
    z = _along(torch.as_tensor(zero_point, dtype=torch.int64), x, axis)
    q = torch.clamp(torch.round(x / s).to(torch.int64) + z, qmin, qmax)
    return q, (q - z).to(x.dtype) * s


# --------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------

def _as_numbers(v, name: str) -> torch.Tensor:
    try:
        import numpy as np

        return torch.as_tensor(np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float64))
    except (TypeError, ValueError):
        raise contract.PlainDataError(f"{name} must be a number or a tensor of numbers, got {type(v).__name__}") from None


def _pair(out, what: str):
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise contract.PlainDataError(f"{what} must return a pair, got {type(out).__name__}")
    return out


def probe_qparams(fn: Callable, seed: int) -> dict:
    """Per-tensor ranges as Python floats and as 0-dim tensors, per-channel
    ranges as (C,) tensors — including a range above 0, one below 0 and an
    all-zero channel — for the int8, uint8 and symmetric-int8 ranges."""
    g = contract.generator(seed)
    qmin, qmax = QRANGES[seed % 3]
    c = 3 + seed % 4
    lo = -torch.rand(c, generator=g, dtype=torch.float64) * 3
    hi = torch.rand(c, generator=g, dtype=torch.float64) * 2
    lo[0], hi[0] = 0.25, 1.5  # all positive: 0 must be brought into the range
    lo[1], hi[1] = -2.0, -0.5  # all negative
    if seed % 2:
        lo[2], hi[2] = 0.0, 0.0  # a dead channel
    cases = {"floats": (float(lo[-1]), float(hi[-1])), "0-dim tensors": (lo[-1].clone(), hi[-1].clone()),
             "per channel": (lo.clone(), hi.clone())}
    out = {"case": f"qmin, qmax = {qmin}, {qmax}; per-channel ranges {[(round(float(a), 3), round(float(b), 3)) for a, b in zip(lo, hi)]}"}
    for name, (a, b) in cases.items():
        before = [v.clone() if isinstance(v, torch.Tensor) else v for v in (a, b)]
        got, raised = contract.attempt(fn, a, b, qmin, qmax)
        if any(isinstance(v, torch.Tensor) and not torch.equal(v, w) for v, w in zip((a, b), before)):
            return {INPLACE: ["x_min/x_max"], "case": out["case"]}
        if raised:
            out[name] = raised
            continue
        scale, zp = _pair(got, "qparams")
        scale, zp = _as_numbers(scale, "scale"), _as_numbers(zp, "zero_point")
        whole = bool(torch.isfinite(zp).all() and (zp == torch.round(zp)).all())
        out[name] = {"scale": contract.plain(scale.reshape(-1)), "zero_point": contract.plain(zp.reshape(-1)),
                     "zero_point whole numbers": whole}
    return out


def probe_fake_quantize(fn: Callable, seed: int) -> dict:
    """A conv weight (O, I, k, k) per channel along axis 0, an activation
    (N, C, H, W) per channel along axis 1 or -3, a vector per tensor (numbers
    and 0-dim tensors); scales from a narrower range than the data, so that
    clamping matters; int8 and uint8 ranges."""
    g = contract.generator(seed)
    qmin, qmax = QRANGES[seed % 2]
    out = {"case": f"qmin, qmax = {qmin}, {qmax}"}
    o, i = 2 + seed % 3, 1 + seed % 2
    w = torch.randn(o, i, 3, 3, generator=g, dtype=torch.float64)
    act = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64).abs() * 2
    vec = torch.randn(11, generator=g, dtype=torch.float64) * 4
    cases = {
        "conv weight, per channel (axis=0)": (w, torch.rand(o, generator=g, dtype=torch.float64) * 0.02 + 0.005,
                                              torch.randint(qmin, qmin + 40, (o,), generator=g), 0),
        "activation, per channel (axis=1)": (act, torch.rand(3, generator=g, dtype=torch.float64) * 0.02 + 0.01,
                                             torch.randint(qmin, qmin + 10, (3,), generator=g), 1 if seed % 2 else -3),
        "vector, per tensor (numbers)": (vec, 0.03, draw_int(g, qmin + 60, qmin + 200), None),
        "vector, per tensor (0-dim tensors)": (vec, torch.tensor(0.021, dtype=torch.float64),
                                               torch.tensor(qmin + 100), None),
    }
    for name, (x, s, z, axis) in cases.items():
        x = x.clone()
        before = x.clone()
        got, raised = contract.attempt(fn, x, s, z, qmin, qmax, axis=axis)
        if not torch.equal(x, before):
            return {INPLACE: ["x"], "case": out["case"] + f", {name}"}
        if raised:
            out[name] = raised
            continue
        q, x_hat = _pair(got, "fake_quantize")
        q, x_hat = _as_numbers(q, "q"), _as_numbers(x_hat, "x_hat")
        out[name] = {"q": contract.plain(q), "x_hat": contract.plain(x_hat),
                     "q whole numbers": bool(torch.isfinite(q).all() and (q == torch.round(q)).all()),
                     "q in range": bool(((q >= qmin) & (q <= qmax)).all())}
    return out


# --------------------------------------------------------------------------
# Known-wrong variants
# --------------------------------------------------------------------------

def _qp(include_zero=True, round_zp=True, zp_sign=1, denom="range", empty_rule=True):
    def f(x_min, x_max, qmin, qmax):
        lo, hi = torch.as_tensor(x_min, dtype=torch.float64), torch.as_tensor(x_max, dtype=torch.float64)
        if include_zero:
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = (hi - lo) / ((qmax - qmin) if denom == "range" else qmax)
        if empty_rule:
            scale = torch.where(scale <= 0, torch.ones_like(scale), scale)
        zp = qmin - lo / scale if zp_sign > 0 else qmin + lo / scale
        zp = torch.round(zp) if round_zp else zp
        return scale, zp
    return f


QPARAMS_VARIANTS = {
    "no_zero": (_qp(include_zero=False),
                "the range is used as it is: widen it to contain 0 first (x_min = min(x_min, 0), x_max = max(x_max, 0)) "
                "so that 0 — padding, a ReLU's output — is represented exactly."),
    "zp_not_rounded": (_qp(round_zp=False),
                       "the zero point is not a whole number: it is the integer that stands for 0.0, "
                       "round(qmin - x_min / scale)."),
    "zp_sign": (_qp(zp_sign=-1),
                "the zero point has the wrong sign: x = scale * (q - zero_point), so x_min maps to qmin when "
                "zero_point = qmin - x_min / scale."),
    "over_qmax": (_qp(denom="qmax"),
                  "the scale divides by qmax; the range [x_min, x_max] is spread over all qmax - qmin steps."),
    "empty_range": (_qp(empty_rule=False),
                    "an all-zero channel gives scale 0 and a zero point of 0/0 = NaN: when the range is empty use "
                    "scale = 1 and zero_point = 0 (ONNX Runtime's rule)."),
}


def _fq(rounding="round", clamp=True, zp_where="before", dequant_zp=True, axis_rule="axis"):
    def f(x, scale, zero_point, qmin, qmax, axis=None):
        ax = axis if axis_rule == "axis" else (0 if axis is not None else None)
        s = _along(torch.as_tensor(scale, dtype=x.dtype), x, ax)
        z = _along(torch.as_tensor(zero_point, dtype=torch.int64), x, ax)
        r = {"round": torch.round, "trunc": torch.trunc, "floor": torch.floor}[rounding](x / s)
        if zp_where == "before":
            q = r + z
            q = q.clamp(qmin, qmax) if clamp else q
        elif zp_where == "after":
            q = r.clamp(qmin, qmax) + z
        else:
            q = (r - z).clamp(qmin, qmax)
        x_hat = (q - z) * s if dequant_zp else q * s
        return q.to(torch.int64), x_hat.to(x.dtype)
    return f


FAKE_QUANTIZE_VARIANTS = {
    "no_clamp": (_fq(clamp=False),
                 "values outside the range are not clamped: an int8 tensor cannot hold them, clamp q to [qmin, qmax] "
                 "(the saturation error is part of quantization)."),
    "trunc": (_fq(rounding="trunc"),
              "x / scale is truncated (.long() / int()), not rounded: use torch.round first."),
    "floor": (_fq(rounding="floor"),
              "x / scale is floored, not rounded: use torch.round."),
    "zp_after_clamp": (_fq(zp_where="after"),
                       "the zero point is added after clamping: q = clamp(round(x / scale) + zero_point, qmin, qmax)."),
    "zp_subtracted": (_fq(zp_where="minus"),
                      "the zero point is subtracted when quantizing: q = round(x / scale) + zero_point, and "
                      "x_hat = (q - zero_point) * scale."),
    "dequant_no_zp": (_fq(dequant_zp=False),
                      "dequantization forgets the zero point: x_hat = (q - zero_point) * scale."),
    "axis_0_only": (_fq(axis_rule="first"),
                    "the per-channel scale is always broadcast along the first dimension: reshape it so that it "
                    "runs along `axis` (shape [1, ..., C, ..., 1])."),
}


def check_qparams(fn: Callable) -> bool:
    """``fn(x_min, x_max, qmin, qmax) -> (scale, zero_point)`` must agree with
    :func:`qparams` on numbers, 0-dim and (C,) tensors."""
    from . import lab5

    return visible_check(_declared(lab5, "qparams"), fn, seeds=(0, 1, 2, 3, 4, 5), what="every value")


def check_fake_quantize(fn: Callable) -> bool:
    """``fn(x, scale, zero_point, qmin, qmax, axis=None) -> (q, x_hat)`` must
    agree with :func:`fake_quantize` per tensor and per channel."""
    from . import lab5

    return visible_check(_declared(lab5, "fake_quantize"), fn, what="every value")


def _declared(module, name: str) -> contract.Exercise:
    for ex in module.EXERCISES:
        if ex.name == name:
            return ex
    raise CheckFailed(f"no exercise {name!r} is declared")  # pragma: no cover

"""Lab 5 checks on the exercise contract: a model's size on disk, the
statistics a latency table reports, and the range a calibration observer
records.

* ``state_dict_mb(model)``: the bytes ``torch.save`` writes for its
  ``state_dict``, in MB (10^6 bytes) — buffers, float64 and int8 weights
  included, which "parameters x 4 bytes" gets wrong.
* ``latency_summary(times_ms, min_calls=1000)`` → ``{"p50", "tail", "tail_ms"}``:
  the median, and the 99th percentile only where there are at least
  ``min_calls`` calls — otherwise the slowest call, labelled ``"max of n"``
  (a p99 of 20 calls is an interpolation between the two slowest).
* ``observe_range(batches, percentile=None)`` → ``(x_min, x_max)`` over every
  value of every calibration batch: the minimum and maximum, or the
  ``(100 − p)``-th and ``p``-th percentiles (which clip rare outliers so the
  8-bit grid is finer where the values are).

Both visible checks run the grader's probe and decide as the grader does.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .contract import draw_int
from . import CheckFailed, contract
from .lab4_common import _attempt  # the probes' attempt that keeps the message


def _digest(tensors) -> list:
    return [contract.plain(t.detach().clone()) for t in tensors]


def _inputs_changed(before: list, tensors) -> bool:
    return any(not torch.equal(b, t.detach()) for b, t in zip(before, tensors))


def _decide(exercise, fn, seeds) -> None:
    """The student's probe data against the reference's and the variants', as
    the grader decides; a named mistake first, then an exception or an
    in-place change of an input, each said as such."""
    student = {s: contract.run_probe(exercise, fn, s) for s in seeds}
    reference = {s: contract.run_probe(exercise, exercise.reference, s) for s in seeds}
    variants = lambda name, seed: contract.run_probe(exercise, exercise.variants[name][0], seed)  # noqa: E731
    v = contract.diagnose_data(exercise, student, reference, variants)
    if v.ok:
        return
    if v.variant is None:
        for data in student.values():
            if data.get("raised"):
                raise CheckFailed(f"{exercise.name} raised {data['raised']} on a check input"
                                  + (f": {data['message']}" if data.get("message") else ""))
            if data.get("inputs_changed_in_place"):
                raise CheckFailed(f"{exercise.name} changes its inputs in place: the caller's timings / batches are "
                                  "not yours to change — compute new values instead.")
    raise CheckFailed(v.hint.replace("on a hidden test", "on a check input"))


def _faults_then(rtol: float, atol: float):
    """``compare``: an in-place change or an exception first, then the values."""
    def compare(student, other, seed=0):
        for f in ("inputs_changed_in_place", "raised"):
            fs, fo = student.get(f), other.get(f)
            if fs or fo:
                return None if fs == fo else f"{f}: {fs!r} vs {fo!r}"
        return contract.compare(student, other, rtol, atol)
    return compare


def _number(x):
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return float(x)
    if hasattr(x, "item") and type(x).__module__ == "numpy":
        return float(x.item())
    return float(x) if type(x) in (int, float) else None


# --------------------------------------------------------------------------
# Exercise: the latency table's statistics
# --------------------------------------------------------------------------

def reference_latency_summary(times_ms, min_calls=1000):
    """The median, and p99 where ``len(times_ms) >= min_calls``, else the slowest call."""
    t = np.asarray(list(times_ms), dtype=np.float64)
    n = len(t)
    out = {"p50": float(np.percentile(t, 50))}
    if n >= min_calls:
        return {**out, "tail": f"p99 of {n}", "tail_ms": float(np.percentile(t, 99))}
    return {**out, "tail": f"max of {n}", "tail_ms": float(t.max())}


def _summary_variant(kind: str):
    def summary(times_ms, min_calls=1000):
        if kind == "sort_in_place":
            times_ms.sort()
        t = np.asarray(list(times_ms), dtype=np.float64)
        n = len(t)
        p50 = float(t.mean()) if kind == "mean" else float(np.median(t))
        p99 = {"tail": f"p99 of {n}", "tail_ms": float(np.percentile(t, 99))}
        slowest = {"tail": f"max of {n}", "tail_ms": float(t.max())}
        if kind == "p99_always":
            tail = p99
        elif kind == "max_always":
            tail = slowest
        elif kind == "strict":
            tail = p99 if n > min_calls else slowest
        else:
            tail = p99 if n >= min_calls else slowest
        if kind == "no_n":
            tail = {"tail": tail["tail"].split(" of ")[0], "tail_ms": tail["tail_ms"]}
        return {"p50": p50, **tail}
    return summary


SUMMARY_VARIANTS = {
    "p99_always": (_summary_variant("p99_always"),
                   "with fewer than min_calls calls a 99th percentile is an interpolation between the slowest calls, "
                   "not a tail: report the slowest call instead, labelled 'max of n'."),
    "max_always": (_summary_variant("max_always"),
                   "with at least min_calls calls report the 99th percentile (np.percentile(times, 99), labelled "
                   "'p99 of n'): the single slowest of thousands of calls is one outlier, not the tail."),
    "mean": (_summary_variant("mean"), "the p50 is the median, not the mean: a few slow calls pull the mean up."),
    "strict": (_summary_variant("strict"),
               "at exactly min_calls calls the p99 is already reported: the rule is len(times_ms) >= min_calls."),
    "no_n": (_summary_variant("no_n"),
             "the label names the estimate AND the number of calls it came from: 'p99 of 1200' or 'max of 20'."),
    "sort_in_place": (_summary_variant("sort_in_place"),
                      "sorts the caller's list in place (times_ms.sort()): the timings are not yours to reorder — "
                      "use sorted(times_ms), np.sort or np.percentile, which leave it as it was."),
}


def probe_latency_summary(fn: Callable, seed: int = 0) -> dict:
    """Seeded skewed timings (a few slow calls) of 5 to 2,500 calls, with
    ``len == min_calls`` and ``len == min_calls - 1`` among them: what the
    student returned, and whether the list was changed."""
    g = contract.generator(seed)
    cases = [(20, 1000), (1000, 1000), (999, 1000), (2500, 1000), (60, 50), (5, 5)]
    out = []
    for i, (n, min_calls) in enumerate(cases[seed % 2::2] + cases[(seed + 1) % 2::2][:1]):
        base = 2.0 + float(torch.rand(1, generator=g)) * 8
        t = base * (1 + 0.05 * torch.randn(n, generator=g, dtype=torch.float64).abs())
        slow = torch.randint(0, n, (max(1, n // 200),), generator=g)
        t[slow] *= 3 + 5 * torch.rand(len(slow), generator=g, dtype=torch.float64)
        times = t.tolist()
        given = list(times)
        got, fault = _attempt(fn, given, min_calls=min_calls)
        changed = given != times
        if fault:
            return {**fault, "inputs_changed_in_place": changed}
        if not isinstance(got, dict) or not {"p50", "tail", "tail_ms"} <= set(got):
            return {"raised": "not a dict with the keys 'p50', 'tail' and 'tail_ms'", "inputs_changed_in_place": changed}
        p50, tail_ms = _number(got["p50"]), _number(got["tail_ms"])
        if p50 is None or tail_ms is None or not isinstance(got["tail"], str):
            return {"raised": "p50 and tail_ms must be numbers, tail a string", "inputs_changed_in_place": changed}
        out.append({"p50": p50, "tail": got["tail"].strip(), "tail_ms": tail_ms, "changed": changed})
    return {"inputs_changed_in_place": any(o.pop("changed") for o in out), "cases": out}


def check_latency_summary(fn: Callable) -> bool:
    """``fn(times_ms, min_calls=1000)``: the median, and the p99 (>= min_calls calls) or the slowest call."""
    _decide(contract.exercise(5, "latency_summary"), fn, seeds=(0, 1))
    print("✓ latency_summary: the median, a p99 only from at least min_calls calls (the boundary included), "
          "otherwise the slowest call named 'max of n' — on 8 seeded sets of 5 to 2,500 timings")
    return True


# --------------------------------------------------------------------------
# Exercise: the range a calibration observer records
# --------------------------------------------------------------------------

def reference_observe_range(batches, percentile=None):
    """(x_min, x_max) over all values of all batches; with ``percentile`` p, the
    (100 − p)-th and p-th percentiles (linear interpolation) instead."""
    x = torch.cat([b.detach().reshape(-1).double() for b in batches])
    if percentile is None:
        return float(x.min()), float(x.max())
    q = torch.tensor([100.0 - percentile, percentile], dtype=torch.float64) / 100.0
    lo, hi = torch.quantile(x, q)
    return float(lo), float(hi)


def _range_variant(kind: str):
    def observe(batches, percentile=None):
        flat = [b.detach().reshape(-1).double() for b in batches]
        x = torch.cat(flat)
        if kind == "first_batch":
            x = flat[0]
        if kind == "batch_mean":
            return float(torch.stack([f.min() for f in flat]).mean()), float(torch.stack([f.max() for f in flat]).mean())
        if kind == "symmetric":
            m = float(x.abs().max())
            return -m, m
        if percentile is None or kind == "ignore_percentile":
            return float(x.min()), float(x.max())
        if kind == "fraction":
            lo, hi = torch.quantile(x, torch.tensor([100.0 - percentile, percentile], dtype=torch.float64))
            return float(lo), float(hi)
        if kind == "one_sided":
            return float(x.min()), float(torch.quantile(x, percentile / 100.0))
        if kind == "per_batch_percentile":
            q = torch.tensor([100.0 - percentile, percentile], dtype=torch.float64) / 100.0
            both = torch.stack([torch.quantile(f, q) for f in flat]).mean(0)
            return float(both[0]), float(both[1])
        q = torch.tensor([100.0 - percentile, percentile], dtype=torch.float64) / 100.0
        lo, hi = torch.quantile(x, q)
        return float(lo), float(hi)
    return observe


RANGE_VARIANTS = {
    "batch_mean": (_range_variant("batch_mean"),
                   "this averages each batch's minimum and maximum (a moving-average observer): the range of the "
                   "calibration set is the minimum and maximum over ALL its values — torch.cat the batches first."),
    "first_batch": (_range_variant("first_batch"),
                    "only the first batch is observed: every calibration batch must count (torch.cat them all)."),
    "symmetric": (_range_variant("symmetric"),
                  "(-max|x|, max|x|) is the symmetric range used for int8 weights; an activation's observer records "
                  "its own minimum and maximum (a ReLU output's minimum is 0)."),
    "ignore_percentile": (_range_variant("ignore_percentile"),
                          "the percentile is ignored: with percentile=p return the (100 - p)-th and p-th percentiles "
                          "of all values (torch.quantile(x, q / 100) or np.percentile(x, q))."),
    "fraction": (_range_variant("fraction"),
                 "percentile is in percent (99.99); torch.quantile takes a fraction in [0, 1]: divide by 100."),
    "one_sided": (_range_variant("one_sided"),
                  "only the top is clipped: x_min is the (100 - p)-th percentile, x_max the p-th — both ends."),
    "per_batch_percentile": (_range_variant("per_batch_percentile"),
                             "the percentiles are taken per batch and averaged: take them over all the values of "
                             "all batches at once (torch.cat, then torch.quantile)."),
}


def probe_observe_range(fn: Callable, seed: int = 0) -> dict:
    """Two to five seeded float32 batches (B, C, H, W) of different sizes and
    ranges, with rare outliers, observed with ``percentile=None`` and a
    seeded p (99, 99.9, 99.99): the two numbers, and whether a batch changed."""
    g = contract.generator(seed)
    k = 2 + seed % 4
    batches = []
    for i in range(k):
        b = 1 + draw_int(g, 0, 4)
        x = torch.randn(b, 3, 5, 5, generator=g) * (0.5 + i) + 0.3 * i
        if seed % 2 == 0:
            x = x.clamp_min(0)  # a ReLU output: its minimum is 0
        x.view(-1)[torch.randint(0, x.numel(), (2,), generator=g)] *= 30.0  # rare outliers
        batches.append(x)
    before = _digest(batches)
    out = {}
    for key, p in (("minmax", None), ("percentile", [99.0, 99.9, 99.99][seed % 3])):
        got, fault = _attempt(fn, list(batches), percentile=p)
        changed = _inputs_changed([contract.as_tensor(b) for b in before], batches)
        if fault:
            return {**fault, "inputs_changed_in_place": changed}
        if not isinstance(got, (tuple, list)) or len(got) != 2 or None in (_number(got[0]), _number(got[1])):
            return {"raised": "not a pair of numbers (x_min, x_max)", "inputs_changed_in_place": changed}
        out[key] = [_number(got[0]), _number(got[1])]
        out["inputs_changed_in_place"] = out.get("inputs_changed_in_place", False) or changed
    return out


def check_observe_range(fn: Callable) -> bool:
    """``fn(batches, percentile=None)``: the min and max (or the (100 − p)-th and
    p-th percentiles) of every value of every batch."""
    _decide(contract.exercise(5, "observe_range"), fn, seeds=(0, 1, 2, 3))
    print("✓ observe_range: the minimum and maximum over all calibration batches, and the (100 − p)-th / p-th "
          "percentiles of all their values (2–5 batches with outliers, p = 99, 99.9, 99.99)")
    return True


# --------------------------------------------------------------------------
# Exercise: a model's size on disk
# --------------------------------------------------------------------------

def reference_state_dict_mb(model):
    """MB (10^6 bytes) of ``model.state_dict()`` saved with ``torch.save``."""
    import io

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes / 1e6


def _size_variant(kind: str):
    def state_dict_mb(model):
        if kind == "params_x4":
            return sum(p.numel() for p in model.parameters()) * 4 / 1e6
        if kind == "numel":
            return sum(t.numel() for t in model.state_dict().values() if isinstance(t, torch.Tensor)) / 1e6
        import io

        buffer = io.BytesIO()  # the variant's own copy: the reference refuses to run in the grading kernel
        torch.save(model.state_dict(), buffer)
        n = buffer.getbuffer().nbytes
        return n / 2 ** 20 if kind == "mebibytes" else n / 1e3
    return state_dict_mb


SIZE_VARIANTS = {
    "params_x4": (_size_variant("params_x4"),
                  "parameters x 4 bytes is not the file: it misses the buffers (batch-norm statistics), float64 "
                  "weights take 8 bytes, and a quantized Linear's int8 weights are not parameters at all. Save the "
                  "state_dict (torch.save into an io.BytesIO, or a file) and count its bytes."),
    "numel": (_size_variant("numel"), "this counts elements, not bytes: a float32 takes 4 bytes, an int8 one."),
    "mebibytes": (_size_variant("mebibytes"), "MB here is 10^6 bytes (the course's tables and ONNX files); 2^20 bytes is a MiB."),
    "kilobytes": (_size_variant("kilobytes"), "divide the bytes by 10^6 (MB), not 10^3 (kB)."),
}


def _size_models(seed: int):
    import warnings

    import torch.nn as nn

    torch.manual_seed(seed)
    w = 32 + 16 * (seed % 3)
    conv = nn.Sequential(nn.Conv2d(3, w, 3), nn.BatchNorm2d(w), nn.ReLU(), nn.Flatten(), nn.Linear(w, 3000))
    wide = nn.Linear(120 + 10 * (seed % 5), 400).double()
    buffered = nn.Linear(50, 50)
    buffered.register_buffer("table", torch.zeros(200_000 + 1000 * (seed % 5)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(512, 512), nn.ReLU(),
                                                                         nn.Linear(512, 256)), {nn.Linear},
                                                           dtype=torch.qint8)
    return {"float32 conv + batch norm": conv, "float64 Linear": wide, "a registered buffer": buffered,
            "dynamically quantized Linears": quantized}


def probe_state_dict_mb(fn: Callable, seed: int = 0) -> dict:
    """Four seeded models (float32 with batch norm, float64, a large buffer,
    int8 dynamically quantized): the MB returned for each."""
    out = {}
    for name, model in _size_models(seed).items():
        got, fault = _attempt(fn, model)
        if fault:
            return fault
        if _number(got) is None:
            return {"raised": f"not a number: {type(got).__name__}"}
        out[name] = _number(got)
    return out


def _size_compare(student, other, seed=0):
    """Within 1.5 % (the archive's file names change a saved file by a few hundred bytes, under 0.5 % of
    these models)."""
    if student.get("raised") or other.get("raised"):
        return None if student.get("raised") == other.get("raised") else f"raised: {student.get('raised')!r}"
    return contract.compare(student, other, rtol=0.015, atol=0.0)


def check_state_dict_mb(fn: Callable) -> bool:
    """``fn(model)``: MB of its state_dict saved with torch.save."""
    _decide(contract.exercise(5, "state_dict_mb"), fn, seeds=(0, 1))
    print("✓ state_dict_mb: the bytes torch.save writes for the state_dict, in MB (10^6), on float32, float64, "
          "buffered and int8 models (within 1.5 %: a file's name changes its size by a few hundred bytes)")
    return True


EXERCISES = {
    "state_dict_mb": contract.Exercise(
        name="state_dict_mb", points=1.0, check=check_state_dict_mb, probe=probe_state_dict_mb,
        reference=reference_state_dict_mb, variants=SIZE_VARIANTS, hidden_seeds=(0, 1, 2), compare=_size_compare),
    "latency_summary": contract.Exercise(
        name="latency_summary", points=1.0, check=check_latency_summary, probe=probe_latency_summary,
        reference=reference_latency_summary, variants=SUMMARY_VARIANTS, hidden_seeds=(0, 1, 2, 3),
        compare=_faults_then(1e-9, 1e-12)),
    "observe_range": contract.Exercise(
        name="observe_range", points=1.0, check=check_observe_range, probe=probe_observe_range,
        reference=reference_observe_range, variants=RANGE_VARIANTS, hidden_seeds=tuple(range(6)),
        compare=_faults_then(1e-5, 1e-6)),
}

__all__ = ["CheckFailed", "EXERCISES", "RANGE_VARIANTS", "SIZE_VARIANTS", "SUMMARY_VARIANTS", "check_latency_summary",
           "check_observe_range", "check_state_dict_mb", "probe_state_dict_mb", "reference_state_dict_mb", "probe_latency_summary", "probe_observe_range", "reference_latency_summary",
           "reference_observe_range"]

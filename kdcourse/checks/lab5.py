"""Lab 5 checks: which layers are still float, timing a model, calibration
data, static INT8.

Each check runs the student's function (or inspects what it produced), prints
one ``✓`` line when it is right, and otherwise raises :class:`CheckFailed`
naming the usual mistake.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn as nn

from .contract import draw_int
from . import CheckFailed, contract

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
# Declarations (kdcourse.checks.contract): what the grader probes
# --------------------------------------------------------------------------

def _random_tree(g: torch.Generator, depth: int = 0) -> nn.Module:
    """A random nest of Sequentials holding Conv2d, Linear and other layers."""
    parts = []
    for _ in range(1 + draw_int(g, 0, 4)):
        r = draw_int(g, 0, 6)
        if r == 0 and depth < 2:
            parts.append(_random_tree(g, depth + 1))
        elif r in (1, 2):
            parts.append(nn.Linear(3, 3))
        elif r == 3:
            parts.append(nn.Conv2d(2, 2, 1))
        else:
            parts.append([nn.ReLU(), nn.BatchNorm1d(3), nn.Identity()][max(r - 4, 0)])  # r == 0 at depth 2: a ReLU
    return nn.Sequential(*parts)


def probe_float_layers(fn: Callable, seed: int) -> list:
    """A seeded random nest of layers, the same after quantize_dynamic, and
    (every other seed) a model of the course: the counts returned for each."""
    import warnings

    from torch.ao.quantization import quantize_dynamic

    from ..models import build

    g = contract.generator(seed)
    tree = _random_tree(g)
    cases = [tree]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases.append(quantize_dynamic(_random_tree(contract.generator(seed + 1)).eval(), {nn.Linear}, dtype=torch.qint8))
        if seed % 2 == 0:
            cases.append(build({"arch": "cnn", "widths": (4, 8, 16)}, 10))
        else:
            cases.append(quantize_dynamic(build({"arch": "resnet", "depth": 8, "width": 4}, 10).eval(), {nn.Linear},
                                          dtype=torch.qint8))
    out = []
    for model in cases:
        got, raised = contract.attempt(fn, model)
        if raised:
            out.append(raised)
        elif not isinstance(got, dict):
            raise contract.PlainDataError(f"float_layers must return a dict, got {type(got).__name__}")
        else:
            out.append({str(k): (int(v) if isinstance(v, int) or (isinstance(v, torch.Tensor) and v.numel() == 1)
                                 else f"not a count: {type(v).__name__}") for k, v in got.items()})
    return out


FLOAT_LAYERS_VARIANTS = {
    "by_name": (_by_name, "a dynamically quantized Linear is a class that is *also named* 'Linear' "
                          "(torch.ao.nn.quantized.dynamic.Linear): comparing type names counts it as float. "
                          "Use isinstance(m, nn.Linear)."),
    "children_only": (_children_only, "only the top-level children are counted: layers sit inside Sequential "
                                      "blocks. Use model.modules(), which walks the whole tree."),
}


def reference_latency_ms(model, x, runs=100, warmup=10):
    """The reference answer of ``latency_ms`` (refused in the grading kernel)."""
    import numpy as np

    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        for _ in range(runs):
            t0 = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t0) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def _latency_variant(unit=1000.0, warm=True, timed_warm=False, grad=False, stat="percentile", swap=False):
    import numpy as np

    def latency(model, x, runs=100, warmup=10):
        times = []
        ctx = torch.enable_grad() if grad else torch.inference_mode()
        with ctx:
            for _ in range(warmup if warm else 0):
                t0 = time.perf_counter()
                model(x)
                if timed_warm:
                    times.append((time.perf_counter() - t0) * unit)
            for _ in range(runs):
                t0 = time.perf_counter()
                model(x)
                times.append((time.perf_counter() - t0) * unit)
        p50 = float(np.mean(times)) if stat == "mean" else float(np.percentile(times, 50))
        p99 = float(np.percentile(times, 99))
        return (p99, p50) if swap else (p50, p99)
    return latency


LATENCY_VARIANTS = {
    "no_warmup": (_latency_variant(warm=False), "the warm-up calls are missing: call the model `warmup` times "
                                                "(untimed) before timing `runs` calls."),
    "timed_warmup": (_latency_variant(timed_warm=True), "the warm-up calls were timed too: time only the calls "
                                                        "after the warm-up."),
    "seconds": (_latency_variant(unit=1.0), "the times look like seconds — multiply by 1000 to report milliseconds."),
    "grad": (_latency_variant(grad=True), "the model ran with autograd enabled: wrap the calls in "
                                          "torch.inference_mode() (or torch.no_grad())."),
    "mean": (_latency_variant(stat="mean"), "the p50 is the median (np.percentile(times, 50)), not the mean, which "
                                            "the slow calls pull up."),
    "swapped": (_latency_variant(swap=True), "p50 and p99 are swapped: return (p50, p99)."),
}


def probe_latency_ms(fn: Callable, seed: int) -> dict:
    """A fake model with seeded known timings (cold warm-up calls, then fast
    calls with slow ones among them): the two numbers returned, how many
    calls the model got and whether autograd was on."""
    warmup, runs = 2 + seed % 3, 15 + 5 * (seed % 2)
    fake = _ScriptedModel(warmup, fast_s=0.001 * (1 + seed % 2), slow_s=0.03 + 0.01 * (seed % 3), cold_s=0.12)
    out = fn(fake, torch.zeros(1, 3, 8, 8), runs=runs, warmup=warmup)
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise contract.PlainDataError(f"latency_ms must return a pair (p50_ms, p99_ms), got {type(out).__name__}")
    try:
        p50, p99 = (float(v) for v in out)
    except (TypeError, ValueError):
        raise contract.PlainDataError("latency_ms must return two numbers") from None
    return {"p50": p50, "p99": p99, "calls": fake.calls, "autograd": any(fake.grad_enabled)}


def compare_latency(a, b, seed) -> str | None:
    """Timings agree within max(6 ms, 35%) (p50) and max(15 ms, 35%) (p99);
    call counts and autograd exactly."""
    for key in ("calls", "autograd"):
        if a.get(key) != b.get(key):
            return f"[{key!r}]: got {a.get(key)!r}, expected {b.get(key)!r}"
    for key, floor in (("p50", 6.0), ("p99", 15.0)):
        if abs(a[key] - b[key]) > max(floor, 0.35 * abs(b[key])):
            return f"[{key!r}]: got {a[key]:.4g} ms, expected about {b[key]:.4g} ms"
    return None


# The calibration set and static INT8 (kdcourse.checks.lab5_int8), re-exported here.
from .lab5_int8 import (CALIBRATION_VARIANTS, QUANTIZE_VARIANTS, check_calibration_set,  # noqa: E402,F401
                        check_static_int8, compare_quantized, probe_calibration_set, probe_quantize_student,
                        reference_calibration_set, reference_quantize_student)
from ..deploy import calibration_batches as deploy_calibration_batches  # noqa: E402  (package answers,
from ..deploy import float_layers as deploy_float_layers  # noqa: E402  refused while grading)
from ..deploy import measure_latency as deploy_measure_latency  # noqa: E402
from ..deploy import quantize_static_onnx as deploy_quantize_static_onnx  # noqa: E402

EXERCISES = [
    contract.Exercise(name="float_layers", points=1.0, check=check_float_layers, probe=probe_float_layers,
                      reference=deploy_float_layers, variants=FLOAT_LAYERS_VARIANTS, hidden_seeds=(0, 1, 2, 3),
                      rtol=0.0, atol=0.0),
    contract.Exercise(name="latency_ms", points=1.0, check=check_latency_fn, probe=probe_latency_ms,
                      reference=reference_latency_ms, variants=LATENCY_VARIANTS, hidden_seeds=(0, 1),
                      compare=compare_latency, refuse=(deploy_measure_latency,), timeout=60.0),
    contract.Exercise(name="calibration_set", points=1.0, check=check_calibration_set, probe=probe_calibration_set,
                      reference=reference_calibration_set, variants=CALIBRATION_VARIANTS, hidden_seeds=(0, 1, 2),
                      refuse=(deploy_calibration_batches,)),
    contract.Exercise(name="quantize_student", points=1.0, check=check_static_int8, probe=probe_quantize_student,
                      reference=reference_quantize_student, variants=QUANTIZE_VARIANTS, hidden_seeds=(0, 1),
                      compare=compare_quantized, refuse=(deploy_quantize_static_onnx,), timeout=120.0),
]

# Affine quantization by hand (kdcourse.checks.lab5_quant), in notebook order after latency_ms.
from .lab5_quant import (FAKE_QUANTIZE_VARIANTS, QPARAMS_VARIANTS, check_fake_quantize,  # noqa: E402,F401
                         check_qparams, probe_fake_quantize, probe_qparams)
from .lab5_quant import fake_quantize as reference_fake_quantize  # noqa: E402
from .lab5_quant import qparams as reference_qparams  # noqa: E402

EXERCISES[2:2] = [
    contract.Exercise(name="qparams", points=1.0, check=check_qparams, probe=probe_qparams,
                      reference=reference_qparams, variants=QPARAMS_VARIANTS, hidden_seeds=tuple(range(6)),
                      rtol=1e-9, atol=1e-12),
    contract.Exercise(name="fake_quantize", points=1.0, check=check_fake_quantize, probe=probe_fake_quantize,
                      reference=reference_fake_quantize, variants=FAKE_QUANTIZE_VARIANTS, hidden_seeds=tuple(range(6)),
                      rtol=1e-9, atol=1e-12),
]

# A model's size on disk, the latency table's statistics and the calibration observer's range
# (kdcourse.checks.lab5_stats): state_dict_mb after float_layers, latency_summary after latency_ms,
# observe_range after calibration_set.
from .lab5_stats import (RANGE_VARIANTS, SIZE_VARIANTS, SUMMARY_VARIANTS, check_latency_summary,  # noqa: E402,F401
                         check_observe_range, check_state_dict_mb, probe_latency_summary, probe_observe_range,
                         probe_state_dict_mb)
from .lab5_stats import EXERCISES as _STATS  # noqa: E402

EXERCISES.insert([e.name for e in EXERCISES].index("float_layers") + 1, _STATS["state_dict_mb"])
EXERCISES.insert([e.name for e in EXERCISES].index("latency_ms") + 1, _STATS["latency_summary"])
EXERCISES.insert([e.name for e in EXERCISES].index("calibration_set") + 1, _STATS["observe_range"])

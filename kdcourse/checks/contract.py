"""The exercise contract: each exercise is declared once, here-shaped, in its
lab's checks module, and the notebook, ``labgen`` and the grader all read it.

A lab's checks module (``kdcourse/checks/labN.py``) ends with a module-level
list ``EXERCISES``; :func:`exercises_for` returns it (``exercises_for(1)``,
``exercises_for("lab1")`` or ``exercises_for("01_classic_kd")``).

One complete declaration (Lab 1's first exercise, as declared in ``lab1.py``)::

    from ..losses import response
    from . import contract

    def probe_soft_targets(fn, seed):
        # trusted package code: builds its own seeded inputs, calls fn, returns PLAIN data
        g = contract.generator(seed)
        shape = [(5,), (3, 7), (2, 3, 4)][seed % 3]           # every shape the docstring promises
        logits = (torch.randn(*shape, generator=g, dtype=torch.float64) * 4).requires_grad_(True)
        T = [1.0, 2.0, 0.5, 4.0, 8.0][seed % 5]
        out = fn(logits, T)
        return {"probs": contract.plain(out),
                "grad": contract.grad(out, [logits], seed)}   # gradients, not only values

    EXERCISES = [
        contract.Exercise(
            name="soft_targets",                  # the function the student defines in the notebook
            points=1.0,
            check=check_soft_targets,             # the visible check the notebook calls
            probe=probe_soft_targets,
            reference=response.soft_targets,      # refused inside the grading kernel (see below)
            variants=SOFT_TARGETS_VARIANTS,       # {name: (fn, hint)}: the same known-wrong versions the check names
            hidden_seeds=(0, 1, 2, 3, 4),         # the grader adds fresh random seeds each run
            rtol=1e-6, atol=1e-9,
        ),
    ]

How the grader uses it (``kdcourse.grading``): the student's notebook runs in
a sandboxed plain Python process; for every exercise and seed that process
calls ``probe(<the student's function>, seed)`` and sends back the plain data
(JSON). The grader then computes ``probe(reference, seed)`` and, when they
differ, ``probe(variant, seed)`` for each variant, IN ITS OWN PROCESS, and
decides with :func:`diagnose_data`. Nothing the student's code made except
plain data ever reaches the grader. So a probe must

* be deterministic given ``seed`` (same data in two processes): seeded
  generators only (:func:`generator`), float64 where possible, no clock
  (except an exercise that measures time, whose ``compare`` is tolerant);
* exercise every input shape and option the exercise's docstring promises,
  including ones the visible check does not use (hidden tests);
* return gradients where correctness includes them (:func:`grad`: the
  gradient of the student's output w.r.t. each input);
* return observations rich enough that producing them without doing the
  exercise is as hard as doing it (values on seeded inputs, not only a
  verdict);
* never call, in the kernel, any function the lab refuses: every exercise's
  reference and ``refuse`` list refuse lab-wide in the grading kernel (the
  grading copy of the package has their bodies replaced), so a probe, and
  a solution, of one exercise must not depend on another exercise's
  reference either (build inputs with hooks or small modules of your own).

Fields of :class:`Exercise`:

``name``, ``points``, ``check``, ``probe``, ``reference`` as above;
``variants`` ``{name: (fn, hint)}``: known-wrong versions with the same
signature (written as a student would: the release tests plant each into a
notebook, where it runs in the grading kernel, so it may not call a
refused function either); ``hidden_seeds``: seeds always probed; ``rtol``/``atol``: the
tolerance of :func:`compare`; ``compare``: optional
``compare(student_data, other_data, seed) -> None | "where it differs"``
(for exercises with several right answers, e.g. random calibration images);
``refuse``: package functions an answer may not delegate to (default: the
reference, when it lives in the package outside ``kdcourse.checks``);
``timeout``: seconds one probe may take.

Helpers for probes: :func:`generator` (a seeded ``torch.Generator``),
:func:`plain`, :func:`grad`, :func:`scalar` (a loss that must be a 0-dim
tensor), :func:`attempt` (a call that may fail, recorded as
``{"raised": "<type>"}`` so a variant that raises can be recognised). A
probe raises :class:`PlainDataError` with a message for the student when
the function returned something unusable. Every exercise must come with
tests (``tests/test_grading_exercises.py`` runs them for every declared
exercise): the solution's code matches the reference on the hidden seeds,
each variant is named by :func:`diagnose_data`, the solution scores full
marks and the untouched lab zero in a real kernel.

Plain data: ``None``, ``bool``, ``int``, ``float`` (NaN and infinities
allowed, and compared explicitly: NaN matches only NaN), ``str`` (capped),
lists, dicts with ``str`` keys, and tensors as ``{"__tensor__": dtype,
"shape": [...], "values": [...]}`` (:func:`plain`). :func:`validate` checks
data received from an untrusted process (types, depth, size).
"""
from __future__ import annotations

import gc
import importlib
import re
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from .plain_data import (MAX_DEPTH, MAX_KEYS, MAX_NUMBERS, MAX_STRING, TENSOR_KEY,  # noqa: F401
                         PlainDataError, _fmt, _kind, as_tensor, compare, is_tensor, plain, validate)


class ReferenceRefused(RuntimeError):
    """Raised by a package reference answer inside the grading kernel."""


@dataclass(frozen=True)
class Exercise:
    name: str
    points: float
    check: Callable
    probe: Callable[[Callable, int], Any]
    reference: Callable
    variants: Mapping[str, tuple] = field(default_factory=dict)
    hidden_seeds: tuple = (0, 1, 2)
    rtol: float = 1e-6
    atol: float = 1e-9
    compare: Callable | None = None
    refuse: tuple = ()
    timeout: float = 60.0

    def refused_functions(self) -> tuple:
        """The reference (when it is a named function of the package) and
        ``refuse``: what the grading kernel must not run."""
        ref = self.reference
        mod, qual = getattr(ref, "__module__", "") or "", getattr(ref, "__qualname__", "") or ""
        own = (ref,) if mod.startswith("kdcourse.") and qual and "<" not in qual else ()
        return tuple(dict.fromkeys(own + tuple(self.refuse)))

    def differs(self, student, other, seed) -> str | None:
        """``None`` when ``student`` data agree with ``other`` on this seed."""
        if self.compare is not None:
            return self.compare(student, other, seed)
        return compare(student, other, self.rtol, self.atol)



@dataclass
class Verdict:
    ok: bool
    hint: str = ""
    variant: str | None = None  # the named mistake, when one explains the data


def diagnose_data(exercise: Exercise, student: Mapping, reference: Mapping,
                  variants: Callable[[str, int], Any] | Mapping | None = None) -> Verdict:
    """Decide an exercise from plain data, in the grader's process.

    ``student`` and ``reference``: ``{seed: data}``. ``variants``: either
    ``{name: {seed: data}}`` or a function ``(name, seed) -> data`` (called
    only when the student differs from the reference). A variant's hint is
    given when the student's data match that variant on every seed and the
    variant differs from the reference somewhere; otherwise the hint says
    where the student differs from the reference."""
    diffs = {s: exercise.differs(student[s], reference[s], s) for s in reference}
    bad = [s for s, d in diffs.items() if d]
    if not bad:
        return Verdict(True)
    for vname, (_fn, hint) in exercise.variants.items():
        try:
            vdata = {s: (variants[vname][s] if isinstance(variants, Mapping) else variants(vname, s)) for s in reference}
        except Exception:  # a variant that cannot run on these inputs explains nothing
            continue
        if all(exercise.differs(student[s], vdata[s], s) is None for s in reference) and \
                any(exercise.differs(vdata[s], reference[s], s) for s in reference):
            return Verdict(False, f"{exercise.name} is not right yet: {hint}", vname)
    s = bad[0]
    return Verdict(False, f"{exercise.name} differs from the reference on a hidden test (seed {s}): {diffs[s]}")


# --------------------------------------------------------------------------
# Running a probe, and helpers for writing one
# --------------------------------------------------------------------------

def run_probe(exercise: Exercise, fn: Callable, seed: int):
    """``plain(exercise.probe(fn, seed))`` under the same conditions in every
    process: global RNGs seeded with ``seed``, one torch thread, autograd on,
    warnings silenced. The runner calls it on the student's function, the
    grader on the reference and the variants."""
    import random
    import warnings

    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy

        numpy.random.seed(seed % 2 ** 32)
    except ImportError:  # pragma: no cover - numpy comes with torch here
        pass
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return plain(exercise.probe(fn, seed))
    finally:
        torch.set_num_threads(threads)


REFUSAL_MARK = "refuses to run while grading"  # in the grading copy's refusals (kdcourse.grading.sandbox)


def is_refusal(exc: BaseException) -> bool:
    """Whether ``exc`` is a reference answer refusing to run."""
    return isinstance(exc, ReferenceRefused) or REFUSAL_MARK in str(exc)


def attempt(fn: Callable, *args, **kwargs):
    """``(fn(*args, **kwargs), None)``, or ``(None, {"raised": "<type>"})``
    when it raises (for probes that test how a function fails; an untouched
    exercise's ``NotImplementedError`` and a refused reference pass through)."""
    return attempt_as(lambda exc: {"raised": type(exc).__name__}, fn, *args, **kwargs)


def attempt_as(fault: Callable[[Exception], dict], fn: Callable, *args, **kwargs):
    """:func:`attempt`, the exception recorded as ``fault(exc)`` (a probe
    that keeps the message, or names an autograd error about an in-place
    change)."""
    try:
        return fn(*args, **kwargs), None
    except NotImplementedError:
        raise
    except Exception as exc:
        if is_refusal(exc):
            raise
        return None, fault(exc)


def generator(seed: int) -> torch.Generator:
    """The probes' random source for ``seed`` (any int the grader draws)."""
    return torch.Generator().manual_seed(int(seed) % (2 ** 63))


def draw_int(g: torch.Generator, low: int, high: int) -> int:
    """One int in ``[low, high)`` from ``g`` (a probe's size or index)."""
    return int(torch.randint(low, high, (1,), generator=g))


def grad(out, inputs, seed: int = 0):
    """Gradients of the student's output w.r.t. each of ``inputs`` (tensors
    or parameters), as plain tensors; a scalar output is differentiated
    directly, a larger one through a seeded random weighting. An input the
    output does not depend on gets zeros; an output without a graph gives
    ``"no graph"``."""
    if not isinstance(out, torch.Tensor):
        raise PlainDataError(f"expected a tensor, got {type(out).__name__}")
    if not out.requires_grad:
        return "no graph"
    w = torch.randn(out.shape, generator=generator(seed + 7), dtype=torch.float64).to(out.dtype) if out.ndim else None
    target = (out * w).sum() if w is not None else out
    gs = torch.autograd.grad(target, list(inputs), allow_unused=True)
    return [plain(torch.zeros_like(x) if g is None else g) for x, g in zip(inputs, gs)]


def scalar(out, name: str):
    """The plain value of a loss that must be a 0-dim tensor."""
    if not isinstance(out, torch.Tensor):
        raise PlainDataError(f"{name} must return a torch.Tensor, got {type(out).__name__}")
    if out.ndim != 0:
        raise PlainDataError(f"{name} must return a scalar (0-dim tensor), got shape {tuple(out.shape)}")
    return plain(out)


# --------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------

def lab_module(lab) -> str:
    """``"kdcourse.checks.labN"`` for ``N``, ``"labN"`` or a notebook stem ``"0N_topic"``."""
    if isinstance(lab, int):
        n = lab
    else:
        s = str(lab)
        m = re.fullmatch(r"lab(\d+)", s) or re.match(r"(\d+)_", s.rsplit("/", 1)[-1])
        if not m:
            raise ValueError(f"lab {lab!r}: pass a number, 'labN' or a notebook name such as '01_classic_kd'")
        n = int(m.group(1))
    return f"kdcourse.checks.lab{n}"


def exercises_for(lab) -> list[Exercise]:
    """The declared exercises of a lab, in notebook order (``[]`` if the lab
    declares none)."""
    try:
        module = importlib.import_module(lab_module(lab))
    except ModuleNotFoundError:
        return []
    return list(getattr(module, "EXERCISES", []))


def exercise(lab, name: str) -> Exercise:
    for e in exercises_for(lab):
        if e.name == name:
            return e
    raise KeyError(f"lab {lab!r} declares no exercise {name!r}")


def variant(lab, name: str, variant_name: str) -> Callable:
    """A known-wrong variant as a function (tests plant it into a notebook)."""
    return exercise(lab, name).variants[variant_name][0]


# --------------------------------------------------------------------------
# Reference answers refuse to run in the grading kernel
# --------------------------------------------------------------------------

def _refusal_code(qualname: str) -> types.CodeType:
    msg = f"{qualname} is the reference answer of an exercise; it {REFUSAL_MARK} (the exercise must be the student's own code)"
    src = f"def refused(*args, **kwargs):\n    raise RuntimeError({msg!r})\n"
    ns: dict = {}
    exec(compile(src, "<refused reference>", "exec"), ns)
    return ns["refused"].__code__


def refuse_references(exercises) -> list[str]:
    """Inside the grading kernel, after the notebook's cells ran and before
    any probe: replace the code of every package reference answer of these
    exercises by a refusal. The function objects themselves are changed
    (and every function in the process sharing their code), so a reference
    captured earlier (``ref = kdcourse.losses.kd_loss``), a reset flag or
    environment variable, or an alias does not bring it back. Returns the
    refused names."""
    done, codes = [], {}
    for ex in exercises:
        for fn in ex.refused_functions():
            fn = getattr(fn, "__func__", fn)
            if not isinstance(fn, types.FunctionType) or fn.__closure__:
                continue
            qual = f"{fn.__module__}.{fn.__qualname__}"
            codes[fn.__code__] = _refusal_code(qual)
            done.append(qual)
    if codes:
        for obj in gc.get_objects():
            if isinstance(obj, types.FunctionType) and obj.__code__ in codes:
                obj.__code__ = codes[obj.__code__]
    return done

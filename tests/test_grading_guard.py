"""The grading kernel's guard (kdcourse.grading.guard), in process: an
exercise that delegates to code of ``kdcourse.checks`` — a probe's private
copy of an earlier exercise, a variant factory whose defaults are right, a
variant's private formula — is flagged, in every way of reaching it (a call,
the exercise bound to the helper, a partial, a decorator, a thread, a
subclass, the profile turned off); the solutions' own code is not, probes
that hand the student's code their own helpers included. Each delegation
case first shows the hole was real: without the guard the helper's answers
match the reference on the hidden seeds. (The same in a real sandboxed
kernel: tests/test_grading_attacks.py, ``delegates_to_checks``.)"""
from __future__ import annotations

import os

import pytest

from kdcourse import labgen
from kdcourse.checks import contract
from kdcourse.grading import guard as G, slicing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUARDED_LABS = ["01_classic_kd", "02_feature_kd", "04_self_distill"]


def _stem(prefix: str) -> str:
    for f in sorted(os.listdir(os.path.join(ROOT, "solutions"))):
        if f.startswith(prefix):
            return f[:-len(".ipynb")]
    pytest.skip(f"no solution notebook {prefix}*")


def _solution_namespace(stem: str) -> dict:
    """The solution's exercise slice (what the grader runs), executed here."""
    sol = labgen.read(os.path.join(ROOT, "solutions", stem + ".ipynb"))
    names = [e.name for e in contract.exercises_for(stem)]
    ns: dict = {"PROFILE": "smoke", "__name__": "__main__"}
    for i, src in slicing.exercise_slice(sol, names).items():
        exec(compile(src, f"<{stem} cell {i}>", "exec"), ns)
    return ns


def _ref(ex, seed):
    return contract.run_probe(ex, ex.reference, seed)


def _guarded(ex, fn, ns, seed):
    g = G.Guard(ns, [ex])
    try:
        data = g.run(contract.run_probe, ex, fn, seed)
    except Exception as exc:  # the probe failed: only the flag matters here
        data = {"raised": type(exc).__name__}
    return data, g.violation


@pytest.mark.parametrize("prefix", [s[:3] for s in GUARDED_LABS])
def test_the_solutions_own_code_is_not_flagged(prefix):
    stem = _stem(prefix)
    ns = _solution_namespace(stem)
    for ex in contract.exercises_for(stem):
        fn = ns.get(ex.name)
        assert fn is not None, f"{stem}: the slice does not define {ex.name}"
        seed = ex.hidden_seeds[0]
        data, violation = _guarded(ex, fn, ns, seed)
        assert violation == "", f"{stem} {ex.name}: {violation}"
        verdict = contract.diagnose_data(ex, {seed: data}, {seed: _ref(ex, seed)})
        assert verdict.ok, f"{stem} {ex.name}: {verdict.hint}"


T = "from kdcourse.checks import lab1_training as _t\n"
CASES = {
    # name: (lab prefix, exercise, code defining it, the helper's answers are right)
    "call": ("01", "kd_grad", T + "def kd_grad(s, t, T):\n    return _t._kd_formula(s, t, T)\n", True),
    "bound": ("01", "kd_grad", T + "kd_grad = _t._kd_formula\n", True),
    "partial": ("01", "kd_grad", T + "import functools\nkd_grad = functools.partial(_t._kd_formula)\n", True),
    "decorated": ("01", "kd_grad", T + "import torch\nkd_grad = torch.enable_grad()(_t._kd_formula)\n", True),
    "code_copy": ("01", "kd_grad", T + "import types\nkd_grad = types.FunctionType(_t._kd_formula.__code__, "
                                        "dict(globals(), **vars(_t)))\n", True),
    "thread": ("01", "kd_grad", T + "import threading\ndef kd_grad(s, t, T):\n    out = []\n"
                                    "    th = threading.Thread(target=lambda: out.append(_t._kd_formula(s, t, T)))\n"
                                    "    th.start(); th.join()\n    return out[0]\n", True),
    "profile_off": ("01", "kd_grad", T + "import sys\ndef kd_grad(s, t, T):\n    sys.setprofile(None)\n"
                                         "    return _t._kd_formula(s, t, T)\n", True),
    "variant_factory": ("04", "born_again", "from kdcourse.checks import lab4 as _l4\n"
                                            "born_again = _l4._born_again_with()\n", True),
    "probe_copy": ("02", "hint_loss", "from kdcourse.checks.lab2 import fitnets as _f\n"
                                      "def hint_loss(student, teacher, regressor):\n"
                                      "    return _f._probe_hint(student, teacher, regressor)\n", None),
    "probe_extractor": ("02", "extract_features", "from kdcourse.checks.lab2 import fitnets as _f\n"
                                                  "def extract_features(model, x, names):\n"
                                                  "    return _f._extract(model, x, names)[1]\n", None),
    "subclass": ("02", "FitNets", "from kdcourse.checks.lab2 import fitnets_params as _p\n"
                                  "class FitNets(_p.FITNETS_VARIANTS['teacher_train_mode'][0].__mro__[1]):\n"
                                  "    pass\n", None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_delegating_to_the_checks_is_flagged(case):
    prefix, name, code, right = CASES[case]
    stem = _stem(prefix)
    ex = contract.exercise(stem, name)
    ns: dict = {"__name__": "__main__"}
    exec(compile(code, f"<{case}>", "exec"), ns)
    seeds = list(ex.hidden_seeds)
    if right:  # the hole: the helper is a right answer
        got = {s: contract.run_probe(ex, ns[name], s) for s in seeds}
        assert contract.diagnose_data(ex, got, {s: _ref(ex, s) for s in seeds}).ok
    _data, violation = _guarded(ex, ns[name], ns, seeds[0])
    assert violation, f"{case}: {name} delegated to the checks unnoticed"


def test_a_helper_the_probe_hands_over_is_not_flagged_but_the_same_one_taken_is():
    """Lab 2's FitNets probe binds its own hint_loss and extract_features in
    the notebook's namespace while it runs: the student's class may call
    them then, not a copy it took itself."""
    stem = _stem("02")
    ns = _solution_namespace(stem)
    ex = contract.exercise(stem, "FitNets")
    seed = ex.hidden_seeds[0]
    _data, violation = _guarded(ex, ns["FitNets"], ns, seed)
    assert violation == ""
    from kdcourse.checks.lab2 import fitnets as _f

    ns["hint_loss"] = _f._probe_hint  # taken before the probe: the student's own binding
    g = G.Guard(ns, [ex])
    try:
        g.run(contract.run_probe, contract.exercise(stem, "hint_loss"), ns["hint_loss"], seed)
    except Exception:
        pass
    assert g.violation

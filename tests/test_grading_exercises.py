"""Every declared exercise graded right: the release check (each solution
full marks, each untouched lab zero), planted wrong answers, the contract's
plain data and diagnosis, and reference answers refused in the kernel.

Cost: the kernel runs are module-scoped and shared by the parametrised
cases (smoke profile, cells up to the last exercise, only the declared
hidden seeds). Per lab: the solution and the untouched lab (the release
check), one notebook with EVERY exercise replaced by a known-wrong variant
(each exercise must lose with its own variant's hint: exercises are probed
one function at a time, so one notebook serves them all) and one notebook
with a single exercise replaced (only it may lose). The in-process tests
prove, for every exercise and every variant, that the grader-side
diagnosis names that variant, and that each solution's own code matches
the reference on every hidden seed."""
from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor
import json
import os
import subprocess
import sys

import nbformat
import pytest

from kdcourse import labgen
from kdcourse.checks import contract
from kdcourse.grading import grade, release, result as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOLUTIONS = os.path.join(ROOT, "solutions")
LABS = os.path.join(ROOT, "labs")


def _targets():
    return release.targets(SOLUTIONS, LABS)


TARGETS = _targets()
STEMS = [t[0] for t in TARGETS]
EXERCISES = [(stem, e.name) for stem in STEMS for e in contract.exercises_for(stem)]
VARIANTS = [(stem, e.name, v) for stem in STEMS for e in contract.exercises_for(stem) for v in e.variants]
OPTIONS = R.Options(random_seeds=0)


# --------------------------------------------------------------------------
# Notebooks: the solution with exercises replaced by known-wrong variants
# --------------------------------------------------------------------------

def _plant_line(stem: str, name: str, vname: str) -> str:
    return (f"{name} = __import__('kdcourse.checks.contract', fromlist=['variant']).variant("
            f"{stem!r}, {name!r}, {vname!r})  # planted: a known-wrong answer")


def _first_variant(stem: str, name: str) -> str:
    return next(iter(contract.exercise(stem, name).variants))


def planted(stem: str, names, trim: bool = False) -> dict:
    """The solution, with each exercise in ``names`` replaced (right after
    its definition) by its first known-wrong variant. ``trim``: only the
    parameters cell, the imports cell and the exercise cells (the variants
    need nothing else)."""
    sol = labgen.read(os.path.join(SOLUTIONS, stem + ".ipynb"))
    cells = labgen.solution_functions(sol)
    nb = copy.deepcopy(sol)
    if trim:
        code = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"]
        params = next((i for i in code if "parameters" in nb["cells"][i].get("metadata", {}).get("tags", [])), None)
        imports = next(i for i in code if i != params)
        keep = {params, imports} | set(cells.values())
        index = {old: new for new, old in enumerate(sorted(k for k in keep if k is not None))}
        nb["cells"] = [nb["cells"][i] for i in sorted(index)]
        cells = {n: index[i] for n, i in cells.items()}
    for name in names:
        if not contract.exercise(stem, name).variants:
            continue
        cell = nb["cells"][cells[name]]
        src = labgen.source(cell)
        lines = src.split("\n")
        end = _definition_end(src, name)
        lines.insert(end, _plant_line(stem, name, _first_variant(stem, name)))
        cell["source"] = "\n".join(lines)
    return _strip_markers(nb)


def _definition_end(src: str, name: str) -> int:
    import ast

    node = next(n for n in ast.parse(src).body if getattr(n, "name", None) == name)
    return node.end_lineno


def _strip_markers(nb: dict) -> dict:
    """What a student hands in: marker lines gone, hidden blocks absent."""
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            text = labgen._replace_blocks(labgen.source(cell), labgen.BEGIN_HIDDEN, labgen.END_HIDDEN,
                                          lambda ind: [], "cell")
            cell["source"] = "\n".join(l for l in text.split("\n") if l.strip() not in (labgen.BEGIN, labgen.END))
    return nb


def _write(nb: dict, path) -> str:
    nbformat.write(nbformat.from_dict(nb), str(path))
    return str(path)


class _Graded:
    """Kernel runs shared by the module: each notebook graded once."""

    def __init__(self, tmp):
        self.tmp, self.cache, self.labs, self.launchers = tmp, {}, {}, {}

    def lab(self, stem):
        if stem not in self.labs:
            self.labs[stem] = grade.load_lab(os.path.join(SOLUTIONS, stem + ".ipynb"))
        return self.labs[stem]

    KINDS = ("solution", "lab", "all_planted", "one_planted")

    def launcher(self, stem):
        """The lab's launcher and grading copy, one per lab as in a batch
        (``kdcourse grade`` shares one copy among its ``--jobs``)."""
        if stem not in self.launchers:
            self.launchers[stem] = release.launcher_for(self.lab(stem), OPTIONS)
        return self.launchers[stem]

    def prefetch(self, stems, jobs: int = 2) -> None:
        """Grade every kind of notebook of ``stems``, ``jobs`` at a time, as
        ``kdcourse grade --jobs`` does (each kernel waits on its own
        process): the results are the same as one at a time."""
        for stem in stems:
            self.launcher(stem)
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(lambda key: self.get(*key), [(s, k) for s in stems for k in self.KINDS]))

    def close(self) -> None:
        for _launch, _label, copy_ in self.launchers.values():
            copy_.remove()

    def get(self, stem: str, kind: str) -> R.NotebookResult:
        key = (stem, kind)
        if key not in self.cache:
            lab = self.lab(stem)
            if kind == "solution":
                path = os.path.join(SOLUTIONS, stem + ".ipynb")
            elif kind == "lab":
                path = os.path.join(LABS, stem + ".ipynb")
            elif kind == "all_planted":
                path = _write(planted(stem, [e.name for e in lab.exercises], trim=True), self.tmp / f"{stem}-all.ipynb")
            else:
                path = _write(planted(stem, [self.single(stem)]), self.tmp / f"{stem}-one.ipynb")
            launch, label, _copy = self.launcher(stem)
            self.cache[key] = grade.grade_notebook(lab, path, student=f"{stem}-{kind}", options=OPTIONS,
                                                   launch=launch, sandbox=label)
        return self.cache[key]

    def single(self, stem: str) -> str:
        names = [e.name for e in self.lab(stem).exercises if e.variants]
        return names[int(stem[:2]) % len(names)]


@pytest.fixture(scope="module")
def graded(request, tmp_path_factory):
    g = _Graded(tmp_path_factory.mktemp("graded"))
    users = [i for i in request.session.items if "graded" in getattr(i, "fixturenames", ())]
    stems = {getattr(i, "callspec", None) and i.callspec.params.get("stem") for i in users}
    g.prefetch(STEMS if None in stems else [s for s in STEMS if s in stems])  # the selected tests' labs
    yield g
    g.close()


# --------------------------------------------------------------------------
# The release check, per lab
# --------------------------------------------------------------------------

@pytest.mark.parametrize("stem", STEMS)
def test_declarations_match_the_solution(stem):
    assert labgen.declaration_problems(labgen.read(os.path.join(SOLUTIONS, stem + ".ipynb")), stem) == []


@pytest.mark.parametrize("stem", STEMS)
def test_solution_scores_full_marks(graded, stem):
    r = graded.get(stem, "solution")
    assert r.status == "graded", r.notes
    assert [(e.name, e.hint) for e in r.exercises if not e.full] == []
    assert r.total == r.max_total == sum(e.points for e in contract.exercises_for(stem))


@pytest.mark.parametrize("stem", STEMS)
def test_untouched_lab_scores_zero(graded, stem):
    r = graded.get(stem, "lab")
    assert r.total == 0
    for e in r.exercises:
        assert e.hint, e.name
    # the kernel runs only the exercises' slice (no experiment calls them), so the stubs speak in the hints
    assert any("NotImplementedError" in e.hint for e in r.exercises), [e.hint for e in r.exercises]


@pytest.mark.parametrize("stem,name", EXERCISES)
def test_planted_wrong_answer_loses_with_its_hint(graded, stem, name):
    assert contract.exercise(stem, name).variants, f"{name} declares no known-wrong variant to plant"
    r = graded.get(stem, "all_planted").exercise(name)
    vname = _first_variant(stem, name)
    hint = contract.exercise(stem, name).variants[vname][1]
    assert r.earned == 0
    assert hint in r.hint, (vname, r.hint)
    assert f"matches the known mistake {vname!r}" in r.notes


@pytest.mark.parametrize("stem", STEMS)
def test_a_single_planted_wrong_answer_loses_only_that_exercise(graded, stem):
    r = graded.get(stem, "one_planted")
    wrong = graded.single(stem)
    assert [e.name for e in r.exercises if not e.full] == [wrong], [(e.name, e.hint) for e in r.exercises]


def test_release_command_reports_each_notebook_and_fails_on_a_wrong_solution(graded, capsys, monkeypatch):
    """``kdcourse grade --release`` prints one line per notebook and exits 0
    when every solution is full and every lab zero, 1 otherwise (the grading
    itself is the cases above: their results are reused)."""
    stem = STEMS[0]

    def fake_grade(lab, path, wrong=False, **kw):
        if os.path.dirname(path) == LABS:
            return graded.get(stem, "lab")
        return graded.get(stem, "one_planted" if wrong else "solution")

    import argparse

    for kind in ("lab", "solution", "one_planted"):  # graded for real before grade_notebook is replaced
        graded.get(stem, kind)
    monkeypatch.setattr(release, "targets", lambda *a: [TARGETS[0]])
    monkeypatch.setattr(grade, "grade_notebook", fake_grade)
    assert release.main(argparse.Namespace(no_sandbox=True)) == 0
    out = capsys.readouterr().out
    assert "full marks" in out and "zero" in out and "2 of 2 passed" in out
    monkeypatch.setattr(grade, "grade_notebook", lambda lab, path, **kw: fake_grade(lab, path, wrong=True))
    assert release.main(argparse.Namespace(no_sandbox=True)) == 1
    assert "FAIL" in capsys.readouterr().out


# --------------------------------------------------------------------------
# In the grader's process: every variant diagnosed, every solution matches
# --------------------------------------------------------------------------

def _seeds(ex):
    return list(ex.hidden_seeds) + [1234567]


_REF: dict = {}
_VARIANT: dict = {}  # (exercise, variant, seed) -> data, shared by the cases


def _ref(ex, seed):
    key = (id(ex), seed)
    if key not in _REF:
        _REF[key] = contract.validate(json.loads(json.dumps(contract.run_probe(ex, ex.reference, seed))))
    return _REF[key]


@pytest.mark.parametrize("stem,name,vname", VARIANTS)
def test_each_variant_is_named_by_the_diagnosis(stem, name, vname):
    ex = contract.exercise(stem, name)

    def vdata(n, s):
        key = (id(ex), n, s)
        if key not in _VARIANT:
            _VARIANT[key] = contract.run_probe(ex, ex.variants[n][0], s)
        return _VARIANT[key]

    student = {s: vdata(vname, s) for s in _seeds(ex)}
    verdict = contract.diagnose_data(ex, student, {s: _ref(ex, s) for s in _seeds(ex)}, vdata)
    assert not verdict.ok
    assert verdict.variant == vname, verdict.hint
    assert ex.variants[vname][1] in verdict.hint


def _solution_functions(stem):
    """The solution's exercise functions, defined in a namespace holding the
    solution's imports (the notebook's imports cell is not run: only the
    names its exercise cells use)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    sol = labgen.read(os.path.join(SOLUTIONS, stem + ".ipynb"))
    ns = {"torch": torch, "nn": torch.nn, "F": F, "np": np, "os": os, "time": __import__("time"),
          "math": __import__("math")}
    from kdcourse.train import Distill, Objective, StepOutput, TrainState

    ns.update(Distill=Distill, Objective=Objective, StepOutput=StepOutput, TrainState=TrainState)
    for name, i in labgen.solution_functions(sol).items():
        src = labgen.source(sol["cells"][i])
        exec(compile("\n".join(_definitions_only(src)), f"<{stem} {name}>", "exec"), ns)
    return ns


def _definitions_only(src: str) -> list[str]:
    """Imports, functions and classes of a cell (top-level statements that
    run code, such as the visible check, left out)."""
    import ast

    tree = ast.parse(src)
    lines = src.split("\n")
    out = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            out += lines[start - 1:node.end_lineno]
    return out


@pytest.mark.parametrize("stem,name", EXERCISES)
def test_solution_code_matches_the_reference_on_hidden_seeds(stem, name):
    ex = contract.exercise(stem, name)
    fn = _solution_functions(stem).get(name)
    if fn is None:
        pytest.skip(f"{name} needs names the solution's imports cell defines; the kernel run covers it")
    student = {s: contract.run_probe(ex, fn, s) for s in _seeds(ex)}
    verdict = contract.diagnose_data(ex, student, {s: _ref(ex, s) for s in _seeds(ex)})
    assert verdict.ok, verdict.hint


# --------------------------------------------------------------------------
# The contract's plain data
# --------------------------------------------------------------------------

def test_plain_converts_tensors_and_refuses_objects():
    import torch

    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    p = contract.plain({"a": (t, 1, 2.5, None, True, "x")})
    assert p == {"a": [{"__tensor__": "float64", "shape": [2, 3], "values": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]},
                       1, 2.5, None, True, "x"]}
    assert contract.validate(json.loads(json.dumps(p))) == p
    with pytest.raises(contract.PlainDataError):
        contract.plain(object())
    with pytest.raises(contract.PlainDataError):
        contract.plain({1: 2})

    class Sub(torch.Tensor):
        pass

    with pytest.raises(contract.PlainDataError):
        contract.plain(t.as_subclass(Sub))


@pytest.mark.parametrize("bad", [
    {"__tensor__": "float64", "shape": [2], "values": [1.0]},          # values do not fill the shape
    {"__tensor__": "complex", "shape": [1], "values": [1.0]},          # unknown dtype
    {"__tensor__": "int64", "shape": [1], "values": [1.5]},            # wrong value type
    "x" * (contract.MAX_STRING + 1),
    "deep",                                                           # too deep
    {"k": {1, 2}},
])
def test_validate_refuses_malformed_data(bad):
    if bad == "deep":
        bad = [1]
        for _ in range(contract.MAX_DEPTH + 2):
            bad = [bad]
    with pytest.raises(contract.PlainDataError):
        contract.validate(bad)


def test_compare_numbers_nan_and_shapes():
    import torch

    a = contract.plain(torch.tensor([1.0, float("nan"), 3.0]))
    assert contract.compare(a, a) is None
    b = contract.plain(torch.tensor([1.0, 2.0, 3.0]))
    assert "element 1" in contract.compare(a, b)
    assert "shape" in contract.compare(contract.plain(torch.zeros(2, 2)), contract.plain(torch.zeros(4)))
    assert contract.compare(1.0, 1.0 + 1e-12) is None
    assert contract.compare(float("inf"), float("inf")) is None
    assert contract.compare(float("nan"), 1.0)
    assert contract.compare({"raised": "ValueError"}, {"loss": 1.0}).endswith("where the reference returns a result")


# --------------------------------------------------------------------------
# Reference answers refuse in the kernel, whatever the student's code did
# --------------------------------------------------------------------------

def test_refused_reference_cannot_be_recovered_by_a_captured_alias_or_a_flag():
    """In a fresh process (refusing in this one would break other tests):
    a reference captured before the refusal, a functools.partial of it and
    an environment variable reset all still refuse."""
    code = r'''
import functools, os, torch
from kdcourse.losses import response
from kdcourse.checks import contract
ref, part = response.kd_loss, functools.partial(response.kd_loss, T=2.0)
refused = contract.refuse_references(contract.exercises_for(1))
os.environ["KDCOURSE_GRADING"] = "0"
s, t, y = torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0, 1, 2])
out = []
for f in (ref, part, response.kd_loss):
    try:
        f(s, t, y)
        out.append("ran")
    except RuntimeError as exc:
        out.append("refused" if contract.is_refusal(exc) else "other error")
print(sorted(refused)); print(out)
'''
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "kdcourse.losses.response.kd_loss" in r.stdout
    assert r.stdout.strip().splitlines()[-1] == "['refused', 'refused', 'refused']"


def test_answer_that_delegates_to_the_reference_scores_zero_with_a_note(tmp_path):
    """A Lab 1 answer that calls ``kdcourse.losses.kd_loss`` (captured before
    grading, behind a reset flag) and one that calls ``soft_targets`` from
    the package: zero points, and the note says why."""
    stem = "01_classic_kd"
    lab = grade.load_lab(os.path.join(SOLUTIONS, stem + ".ipynb"))
    nb = planted(stem, [])
    cells = labgen.solution_functions(labgen.read(os.path.join(SOLUTIONS, stem + ".ipynb")))
    for name, body in (("kd_loss", "import os\nos.environ['KDCOURSE_GRADING'] = '0'\n"
                                   "from kdcourse.losses import kd_loss as _ref_kd\n"
                                   "kd_loss = lambda s, t, y, T=4.0, alpha=0.9: _ref_kd(s, t, y, T=T, alpha=alpha)"),
                       ("soft_targets", "import kdcourse.losses\n"
                                        "soft_targets = lambda z, T: kdcourse.losses.soft_targets(z, T)")):
        cell = nb["cells"][cells[name]]
        cell["source"] = labgen.source(cell) + "\n" + body
    keep = set(cells[n] for n in ("kd_loss", "soft_targets"))
    first = min(cells.values())
    nb["cells"] = [c for i, c in enumerate(nb["cells"]) if i < first or i in keep]
    path = _write(nb, tmp_path / "delegates.ipynb")
    launch, label, copy_ = release.launcher_for(lab, OPTIONS)
    try:
        r = grade.grade_notebook(lab, path, options=OPTIONS, launch=launch, sandbox=label)
    finally:
        copy_.remove()
    for name in ("kd_loss", "soft_targets"):
        e = r.exercise(name)
        assert e.earned == 0
        assert "reference answer" in e.hint and "own code" in e.hint, e.hint
        assert any("delegates to a reference answer" in n for n in e.notes)


def test_labgen_check_names_declaration_problems():
    """A declared exercise without a solution cell, an exercise cell without a
    declaration, and points in a cell's metadata that disagree with the
    declaration each make ``labgen --check`` fail."""
    names = [e.name for e in contract.exercises_for(1)]
    block = "    ### BEGIN SOLUTION\n    return 1\n    ### END SOLUTION\n"
    nb = {"cells": [{"cell_type": "code", "source": f"def {names[0]}(logits, T):\n" + block,
                     "metadata": {"kdcourse": {"points": 3}}},
                    {"cell_type": "code", "source": "def not_declared(x):\n" + block, "metadata": {}}],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    problems = " | ".join(labgen.declaration_problems(nb, "01_classic_kd"))
    assert f"exercise {names[1]!r} is declared" in problems
    assert "'not_declared', which kdcourse.checks.lab1.EXERCISES does not declare" in problems
    assert "kdcourse.points = 3" in problems
    assert labgen.declaration_problems(labgen.read(os.path.join(SOLUTIONS, "01_classic_kd.ipynb")), "01_classic_kd") == []

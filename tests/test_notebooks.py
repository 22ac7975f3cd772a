"""Every solution runs in the smoke profile; every untouched lab fails only
with NotImplementedError. Each solution is executed once per session
(``executed_solution`` in conftest.py), and tests/test_nbval.py compares
that same execution's marked outputs; all notebooks of a session share one
teacher cache (``notebook_env``) and run two at a time (tests/notebook_runs.py)."""
import glob
import os

import pytest

from kdcourse import labgen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOLUTIONS = sorted(glob.glob(os.path.join(ROOT, "solutions", "*.ipynb")))
LABS = sorted(glob.glob(os.path.join(ROOT, "labs", "*.ipynb")))

pytestmark = pytest.mark.notebooks


def test_every_notebook_has_a_parameters_cell_first():
    for path in SOLUTIONS + LABS:
        nb = labgen.read(path)
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert "parameters" in code[0].get("metadata", {}).get("tags", []), f"{path}: first code cell must be tagged 'parameters'"
        assert "PROFILE" in labgen.source(code[0])


@pytest.mark.parametrize("path", SOLUTIONS, ids=os.path.basename)
def test_solution_executes_in_smoke_profile(path, executed_solution):
    nb = executed_solution(path)
    errors = [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    # every code exercise is followed by a check that passed (a "✓" line)
    text = "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "stream")
    code_exercises = [i for i in labgen.exercise_cells(nb) if nb["cells"][i]["cell_type"] == "code"]
    assert text.count("✓") >= len(code_exercises)


@pytest.mark.parametrize("path", LABS, ids=os.path.basename)
def test_untouched_lab_fails_only_at_exercises(path, executed_lab):
    errors = executed_lab(path)
    nb = labgen.read(path)
    exercises = labgen.exercise_cells(labgen.read(path.replace(os.sep + "labs" + os.sep, os.sep + "solutions" + os.sep)))
    assert exercises, "a lab without exercises?"
    assert errors, "an untouched lab should stop at its exercises"
    # "Run All" stops at the first error: it must be a clean NotImplementedError
    # at or after the first exercise. This test keeps executing past it, so later
    # cells may also fail, but only with NotImplementedError (a stub called again)
    # or NameError (a name the stopped cell never defined) — nothing else breaks.
    assert errors[0]["error"] == "NotImplementedError", errors[0]
    assert errors[0]["index"] >= exercises[0], "the first failure must come at or after the first exercise cell"
    bad = [e for e in errors if e["error"] not in ("NotImplementedError", "NameError")]
    assert not bad, f"cells failing with something other than NotImplementedError: {bad}"
    assert len(nb["cells"]) == len(labgen.read(path.replace(os.sep + "labs" + os.sep, os.sep + "solutions" + os.sep))["cells"])

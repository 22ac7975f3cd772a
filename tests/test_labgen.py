import glob
import os

import pytest

from kdcourse import labgen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def nb(*cells):
    return {"cells": list(cells), "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


def code(src, outputs=()):
    return {"cell_type": "code", "source": src, "metadata": {}, "outputs": list(outputs), "execution_count": 3}


def test_solution_blocks_become_stubs_with_indentation():
    sol = nb(code("def f(x):\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION\n\nprint(f)"),
             {"cell_type": "markdown", "source": "Why?\n### BEGIN SOLUTION\nBecause.\n### END SOLUTION", "metadata": {}})
    lab = labgen.make_lab(sol)
    src = labgen.source(lab["cells"][0])
    assert src == "def f(x):\n    # YOUR CODE HERE\n    raise NotImplementedError()\n\nprint(f)"
    assert labgen.source(lab["cells"][1]) == "Why?\nYOUR ANSWER HERE"
    assert lab["cells"][0]["outputs"] == [] and lab["cells"][0]["execution_count"] is None


def test_hidden_tests_removed():
    sol = nb(code("check(f)\n### BEGIN HIDDEN TESTS\nassert f(2) == 4\n### END HIDDEN TESTS"))
    assert labgen.source(labgen.make_lab(sol)["cells"][0]) == "check(f)"


def test_unbalanced_markers_raise():
    with pytest.raises(labgen.MarkerError, match="never closed"):
        labgen.make_lab(nb(code("### BEGIN SOLUTION\nx = 1")))
    with pytest.raises(labgen.MarkerError, match="without"):
        labgen.make_lab(nb(code("x = 1\n### END SOLUTION")))


def test_strip_keeps_only_checked_outputs():
    out = [{"output_type": "stream", "name": "stdout", "text": "1\n"}]
    n = nb(code("# NBVAL_CHECK_OUTPUT\nprint(1)", out), code("print(2)", out))
    s = labgen.strip(n)
    assert s["cells"][0]["outputs"] == out and s["cells"][1]["outputs"] == []
    assert labgen.strip(n, keep_checked=False)["cells"][0]["outputs"] == []


def test_committed_labs_equal_generator_output():
    sols = glob.glob(os.path.join(ROOT, "solutions", "*.ipynb"))
    assert sols, "no solution notebooks found"
    stale = labgen.generate_all(os.path.join(ROOT, "solutions"), os.path.join(ROOT, "labs"), check=True)
    assert stale == [], f"regenerate with `make labs`: {stale}"
    for sol in sols:
        lab = labgen.read(labgen.lab_path(sol, os.path.join(ROOT, "labs")))
        assert not any("BEGIN SOLUTION" in labgen.source(c) for c in lab["cells"])


def test_committed_notebooks_are_stripped():
    for path in glob.glob(os.path.join(ROOT, "solutions", "*.ipynb")) + glob.glob(os.path.join(ROOT, "labs", "*.ipynb")):
        n = labgen.read(path)
        keep = "solutions" in path
        assert labgen.dumps(labgen.strip(n, keep_checked=keep)) == labgen.dumps(n), f"{path} carries outputs; run `make strip`"

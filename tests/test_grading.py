"""The grader on Lab 1, as an instructor runs it (``kdcourse grade``, sandboxed):
every kind of broken submission in one batch, each row saying what
happened, one broken notebook never stopping the batch. The notebooks keep
only the cells grading needs (parameters, imports, exercise cells: see
``grading_notebooks.reduced``) so the batch takes seconds per notebook; the
full solution and lab are graded by the release check's tests.

(The attacks are in test_grading_attacks.py, the sandbox alone in
test_grading_sandbox.py, the tables and input/output in
test_grading_tables.py.)"""
from __future__ import annotations

import copy
import os

import pytest

from grading_notebooks import (LAB1_LAB, LAB1_SOLUTION, cell_defining, code_cell, first_code_after_parameters, imports_cell, insert,
                               insert_needed,
                               kd_loss_without_T2, read_rows, reduced, student_copy, write)
from kdcourse import cli, labgen
from kdcourse.grading import grade, result as R, safe_io, sandbox

BATCH_TIMEOUT = 25  # seconds of a notebook's own cells; the (reduced) good ones need a few


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    assert cli.main(["grade", str(tmp_path / "none.ipynb"), str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().out
    assert cli.main(["grade", LAB1_LAB, str(tmp_path / "no-such-folder"), "--out", str(tmp_path / "g")]) == 2
    assert "submissions folder" in capsys.readouterr().out
    assert cli.main(["grade", LAB1_LAB, str(tmp_path), "--timeout", "0"]) == 2
    assert "--timeout" in capsys.readouterr().out
    assert cli.main(["grade", LAB1_LAB, str(tmp_path), "--profile", "huge"]) == 2
    assert "not known" in capsys.readouterr().out


def test_plan_runs_cells_up_to_the_last_exercise_and_notes_structure():
    lab = grade.load_lab(LAB1_LAB)
    sub = student_copy(labgen.read(LAB1_SOLUTION))
    order, where = grade.plan(lab, sub, R.Options())
    last = max(cell_defining(sub, e.name) for e in lab.exercises)
    assert order[-1] == last and all(i <= last for i in order)
    assert {e.name: where[e.name] for e in lab.exercises} == {e.name: [cell_defining(sub, e.name)] for e in lab.exercises}
    everything, _ = grade.plan(lab, sub, R.Options(all_cells=True))
    assert len(everything) > len(order)
    assert grade.structure_notes(lab, sub) == []
    changed = copy.deepcopy(sub)
    del changed["cells"][cell_defining(changed, "kd_loss")]
    changed["cells"].insert(0, changed["cells"].pop(imports_cell(changed)))
    notes = " ".join(grade.structure_notes(lab, changed))
    assert "deleted" in notes and "reordered" in notes


def _slice(cells, names=("soft_targets",)):
    from kdcourse.grading import slicing

    nb = {"cells": [dict(code_cell(c)) for c in cells]}
    return {i: "\n".join(line for line in src.split("\n") if line.strip())
            for i, src in slicing.exercise_slice(nb, list(names), {i for i, c in enumerate(cells)
                                                                   if set(names) & set(grade.defined_functions(c))}).items()}


def test_the_slice_holds_what_the_exercise_needs_wherever_it_is_defined():
    got = _slice(["PROFILE = None", "import torch\nimport numpy\nprofile = PROFILE",
                  "EPS = 1e-9\ndef _helper(x):\n    return np.exp(x) + EPS\nTABLE = {}\nTABLE['k'] = 2.0",
                  "def soft_targets(logits, T, scale=TABLE):\n    return torch.softmax(_helper(logits) / T, -1)\n"
                  "checks.check_soft_targets(soft_targets)\nresult = soft_targets(z, 2)",
                  "runs = train_for_an_hour()\nwhile True:\n    pass",
                  "import numpy as np  # imported after the exercise: Run All binds it before any call"])
    assert got == {1: "import torch", 2: "EPS = 1e-9\ndef _helper(x):\n    return np.exp(x) + EPS\nTABLE = {}\nTABLE['k'] = 2.0",
                   3: "def soft_targets(logits, T, scale=TABLE):\n    return torch.softmax(_helper(logits) / T, -1)",
                   5: "import numpy as np  # imported after the exercise: Run All binds it before any call"}, got
    # a statement that needs an experiment's result brings the experiment along (the student asked for it)
    got = _slice(["runs = train()", "BEST = pick(runs)", "def soft_targets(logits, T):\n    return logits * BEST"])
    assert set(got) == {0, 1, 2}
    # magics become calls; a cell that does not parse runs whole when it defines the exercise
    got = _slice(["%matplotlib inline\nimport torch", "def soft_targets(logits, T)\n    return 1"])
    assert got[1].startswith("def soft_targets(logits, T)") and 0 not in got


@pytest.fixture(scope="module")
def lab1_batch(tmp_path_factory):
    ok, why = sandbox.available()
    if not ok:
        if os.environ.get("KDCOURSE_REQUIRE_SANDBOX") == "1":
            pytest.fail(f"KDCOURSE_REQUIRE_SANDBOX=1 but the sandbox cannot start: {why}")
        pytest.skip(f"bubblewrap sandbox unavailable: {why}")
    sol, lab = labgen.read(LAB1_SOLUTION), reduced(labgen.read(LAB1_LAB))
    good = reduced(student_copy(sol))
    home = tmp_path_factory.mktemp("instructor")
    subs = home / "submissions"
    after_params = first_code_after_parameters(good)
    k = cell_defining(good, "kd_loss")
    deleted = copy.deepcopy(good)
    del deleted["cells"][k]
    reordered = copy.deepcopy(good)
    reordered["cells"].insert(after_params, reordered["cells"].pop(k))  # before the imports
    cases = {
        "solution": good,
        "untouched": lab,
        "no_T2": reduced(student_copy(sol, {"kd_loss": kd_loss_without_T2})),
        # hostile code where the grader runs it: in a statement an exercise needs
        "deleted": deleted,
        "reordered": reordered,
        "raises": insert_needed(good, imports_cell(good) + 1, "raise RuntimeError('boom')"),
        "writes_files": insert_needed(good, imports_cell(good) + 1,
                                      "import os\nopen('answers.txt', 'w').write('42')\nos.makedirs('out', exist_ok=True)\n"
                                      "open(os.path.join('out', 'w.bin'), 'wb').write(bytes(100))\nopen('../up.txt', 'w').write('x')"),
        "floods": insert_needed(good, imports_cell(good) + 1, "for _ in range(10**5):\n    print('spam ' * 40)"),
        "loop_forever": insert_needed(good, after_params, "while True:\n    pass"),
        "exits": insert_needed(good, after_params, "import os\nos._exit(3)"),
        "loop_ignoring_alarms": insert_needed(good, after_params,
                                              "import signal, time\nfor s in (signal.SIGALRM, signal.SIGINT, signal.SIGTERM):\n"
                                              "    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    time.sleep(0.05)"),
        "eats_memory": insert_needed(good, imports_cell(good) + 1, "x = bytearray(8 * 2**30)"),
        # the same code in cells no exercise needs: not run, so it cannot lower the score either
        "unneeded_loop": insert(good, after_params, "while True:\n    pass"),
        "unneeded_exit": insert(good, imports_cell(good) + 1, "import os\nos._exit(3)"),
    }
    for name, nb in cases.items():
        write(nb, subs / f"{name}.ipynb")
    (subs / "garbage.ipynb").write_text("this is not a notebook")
    before = safe_io.digest(str(subs))
    cwd = os.getcwd()
    os.chdir(home)
    try:
        rc = cli.main(["grade", LAB1_LAB, "submissions", "--out", "grades", "--timeout", str(BATCH_TIMEOUT),
                       "--probe-timeout", "30", "--jobs", "3"])
    finally:
        os.chdir(cwd)
    rows = read_rows(home / "grades" / "01_classic_kd.csv")
    rows["__rc__"] = rc
    rows["__changed__"] = safe_io.digest(str(subs)) != before or sorted(os.listdir(home)) != ["grades", "submissions"]
    rows["__grades__"] = sorted(os.listdir(home / "grades"))
    rows["__markdown__"] = (home / "grades" / "01_classic_kd.md").read_text(encoding="utf-8")
    return rows


def _points(row):
    return row["soft_targets"], row["kd_loss"]


@pytest.mark.notebooks
def test_solution_scores_full_marks_and_untouched_lab_zero(lab1_batch):
    r = lab1_batch["solution"]
    assert r["total"] == r["max"] != "0" and r["status"] == "graded" and r["sandbox"] == "bubblewrap"
    u = lab1_batch["untouched"]
    assert u["total"] == "0" and "NotImplementedError" in u["soft_targets hint"]


@pytest.mark.notebooks
def test_missing_T2_loses_exactly_that_exercise_with_its_hint(lab1_batch):
    r = lab1_batch["no_T2"]
    assert _points(r) == ("1", "0") and float(r["total"]) == float(r["max"]) - 1
    assert "T²" in r["kd_loss hint"] or "T^2" in r["kd_loss hint"] or "T*T" in r["kd_loss hint"], r["kd_loss hint"]


@pytest.mark.notebooks
def test_a_raising_cell_is_noted_and_the_rest_still_graded(lab1_batch):
    r = lab1_batch["raises"]
    assert r["total"] == r["max"] and "RuntimeError" in r["notes"]


@pytest.mark.notebooks
def test_deleted_and_reordered_cells(lab1_batch):
    d = lab1_batch["deleted"]
    assert _points(d) == ("1", "0") and "missing" in d["kd_loss hint"] and "deleted" in d["notes"]
    r = lab1_batch["reordered"]
    assert "reordered" in r["notes"] and r["soft_targets"] == "1"


@pytest.mark.notebooks
def test_files_written_and_floods_change_nothing(lab1_batch):
    for name in ("writes_files", "floods"):
        assert lab1_batch[name]["total"] == lab1_batch[name]["max"], lab1_batch[name]
    assert lab1_batch["__changed__"] is False  # submissions and the instructor's folder untouched


@pytest.mark.notebooks
def test_time_limit_exit_and_ignored_alarms_stop_only_that_notebook(lab1_batch):
    for name in ("loop_forever", "exits", "loop_ignoring_alarms"):
        r = lab1_batch[name]
        assert r["total"] == "0" and r["status"] in ("time limit", "kernel died"), (name, r)
    # a kernel that ignores its alarms is killed at the time limit + CELL_GRACE counted from its start,
    # not after the 120 s allowed for starting on a loaded machine
    assert float(lab1_batch["loop_ignoring_alarms"]["seconds"]) < BATCH_TIMEOUT + grade.CELL_GRACE + 30, \
        lab1_batch["loop_ignoring_alarms"]


@pytest.mark.notebooks
def test_code_no_exercise_needs_does_not_run(lab1_batch):
    for name in ("unneeded_loop", "unneeded_exit"):
        r = lab1_batch[name]
        assert r["total"] == r["max"] != "0" and r["status"] == "graded", (name, r)


@pytest.mark.notebooks
def test_a_memory_hog_fails_its_cell_not_the_batch(lab1_batch):
    r = lab1_batch["eats_memory"]
    assert r["total"] == r["max"] and "MemoryError" in r["notes"], r


@pytest.mark.notebooks
def test_a_file_that_is_not_a_notebook(lab1_batch):
    r = lab1_batch["garbage"]
    assert r["status"] == "not a notebook" and r["total"] == "0"


@pytest.mark.notebooks
def test_batch_completes_with_every_file(lab1_batch):
    assert lab1_batch["__rc__"] == 0
    students = {k for k in lab1_batch if not k.startswith("__")}
    assert students == {"solution", "untouched", "no_T2", "raises", "deleted", "reordered", "writes_files", "floods",
                        "loop_forever", "loop_ignoring_alarms", "exits", "eats_memory", "garbage", "unneeded_loop",
                        "unneeded_exit"}
    assert lab1_batch["__grades__"] == ["01_classic_kd.csv", "01_classic_kd.md", "01_classic_kd.moodle.csv", "feedback"]
    assert lab1_batch["__markdown__"].count("\n| ") == 1 + len(students)  # header + one row per student

"""The grader: exercises and checks read from a solution, one kernel per
submission in its own temporary folder, limits on time and output, and a
score table. The slow part (kernels) is two batch runs shared by the tests
that read their rows; the rest is fast and runs in ``make test-fast``."""
from __future__ import annotations

import ast
import copy
import csv
import glob
import hashlib
import os
import tempfile

import nbformat
import pytest

from kdcourse import cli, grading, labgen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAB1_SOLUTION = os.path.join(ROOT, "solutions", "01_classic_kd.ipynb")
LAB1_LAB = os.path.join(ROOT, "labs", "01_classic_kd.ipynb")


# --------------------------------------------------------------------------
# Helpers: notebooks written the way students hand them in
# --------------------------------------------------------------------------

def _code(src, tags=(), **meta):
    cell = nbformat.v4.new_code_cell(src)
    if tags:
        cell.metadata["tags"] = list(tags)
    cell.metadata.update(meta)
    return cell


def tiny_solution() -> dict:
    """A two-exercise solution in the course's conventions, with a hidden test,
    points in metadata, and an expensive cell after the exercises."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Tiny lab"),
        _code("PROFILE = None", tags=["parameters"]),
        _code("import torch\nimport torch.nn.functional as F\nfrom kdcourse import checks"),
        _code('def soft_targets(logits, T):\n    """softmax(logits / T)."""\n    ### BEGIN SOLUTION\n'
              '    if T <= 0:\n        raise ValueError("T must be positive")\n'
              '    return torch.softmax(logits / T, dim=-1)\n    ### END SOLUTION\n\n\n'
              'checks.check_soft_targets(soft_targets)\n'
              '### BEGIN HIDDEN TESTS\ntry:\n    soft_targets(torch.zeros(3), 0.0)\nexcept ValueError:\n    pass\n'
              'else:\n    raise AssertionError("soft_targets must reject T <= 0 with a ValueError")\n### END HIDDEN TESTS',
              kdcourse={"points": 2}),
        nbformat.v4.new_markdown_cell("Some prose."),
        _code("def helper(x):\n    return x\n\n\ndef kd_loss(student_logits, teacher_logits, labels, T=4.0, alpha=0.9):\n"
              "    ### BEGIN SOLUTION\n"
              "    soft = F.kl_div(F.log_softmax(student_logits / T, -1), F.softmax(teacher_logits / T, -1),\n"
              "                    reduction='batchmean') * T * T\n"
              "    return alpha * soft + (1 - alpha) * F.cross_entropy(student_logits, labels)\n"
              "    ### END SOLUTION"),
        _code("checks.check_kd_loss(kd_loss)\nprint('done')"),
        _code("import time\ntime.sleep(3600)  # 'training': the grader must never get here", tags=["training"]),
    ]
    return nb


def student_copy(solution: dict, bodies: dict | None = None) -> dict:
    """What a student hands in: the lab with every exercise filled in with the
    solution's code (or with ``bodies[function name]``), hidden tests absent."""
    nb = copy.deepcopy(solution)
    bodies = bodies or {}
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        text = labgen.source(cell)
        owner = None
        tree = ast.parse(text) if labgen.BEGIN in text else None
        out, skip_hidden, in_block = [], False, False
        for lineno, line in enumerate(text.split("\n"), 1):
            s = line.strip()
            if s == labgen.BEGIN_HIDDEN:
                skip_hidden = True
            elif s == labgen.END_HIDDEN:
                skip_hidden = False
            elif s == labgen.BEGIN:
                in_block = True
                owner = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.lineno <= lineno <= n.end_lineno)
                indent = line[: len(line) - len(line.lstrip())]
                if owner.name in bodies:
                    out.extend(indent + b for b in bodies[owner.name](owner).split("\n"))
            elif s == labgen.END:
                in_block = False
            elif skip_hidden or (in_block and owner.name in bodies):
                continue
            else:
                out.append(line)
        cell["source"] = "\n".join(out)
    return nb


def kd_loss_without_T2(fn: ast.FunctionDef) -> str:
    """The classic mistake: the KL term is not multiplied by T²."""
    s, t, y, T, alpha = [a.arg for a in fn.args.args[:5]]
    return (f"import torch.nn.functional as _F\n"
            f"soft = _F.kl_div(_F.log_softmax({s} / {T}, dim=-1), _F.softmax({t} / {T}, dim=-1), reduction='batchmean')\n"
            f"return {alpha} * soft + (1 - {alpha}) * _F.cross_entropy({s}, {y})")


def soft_targets_without_validation(fn: ast.FunctionDef) -> str:
    z, T = [a.arg for a in fn.args.args[:2]]
    return f"return torch.softmax({z} / {T}, dim=-1)"


def cell_defining(nb: dict, name: str) -> int:
    return next(i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code" and f"def {name}(" in labgen.source(c))


def first_code_after_parameters(nb: dict) -> int:
    return next(i for i, c in enumerate(nb["cells"]) if "parameters" in c.get("metadata", {}).get("tags", [])) + 1


def imports_cell(nb: dict) -> int:
    return next(i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code" and "from kdcourse import" in labgen.source(c))


def insert(nb: dict, index: int, source: str) -> dict:
    nb = copy.deepcopy(nb)
    nb["cells"].insert(index, dict(_code(source)))
    return nb


def write(nb: dict, path) -> str:
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    nbformat.write(nbformat.from_dict(nb), str(path))
    return str(path)


def snapshot(root: str, skip: str | None = None) -> dict:
    """Every file under ``root`` with its content hash (``skip``: a subfolder)."""
    state = {}
    for base, dirs, files in os.walk(root):
        if skip and os.path.abspath(base).startswith(os.path.abspath(skip)):
            continue
        for f in files:
            p = os.path.join(base, f)
            with open(p, "rb") as fh:
                state[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return state


def grade_cli(lab_path, submissions, out, *extra) -> dict:
    """Run ``kdcourse grade`` and read back its CSV (student -> row)."""
    rc = cli.main(["grade", str(lab_path), str(submissions), "--out", str(out), *map(str, extra)])
    assert rc == 0
    name = os.path.splitext(os.path.basename(str(lab_path)))[0]
    with open(os.path.join(str(out), f"{name}.csv"), encoding="utf-8") as f:
        rows = {r["student"]: r for r in csv.DictReader(f)}
    with open(os.path.join(str(out), f"{name}.md"), encoding="utf-8") as f:
        rows["__markdown__"] = f.read()
    return rows


# --------------------------------------------------------------------------
# Fast: reading a lab, planning a run, writing the table
# --------------------------------------------------------------------------

def test_exercises_checks_hidden_tests_and_points_come_from_the_solution():
    ex = grading.exercises(tiny_solution())
    assert [e.name for e in ex] == ["soft_targets", "kd_loss"]
    assert [e.points for e in ex] == [2.0, 1.0]
    assert ex[0].checks == ["checks.check_soft_targets(soft_targets)"]
    assert ex[1].checks == ["checks.check_kd_loss(kd_loss)"]  # from the cell after the exercise
    assert len(ex[0].hidden) == 1 and "must reject T <= 0" in ex[0].hidden[0]
    assert ex[1].hidden == [] and ex[1].functions == ["kd_loss"]  # 'helper' holds no solution block


@pytest.mark.skipif(not os.path.exists(LAB1_SOLUTION), reason="lab 1 solution not in this checkout")
def test_lab1_exercises():
    ex = grading.load_lab(LAB1_SOLUTION).exercises
    names = [e.name for e in ex]
    assert names[:2] == ["soft_targets", "kd_loss"]
    assert ex[0].checks == ["checks.check_soft_targets(soft_targets)"]
    assert ex[1].checks == ["checks.check_kd_loss(kd_loss)"]


def test_plan_stops_after_the_last_exercise_and_honours_skip_tags():
    sol = tiny_solution()
    lab = grading.Lab("tiny", "x", sol, labgen.make_lab(sol), grading.exercises(sol))
    sub = student_copy(sol)
    order, where = grading.plan(lab, sub, grading.Options())
    assert order == [1, 2, 3, 5] and where == {"soft_targets": [3], "kd_loss": [5]}
    order, _ = grading.plan(lab, sub, grading.Options(all_cells=True, skip_tags=("training",)))
    assert order == [1, 2, 3, 5, 6]
    moved = copy.deepcopy(sub)
    moved["cells"].append(moved["cells"].pop(3))  # soft_targets moved to the end: everything before it runs
    order, where = grading.plan(lab, moved, grading.Options())
    assert where["soft_targets"] == [7] and order[-1] == 7 and 6 in order


def test_structure_notes_report_deleted_added_and_reordered_cells():
    sol = tiny_solution()
    lab = labgen.make_lab(sol)
    assert grading.structure_notes(lab, student_copy(sol)) == []
    sub = copy.deepcopy(lab)
    del sub["cells"][4]
    sub["cells"].insert(0, dict(_code("print('mine')")))
    sub["cells"][2], sub["cells"][3] = sub["cells"][3], sub["cells"][2]
    notes = " ".join(grading.structure_notes(lab, sub))
    assert "1 lab cell(s) deleted (lab cells 4)" in notes and "1 cell(s) added" in notes and "reordered" in notes
    # without cell ids (an old front end), cells match by source; edited exercise cells by what they define
    ex = grading.exercises(sol)
    no_ids = student_copy(sol)
    for cell in no_ids["cells"]:
        cell.pop("id", None)
    no_ids["cells"][3]["source"] += "\n# my own comment"
    assert grading.structure_notes(lab, no_ids, ex) == []
    del no_ids["cells"][3]
    assert grading.structure_notes(lab, no_ids, ex) == ["1 lab cell(s) deleted (lab cells 3)"]


def test_load_lab_finds_the_solution_and_explains_what_is_missing(tmp_path):
    sol = tiny_solution()
    write(sol, tmp_path / "course" / "solutions" / "00_tiny.ipynb")
    labgen.generate_all(str(tmp_path / "course" / "solutions"), str(tmp_path / "course" / "labs"))
    lab = grading.load_lab(str(tmp_path / "course" / "labs" / "00_tiny.ipynb"))
    assert lab.solution_path.endswith(os.path.join("solutions", "00_tiny.ipynb")) and lab.name == "00_tiny"
    lonely = write(labgen.make_lab(sol), tmp_path / "elsewhere" / "00_tiny.ipynb")
    with pytest.raises(FileNotFoundError, match="--solution"):
        grading.load_lab(lonely)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        grading.load_lab(str(tmp_path / "nope.ipynb"))
    plain = nbformat.v4.new_notebook()
    plain.cells = [_code("x = 1")]
    with pytest.raises(ValueError, match="no exercise cells"):
        grading.load_lab(str(tmp_path / "elsewhere" / "00_tiny.ipynb"), solution=write(plain, tmp_path / "plain.ipynb"))


def test_find_submissions_files_and_folders(tmp_path):
    for p in ("alice.ipynb", "bob/lab1.ipynb", "bob/.ipynb_checkpoints/lab1-checkpoint.ipynb", "notes.txt"):
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / p).write_text("{}")
    assert [s for s, _ in grading.find_submissions(str(tmp_path))] == ["alice", "bob/lab1"]
    with pytest.raises(FileNotFoundError, match="submissions folder"):
        grading.find_submissions(str(tmp_path / "missing"))


def test_tables_have_one_row_per_student_and_escape_markdown(tmp_path):
    sol = tiny_solution()
    lab = grading.Lab("tiny", "x", sol, labgen.make_lab(sol), grading.exercises(sol))
    results = [
        grading.Result("ann", "ann.ipynb", [grading.Score("soft_targets", 2, 2), grading.Score("kd_loss", 0, 1, "off by T² | see")]),
        grading.Result("ben", "ben.ipynb", [grading.Score("soft_targets", 0, 2, "x"), grading.Score("kd_loss", 1, 1)],
                       "time limit", ["cell 3 hit the limit"]),
    ]
    csv_path, md_path = grading.write_tables(lab, results, str(tmp_path), grading.Options())
    rows = list(csv.DictReader(open(csv_path, encoding="utf-8")))
    assert [r["student"] for r in rows] == ["ann", "ben"]
    assert rows[0]["kd_loss hint"] == "off by T² | see" and rows[0]["total"] == "2" and rows[0]["max"] == "3"
    md = open(md_path, encoding="utf-8").read()
    assert "| student | soft_targets (2) | kd_loss (1) | total | status | notes |" in md
    assert "0 — off by T² \\| see" in md and "| 1 / 3 | time limit | cell 3 hit the limit |" in md


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    assert cli.main(["grade", str(tmp_path / "none.ipynb"), str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().out
    sol = write(tiny_solution(), tmp_path / "solutions" / "00_tiny.ipynb")
    assert cli.main(["grade", sol, str(tmp_path / "no-such-folder")]) == 2
    assert cli.main(["grade", sol, str(tmp_path), "--timeout", "0"]) == 2
    assert cli.main(["grade", sol, str(tmp_path), "--profile", "huge"]) == 2
    assert "not known" in capsys.readouterr().out


# --------------------------------------------------------------------------
# Kernels: a tiny lab with a hidden test (fast to run)
# --------------------------------------------------------------------------

@pytest.mark.notebooks
def test_hidden_tests_run_and_only_cells_up_to_the_last_exercise(tmp_path, monkeypatch):
    sol = tiny_solution()
    course = tmp_path / "course"
    write(sol, course / "solutions" / "00_tiny.ipynb")
    labgen.generate_all(str(course / "solutions"), str(course / "labs"))
    subs = tmp_path / "submissions"
    write(student_copy(sol), subs / "full.ipynb")
    write(student_copy(sol, {"soft_targets": soft_targets_without_validation}), subs / "no_validation.ipynb")
    monkeypatch.chdir(tmp_path)
    # the last cell sleeps for an hour: a 60 s limit proves it is never run
    rows = grade_cli(course / "labs" / "00_tiny.ipynb", subs, tmp_path / "grades", "--timeout", "60")
    full, nov = rows["full"], rows["no_validation"]
    assert (full["soft_targets"], full["kd_loss"], full["total"], full["max"], full["status"]) == ("2", "1", "3", "3", "graded")
    assert full["notes"] == ""
    assert nov["soft_targets"] == "0" and nov["kd_loss"] == "1"
    assert nov["soft_targets hint"] == "hidden test failed: AssertionError: soft_targets must reject T <= 0 with a ValueError"


# --------------------------------------------------------------------------
# Kernels: lab 1, every kind of bad submission in one batch
# --------------------------------------------------------------------------

BATCH_TIMEOUT = 30  # seconds per notebook; the good ones need a few


@pytest.fixture(scope="module")
def lab1_batch(tmp_path_factory):
    if not (os.path.exists(LAB1_SOLUTION) and os.path.exists(LAB1_LAB)):
        pytest.fail("solutions/01_classic_kd.ipynb and labs/01_classic_kd.ipynb must exist to test the grader on lab 1")
    sol = labgen.read(LAB1_SOLUTION)
    lab = labgen.read(LAB1_LAB)
    good = student_copy(sol)
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
        "no_T2": student_copy(sol, {"kd_loss": kd_loss_without_T2}),
        "raises": insert(good, imports_cell(good) + 1, "raise RuntimeError('boom')"),
        "deleted": deleted,
        "reordered": reordered,
        "writes_files": insert(good, imports_cell(good) + 1,
                               "import os\nopen('answers.txt', 'w').write('42')\nos.makedirs('out', exist_ok=True)\n"
                               "open(os.path.join('out', 'w.bin'), 'wb').write(bytes(100))\nopen('../up.txt', 'w').write('x')"),
        "floods": insert(good, imports_cell(good) + 1, "for _ in range(10**6):\n    print('spam ' * 40)"),
        "loop_forever": insert(good, after_params, "while True:\n    pass"),
        "exits": insert(good, after_params, "import os\nos._exit(3)"),
        "loop_ignoring_interrupts": insert(good, after_params,
                           "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    time.sleep(0.05)"),
    }
    for name, nb in cases.items():
        write(nb, subs / f"{name}.ipynb")
    (subs / "garbage.ipynb").write_text("this is not a notebook")
    temp_before = set(glob.glob(os.path.join(tempfile.gettempdir(), "kdgrade-*")))
    before = snapshot(str(home))
    cwd = os.getcwd()
    os.chdir(home)
    try:
        rows = grade_cli(LAB1_LAB, "submissions", "grades", "--timeout", BATCH_TIMEOUT, "--max-output", 200_000,
                         "--check-timeout", 60, "--jobs", 4)
    finally:
        os.chdir(cwd)
    rows["__changed__"] = snapshot(str(home), skip=str(home / "grades")) != before
    rows["__temp_left__"] = set(glob.glob(os.path.join(tempfile.gettempdir(), "kdgrade-*"))) - temp_before
    rows["__grades__"] = sorted(os.listdir(home / "grades"))
    return rows


def _points(row):
    return row["soft_targets"], row["kd_loss"]


@pytest.mark.notebooks
def test_solution_scores_full_marks(lab1_batch):
    r = lab1_batch["solution"]
    assert r["total"] == r["max"] and r["status"] == "graded" and r["notes"] == ""
    assert _points(r) == ("1", "1")


@pytest.mark.notebooks
def test_untouched_lab_scores_zero(lab1_batch):
    r = lab1_batch["untouched"]
    assert r["total"] == "0" and r["status"] == "graded"
    assert r["kd_loss hint"] == "not attempted: kd_loss still raises NotImplementedError"


@pytest.mark.notebooks
def test_missing_T2_loses_exactly_that_exercise(lab1_batch):
    r = lab1_batch["no_T2"]
    assert _points(r) == ("1", "0") and r["soft_targets hint"] == ""
    assert "T²" in r["kd_loss hint"] and "scale the soft loss by T**2" in r["kd_loss hint"]
    assert float(r["total"]) == float(r["max"]) - 1


@pytest.mark.notebooks
def test_a_raising_cell_is_recorded_and_the_rest_still_graded(lab1_batch):
    r = lab1_batch["raises"]
    assert _points(r) == ("1", "1") and "raised RuntimeError: boom" in r["notes"]


@pytest.mark.notebooks
def test_deleted_exercise_cell(lab1_batch):
    r = lab1_batch["deleted"]
    assert _points(r) == ("1", "0")
    assert r["kd_loss hint"] == "the exercise cell is missing (no `def kd_loss` in the notebook)"
    assert "lab cell(s) deleted" in r["notes"]


@pytest.mark.notebooks
def test_reordered_cells_are_noted_and_graded_on_their_definitions(lab1_batch):
    r = lab1_batch["reordered"]
    assert _points(r) == ("1", "1") and "cells reordered" in r["notes"]
    assert "NameError" in r["notes"]  # its own check ran before the imports


@pytest.mark.notebooks
def test_files_written_stay_in_the_temporary_folder(lab1_batch):
    r = lab1_batch["writes_files"]
    assert _points(r) == ("1", "1")
    assert "wrote files in its folder: answers.txt, out/w.bin" in r["notes"]


@pytest.mark.notebooks
def test_output_flood_is_capped_and_interrupted(lab1_batch):
    r = lab1_batch["floods"]
    assert _points(r) == ("1", "1") and r["notes"].count("output over the cap of 200,000 bytes") == 1
    assert float(r["seconds"]) < BATCH_TIMEOUT


@pytest.mark.notebooks
def test_infinite_loop_hits_the_time_limit(lab1_batch):
    r = lab1_batch["loop_forever"]
    assert r["status"] == "time limit" and r["total"] == "0"
    assert r["kd_loss hint"].startswith("not run: cell ") and "time limit" in r["kd_loss hint"]


@pytest.mark.notebooks
def test_a_kernel_ignoring_interrupts_is_killed(lab1_batch):
    r = lab1_batch["loop_ignoring_interrupts"]
    assert r["status"] == "kernel killed" and r["total"] == "0"
    assert "ignored the interrupt" in r["kd_loss hint"]


@pytest.mark.notebooks
def test_a_kernel_that_exits(lab1_batch):
    r = lab1_batch["exits"]
    assert r["status"] == "kernel died" and r["total"] == "0"
    assert r["soft_targets hint"].startswith("not graded: in cell ") and "the kernel died" in r["soft_targets hint"]


@pytest.mark.notebooks
def test_a_file_that_is_not_a_notebook(lab1_batch):
    r = lab1_batch["garbage"]
    assert r["status"] == "not a notebook" and r["total"] == "0"


@pytest.mark.notebooks
def test_batch_completes_and_changes_nothing_outside_its_temporary_folders(lab1_batch):
    students = {k for k in lab1_batch if not k.startswith("__")}
    assert students == {"solution", "untouched", "no_T2", "raises", "deleted", "reordered", "writes_files", "floods",
                        "loop_forever", "loop_ignoring_interrupts", "exits", "garbage"}
    assert lab1_batch["__changed__"] is False  # submissions and the instructor's folder untouched
    assert lab1_batch["__temp_left__"] == set()  # every temporary folder removed
    assert lab1_batch["__grades__"] == ["01_classic_kd.csv", "01_classic_kd.md"]
    md = lab1_batch["__markdown__"]
    assert md.count("\n| ") == 1 + len(students)  # header + one row per student


# --------------------------------------------------------------------------
# The course report (the other instructor tool): a tiny notebook, smoke profile
# --------------------------------------------------------------------------

def report_fixture(folder) -> None:
    ok = nbformat.v4.new_notebook()
    ok.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    ok.cells = [
        nbformat.v4.new_markdown_cell("# Tiny\n\n## 1. Measured things"),
        _code("PROFILE = None", tags=["parameters"]),
        _code("import os\nprint(f'profile={PROFILE} env={os.environ[\"KDCOURSE_PROFILE\"]}')\nprint('test accuracy: 93.50%')"),
        _code("from IPython.display import Markdown, display\n"
              "display(Markdown('| model | acc |\\n|---|---|\\n| student | 91.2 |'))\n42"),
        nbformat.v4.new_markdown_cell("## 2. A plot"),
        _code("import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.plot([1, 2, 3]);"),
        _code("import sys\nprint('a warning', file=sys.stderr)"),
    ]
    write(ok, folder / "01_tiny.ipynb")
    broken = nbformat.v4.new_notebook()
    broken.metadata["kernelspec"] = ok.metadata["kernelspec"]
    broken.cells = [_code("PROFILE = None", tags=["parameters"]), _code("print('before')\nraise ValueError('no data here')")]
    write(broken, folder / "02_broken.ipynb")
    write(broken, folder / "scratch.ipynb")  # not NN_name: not a course notebook


@pytest.mark.notebooks
def test_report_runs_every_solution_and_keeps_figures_tables_and_runtimes(tmp_path, capsys):
    report_fixture(tmp_path / "solutions")
    out = tmp_path / "report"
    rc = cli.main(["report", "--profile", "smoke", "--solutions", str(tmp_path / "solutions"), "--out", str(out)])
    assert rc == 1  # 02_broken failed, and says so
    assert "FAILED: 02_broken" in capsys.readouterr().out
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "| [01_tiny](#01_tiny) | ok |" in md and "| [02_broken](#02_broken) | failed |" in md
    assert "profile `smoke`" in md and "scratch" not in md
    assert "profile=smoke env=smoke" in md and "test accuracy: 93.50%" in md  # stdout, in the chosen profile
    assert "| student | 91.2 |" in md and "\n42\n" in md  # Markdown tables inline, plain results fenced
    assert "### 1. Measured things" in md and "### 2. A plot" in md
    assert "![cell 5](figures/01_tiny/cell05-1.png)" in md
    assert (out / "figures" / "01_tiny" / "cell05-1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "a warning" not in md and "<Figure size" not in md
    assert "ValueError: no data here" in md
    results = __import__("json").loads((out / "results.json").read_text(encoding="utf-8"))
    runtimes = {nb["name"]: nb["seconds"] for nb in results["notebooks"]}
    assert set(runtimes) == {"01_tiny", "02_broken"} and all(s > 0 for s in runtimes.values())
    assert f"{runtimes['01_tiny']:.1f}" in md
    slowest = {nb["name"]: nb["slowest"] for nb in results["notebooks"]}
    assert slowest["01_tiny"].startswith("#") and "(1. Measured things)" in slowest["01_tiny"] and slowest["02_broken"] is None
    assert f"Slowest cells: {slowest['01_tiny']}." in md


def test_report_rejects_bad_arguments(tmp_path, capsys):
    assert cli.main(["report", "--profile", "huge", "--out", str(tmp_path)]) == 2
    assert "not known" in capsys.readouterr().out
    assert cli.main(["report", "--solutions", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    (tmp_path / "empty").mkdir()
    assert cli.main(["report", "--solutions", str(tmp_path / "empty"), "--out", str(tmp_path)]) == 2

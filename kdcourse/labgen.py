"""Generate student labs from solution notebooks, and keep notebooks clean.

Marker convention (nbgrader's):

* in a code cell, the lines between ``### BEGIN SOLUTION`` and
  ``### END SOLUTION`` become ``# YOUR CODE HERE`` and
  ``raise NotImplementedError()`` at the marker's indentation;
* in a Markdown cell, the text between the markers becomes ``YOUR ANSWER HERE``;
* lines between ``### BEGIN HIDDEN TESTS`` and ``### END HIDDEN TESTS`` are
  instructor-only checks: removed from the lab, run by the grader.

Notebooks are stored without outputs, except the outputs of cells that nbval
checks (cells containing ``# NBVAL_CHECK_OUTPUT``) in solutions.

    python -m kdcourse labgen           # write labs/ from solutions/
    python -m kdcourse labgen --check   # exit 1 if a committed lab is stale
"""
from __future__ import annotations

import copy
import glob
import json
import os
import re

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
BEGIN_HIDDEN, END_HIDDEN = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"
CHECK_MARK = "NBVAL_CHECK_OUTPUT"
STUB = ("# YOUR CODE HERE", "raise NotImplementedError()")
ANSWER_STUB = "YOUR ANSWER HERE"


class MarkerError(ValueError):
    pass


def source(cell) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _set_source(cell, text: str) -> None:
    cell["source"] = text


def _replace_blocks(text: str, begin: str, end: str, replacement, where: str) -> str:
    """Replace every begin..end block; ``replacement(indent)`` gives new lines."""
    out, inside, indent = [], False, ""
    for lineno, line in enumerate(text.split("\n"), 1):
        stripped = line.strip()
        if stripped == begin:
            if inside:
                raise MarkerError(f"{where}: line {lineno}: {begin!r} inside another block")
            inside, indent = True, line[: len(line) - len(line.lstrip())]
            out.extend(replacement(indent))
        elif stripped == end:
            if not inside:
                raise MarkerError(f"{where}: line {lineno}: {end!r} without {begin!r}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise MarkerError(f"{where}: {begin!r} is never closed by {end!r}")
    return "\n".join(out)


def is_exercise(cell) -> bool:
    return BEGIN in source(cell)


def student_cell(cell, where: str = "cell"):
    """The student's version of one cell (a new dict)."""
    cell = copy.deepcopy(cell)
    text = source(cell)
    if cell["cell_type"] == "code":
        text = _replace_blocks(text, BEGIN_HIDDEN, END_HIDDEN, lambda ind: [], where)
        text = _replace_blocks(text, BEGIN, END, lambda ind: [ind + s for s in STUB], where)
    elif cell["cell_type"] == "markdown":
        text = _replace_blocks(text, BEGIN, END, lambda ind: [ind + ANSWER_STUB], where)
    _set_source(cell, text)
    return cell


def clear_outputs(cell, keep_checked: bool) -> None:
    meta = cell.get("metadata", {})
    for key in ("execution", "collapsed", "scrolled", "papermill", "lines_to_next_cell"):
        meta.pop(key, None)
    if cell["cell_type"] != "code":
        cell.pop("outputs", None)
        cell.pop("execution_count", None)
        return
    checked = keep_checked and CHECK_MARK in source(cell) and cell.get("outputs")
    if not checked:
        cell["outputs"] = []
    # nbval rejects stored outputs of a cell that "never ran", so a checked
    # cell keeps a fixed count of 1 (deterministic bytes); all others get None.
    cell["execution_count"] = 1 if checked else None
    for out in cell.get("outputs", []):
        if "execution_count" in out:
            out["execution_count"] = 1


def strip(nb: dict, keep_checked: bool = True) -> dict:
    """Outputs removed (except nbval-checked cells when ``keep_checked``),
    execution counts and run metadata cleared."""
    nb = copy.deepcopy(nb)
    for cell in nb["cells"]:
        clear_outputs(cell, keep_checked)
    for key in ("widgets", "papermill", "execution", "kdcourse_seconds"):
        nb.get("metadata", {}).pop(key, None)
    return nb


def make_lab(solution: dict, where: str = "notebook") -> dict:
    """The student lab generated from a solution notebook (dict)."""
    nb = strip(solution, keep_checked=False)
    nb["cells"] = [student_cell(c, f"{where} cell {i}") for i, c in enumerate(nb["cells"])]
    return nb


def dumps(nb: dict) -> str:
    """Deterministic JSON (the same bytes for the same notebook)."""
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def read(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write(nb: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(dumps(nb))
    os.replace(tmp, path)


def lab_path(solution_path: str, labs_dir: str) -> str:
    return os.path.join(labs_dir, os.path.basename(solution_path))


def generate_all(solutions_dir: str = "solutions", labs_dir: str = "labs", check: bool = False) -> list[str]:
    """Write (or, with ``check``, compare) every lab. Returns the stale or
    written paths."""
    changed = []
    for sol in sorted(glob.glob(os.path.join(solutions_dir, "*.ipynb"))):
        lab = make_lab(read(sol), sol)
        path = lab_path(sol, labs_dir)
        current = open(path, encoding="utf-8").read() if os.path.exists(path) else None
        if current != dumps(lab):
            changed.append(path)
            if not check:
                os.makedirs(labs_dir, exist_ok=True)
                write(lab, path)
    return changed


def exercise_cells(nb: dict) -> list[int]:
    """Indices of cells containing a solution block."""
    return [i for i, c in enumerate(nb["cells"]) if is_exercise(c)]


_NUM_RE = re.compile(r"^\d\d_")


def solution_notebooks(solutions_dir: str = "solutions") -> list[str]:
    return sorted(p for p in glob.glob(os.path.join(solutions_dir, "*.ipynb")) if _NUM_RE.match(os.path.basename(p)))


# --------------------------------------------------------------------------
# The exercise declarations (kdcourse.checks.contract) against the solutions
# --------------------------------------------------------------------------

def solution_functions(nb: dict) -> dict:
    """``{name: cell index}`` for every top-level function (or class) holding
    a ``### BEGIN SOLUTION`` block in a code cell: the exercises."""
    import ast

    found = {}
    for i in exercise_cells(nb):
        cell = nb["cells"][i]
        if cell["cell_type"] != "code":
            continue
        src = source(cell)
        marks = [n + 1 for n, line in enumerate(src.split("\n")) if line.strip() == BEGIN]
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and \
                    any(node.lineno <= m <= (node.end_lineno or node.lineno) for m in marks):
                found[node.name] = i
    return found


def declaration_problems(nb: dict, stem: str) -> list[str]:
    """Where a solution and its lab's declared exercises
    (``kdcourse/checks/labN.py: EXERCISES``) disagree: a declared exercise no
    solution cell defines, an exercise cell no declaration names, points in a
    cell's metadata that differ from the declared ones (the declaration
    decides the points)."""
    from .checks import contract

    declared = contract.exercises_for(stem)
    names = [e.name for e in declared]
    module = contract.lab_module(stem)
    cells = solution_functions(nb)
    problems = [f"{stem}: exercise {n!r} is declared in {module}.EXERCISES but no solution cell defines it "
                f"inside a {BEGIN} block" for n in names if n not in cells]
    problems += [f"{stem}: solution cell {i} defines exercise function {n!r}, which {module}.EXERCISES does not "
                 f"declare" for n, i in cells.items() if n not in names]
    if len(set(names)) != len(names):
        problems.append(f"{stem}: two declared exercises share a name ({names})")
    for e in declared:
        if e.name in cells:
            meta = nb["cells"][cells[e.name]].get("metadata", {})
            for key in ("kdcourse", "nbgrader"):
                pts = (meta.get(key) or {}).get("points")
                if pts is not None and float(pts) != float(e.points):
                    problems.append(f"{stem}: cell {cells[e.name]} says {key}.points = {pts} but {module} declares "
                                    f"{e.name} worth {e.points:g} (the declaration decides; drop the metadata)")
    return problems


def check_declarations(solutions_dir: str = "solutions") -> list[str]:
    """:func:`declaration_problems` for every solution notebook."""
    problems = []
    for sol in solution_notebooks(solutions_dir):
        problems += declaration_problems(read(sol), os.path.splitext(os.path.basename(sol))[0])
    return problems

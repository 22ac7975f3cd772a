"""Notebooks as students hand them in, built from a lab's solution, for the
grading tests (tests/test_grading*.py): the solution's answers with the
hidden parts removed, chosen exercise bodies replaced, cells inserted."""
from __future__ import annotations

import ast
import copy
import csv
import os

import nbformat

from kdcourse import labgen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAB1_SOLUTION = os.path.join(ROOT, "solutions", "01_classic_kd.ipynb")
LAB1_LAB = os.path.join(ROOT, "labs", "01_classic_kd.ipynb")


def code_cell(src, tags=(), **meta):
    cell = nbformat.v4.new_code_cell(src)
    if tags:
        cell.metadata["tags"] = list(tags)
    cell.metadata.update(meta)
    return cell


def student_copy(solution: dict, bodies: dict | None = None) -> dict:
    """The lab with every exercise filled in with the solution's code (or
    with ``bodies[function name](FunctionDef)``), hidden tests absent."""
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
                owner = next((n for n in tree.body if isinstance(n, ast.FunctionDef)
                              and n.lineno <= lineno <= n.end_lineno), None)  # None: a top-level answer block
                indent = line[: len(line) - len(line.lstrip())]
                if owner is not None and owner.name in bodies:
                    out.extend(indent + b for b in bodies[owner.name](owner).split("\n"))
            elif s == labgen.END:
                in_block = False
            elif skip_hidden or (in_block and owner is not None and owner.name in bodies):
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


def cell_defining(nb: dict, name: str) -> int:
    return next(i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code" and f"def {name}(" in labgen.source(c))


def first_code_after_parameters(nb: dict) -> int:
    return next(i for i, c in enumerate(nb["cells"]) if "parameters" in c.get("metadata", {}).get("tags", [])) + 1


def imports_cell(nb: dict) -> int:
    return next(i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code" and "from kdcourse" in labgen.source(c))


def exercise_names(lab_path: str = LAB1_LAB) -> list[str]:
    from kdcourse.grading import grade

    return [e.name for e in grade.load_lab(lab_path).exercises]


def last_exercise_cell(nb: dict, names=None) -> int:
    return max(cell_defining(nb, n) for n in (names or exercise_names()))


def reduced(nb: dict, names=None) -> dict:
    """Only the cells grading needs: the ``parameters`` cell, the imports and
    each exercise cell (the lab's experiments between them left out, so a
    test batch takes seconds per notebook; the grader notes the deleted cells)."""
    names = set(names or exercise_names())
    nb = copy.deepcopy(nb)
    keep = []
    for i, c in enumerate(nb["cells"]):
        src = labgen.source(c)
        if c["cell_type"] != "code":
            continue
        tags = c.get("metadata", {}).get("tags", [])
        defines = any(f"def {n}(" in src for n in names)
        if "parameters" in tags or i == imports_cell(nb) or defines:
            keep.append(c)
    nb["cells"] = keep
    return nb


def insert(nb: dict, index: int, source: str) -> dict:
    nb = copy.deepcopy(nb)
    nb["cells"].insert(index, dict(code_cell(source)))
    return nb


def write(nb: dict, path, version: int = 4) -> str:
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    node = nbformat.from_dict(nb)
    if version != 4:
        node = nbformat.convert(node, version)
    nbformat.write(node, str(path), version=version)
    return str(path)


def read_rows(path) -> dict:
    """``{student: row}`` of a scores CSV."""
    with open(path, encoding="utf-8", newline="") as f:
        return {r["student"]: r for r in csv.DictReader(f)}


def insert_needed(nb: dict, index: int, source: str, exercise: str = "soft_targets") -> dict:
    """Insert ``source`` at ``index`` so that the grader runs it: the grader
    runs only what the exercises need (kdcourse.grading.slicing), so the code
    is executed (in the notebook's globals) by a statement binding ``_SETUP``,
    and ``exercise`` (defined after ``index``) takes ``_SETUP`` as a default
    argument. ``_SETUP`` is bound to ``None`` first, so code that raises
    leaves the exercise defined."""
    wrapped = (f"_SETUP = None\n\n\ndef _setup():\n    exec({source!r}, globals())\n\n\n_SETUP = _setup()\n")
    nb = insert(nb, index, wrapped)
    for cell in nb["cells"][index + 1:]:
        text = labgen.source(cell)
        head = f"def {exercise}("
        if cell["cell_type"] == "code" and head in text:
            start = text.index(head)
            close = text.index("):", start)
            cell["source"] = text[:close] + ", _setup_=_SETUP" + text[close:]
            return nb
    raise ValueError(f"no cell after {index} defines {exercise}")

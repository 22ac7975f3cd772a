"""What the grader tells a student when a probe's reply is not data, and
what it notes about cells that raised (used by :mod:`kdcourse.grading.grade`)."""
from __future__ import annotations

from ..checks import contract
from . import result as R


def error_notes(cell_errors: dict) -> list[str]:
    by_kind: dict = {}
    for i, (ename, evalue) in cell_errors.items():
        kind = "refused" if contract.REFUSAL_MARK in evalue else ename
        by_kind.setdefault(kind, []).append(i)
    notes = []
    for kind, idx in by_kind.items():
        cells = f"cell{'s' if len(idx) > 1 else ''} {', '.join(map(str, idx))}"
        notes.append(f"{cells} called a reference answer of the package, which does not run while grading"
                     if kind == "refused" else f"{cells} raised {kind}")
    return notes


def missing_hint(name: str, where: dict, cell_errors: dict, stopped: str) -> str:
    cells = where.get(name) or []
    if not cells:
        return f"the exercise cell is missing (no `def {name}(...)` in the notebook)"
    errs = [cell_errors[i] for i in cells if i in cell_errors]
    if errs:
        return f"the cell defining {name} failed: {errs[0][0]} {R.student_text(errs[0][1])}"
    if stopped:
        return f"not run: {stopped}"
    return f"{name} is not defined after the notebook's cells ran"


def reply_hint(ex, reply: dict, seed: int, where, cell_errors, stopped) -> tuple[str, list]:
    """(hint, notes) for a probe reply that is not data."""
    status = reply.get("status")
    name = ex.name
    if status == "missing":
        return missing_hint(name, where, cell_errors, stopped), []
    if status == "not_implemented":
        return f"not attempted: {name} still raises NotImplementedError", []
    if status == "refused":
        return (f"{name} calls the package's reference answer, which does not run while grading: the exercise "
                f"must be your own code {R.student_text(reply.get('message', ''))}",
                [f"{name} delegates to a reference answer of the package (refused in the grading kernel)"])
    if status == "timeout":
        return f"{name} ran longer than {ex.timeout:g} s on a hidden test (seed {seed}) and was stopped", []
    if status == "error":
        kind = str(reply.get("type", "Error"))[:60]
        what = "returned something the grader cannot use" if kind == "PlainDataError" else f"raised {kind}"
        return f"{name} {what} on a hidden test (seed {seed}): {R.student_text(reply.get('message', ''))}", []
    return f"{name}: the kernel answered the probe with an unknown status", []

"""The release check: every solution scores full marks and every untouched
generated lab scores zero, graded exactly as submissions are.

    python -m kdcourse grade --release [--profile smoke] [--no-sandbox]

For each numbered solution notebook whose lab declares exercises
(``kdcourse/checks/labN.py: EXERCISES``) it grades ``solutions/X.ipynb`` and
``labs/X.ipynb`` (in the bubblewrap sandbox with the grading copy of the
package when the sandbox can start, otherwise as plain subprocesses with the
grading copy: these notebooks are the course's own), prints one line per
notebook and exits 1 if any solution lost a point, any untouched lab earned
one, or a lab's declarations disagree with its solution. ``tests/
test_grading_exercises.py`` runs the same check in CI.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .. import labgen
from . import result as R


@dataclass
class Verdict:
    stem: str
    kind: str  # "solution" or "lab"
    ok: bool
    line: str
    result: R.NotebookResult | None = None


def targets(solutions_dir: str = "solutions", labs_dir: str = "labs") -> list[tuple[str, str, str]]:
    """``(stem, solution path, lab path)`` for every numbered solution whose
    lab declares exercises."""
    from ..checks import contract

    out = []
    for sol in labgen.solution_notebooks(solutions_dir):
        stem = os.path.splitext(os.path.basename(sol))[0]
        if contract.exercises_for(stem):
            out.append((stem, sol, labgen.lab_path(sol, labs_dir)))
    return out


def launcher_for(lab, options: R.Options, use_sandbox: bool | None = None):
    """``(launch, label, copy)``: the batch's launcher for ``lab`` (sandboxed
    when possible) and its grading copy of the package (remove it after)."""
    from . import batch, sandbox

    if use_sandbox is None:
        use_sandbox = sandbox.available()[0]
    refuse = [f for e in lab.exercises for f in e.refused_functions()]
    copy = sandbox.GradingCopy.make(refuse=refuse, quiet=[e.check for e in lab.exercises])
    b = batch.Batch(lab, options, use_sandbox=use_sandbox, package=copy)
    return b.launcher(), b.sandbox_label, copy


def _describe(r: R.NotebookResult) -> str:
    lost = [f"{e.name}: {e.hint}" for e in r.exercises if not e.full]
    won = [e.name for e in r.exercises if e.earned]
    return f"{r.total:g}/{r.max_total:g} [{r.status}] in {r.seconds:.0f} s" + \
        (f"; lost {'; '.join(lost)}" if lost and r.total else "") + (f"; earned {', '.join(won)}" if won else "")


def check_lab(stem: str, solution: str, lab_path: str, options: R.Options, use_sandbox: bool | None = None,
              progress=None) -> list[Verdict]:
    from . import grade

    try:
        lab = grade.load_lab(solution)
    except (OSError, ValueError) as exc:
        v = Verdict(stem, "declarations", False, f"{stem}: cannot be graded: {exc}")
        return [v]
    launch, label, copy = launcher_for(lab, options, use_sandbox)
    out = []
    try:
        for kind, path in (("solution", solution), ("lab", lab_path)):
            if not os.path.isfile(path):
                out.append(Verdict(stem, kind, False, f"{path}: missing (run `python -m kdcourse labgen`)"))
                continue
            r = grade.grade_notebook(lab, path, student=f"{stem} {kind}", options=options, launch=launch, sandbox=label)
            ok = (r.total == r.max_total and r.status == "graded") if kind == "solution" else r.total == 0
            want = "full marks" if kind == "solution" else "zero"
            v = Verdict(stem, kind, ok, f"{'ok  ' if ok else 'FAIL'} {path}: {_describe(r)} (want {want})", r)
            out.append(v)
            if progress:
                progress(v.line)
    finally:
        copy.remove()
    return out


def run(options: R.Options | None = None, solutions_dir: str = "solutions", labs_dir: str = "labs",
        use_sandbox: bool | None = None, progress=print) -> list[Verdict]:
    options = options or R.Options()
    verdicts = []
    for stem, sol, lab in targets(solutions_dir, labs_dir):
        got = check_lab(stem, sol, lab, options, use_sandbox, progress)
        for v in got:
            if v.kind == "declarations" and progress:
                progress(f"FAIL {v.line}")
        verdicts += got
    return verdicts


def main(args) -> int:
    options = R.Options(profile=getattr(args, "profile", R.DEFAULT_PROFILE),
                        timeout=getattr(args, "timeout", R.DEFAULT_TIMEOUT),
                        probe_timeout=getattr(args, "probe_timeout", R.DEFAULT_PROBE_TIMEOUT),
                        random_seeds=getattr(args, "random_seeds", R.DEFAULT_RANDOM_SEEDS))
    use_sandbox = False if getattr(args, "no_sandbox", False) else None
    print("release check: every solution must score full marks, every untouched lab zero")
    verdicts = run(options, use_sandbox=use_sandbox)
    bad = [v for v in verdicts if not v.ok]
    print(f"release check: {len(verdicts) - len(bad)} of {len(verdicts)} passed" + (" — FAILED" if bad else ""))
    return 1 if bad or not verdicts else 0

"""How long grading takes: the sandbox's cost, and a class-sized batch.

    python -m kdcourse.grading.bench [--repeats 5] [--batch 30] [--jobs 2] [--only one,batch]
    python -m kdcourse bench grading            (the same, through the bench command)

Parts
    ``one``: median seconds to grade one Lab 1 submission (a copy of the
    whole solution notebook, smoke profile: the grader runs the exercises'
    slice of it, :mod:`kdcourse.grading.slicing`) with the bubblewrap sandbox and with
    ``--no-sandbox``, alternating, ``repeats`` times each; prints both
    medians and the sandbox's overhead in percent (target: at most 30 %).
    The batch's one-off set-up (grading copy, digests) is not in these.
    ``batch``: wall seconds of ``kdcourse grade`` on ``batch`` such
    submissions with ``--jobs`` at a time, sandboxed, set-up and tables
    included (target: at most 3 minutes for 30 with 2 jobs on 2 cores).

The figures depend on the machine and on what else runs on it: quote them
with the machine, and whether it was shared.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

LAB = "01_classic_kd"


def _paths():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(root, "labs", f"{LAB}.ipynb"), os.path.join(root, "solutions", f"{LAB}.ipynb")


def _submissions(folder: str, n: int) -> None:
    """``n`` copies of the solution notebook (its answers are the solution's)."""
    _, sol = _paths()
    os.makedirs(folder, exist_ok=True)
    for k in range(n):
        shutil.copyfile(sol, os.path.join(folder, f"student{k:03d}.ipynb"))


def time_one(repeats: int = 5) -> dict:
    from . import batch as B, grade, result as R, sandbox

    lab_path, _ = _paths()
    lab = grade.load_lab(lab_path)
    refuse = [f for e in lab.exercises for f in e.refused_functions()]
    copy = sandbox.GradingCopy.make(refuse=refuse, quiet=[e.check for e in lab.exercises])
    tmp = tempfile.mkdtemp(prefix="kdgrade-bench-")
    try:
        _submissions(tmp, 1)
        path = os.path.join(tmp, "student000.ipynb")
        times: dict = {"sandbox": [], "no sandbox": []}
        for _ in range(repeats):
            for label, use in (("sandbox", True), ("no sandbox", False)):
                b = B.Batch(lab, R.Options(), use_sandbox=use, package=copy)
                t0 = time.perf_counter()
                r = b.grade("student000", path)
                times[label].append(time.perf_counter() - t0)
                if r.total != r.max_total:
                    raise RuntimeError(f"the solution scored {r.total}/{r.max_total} ({label}): {r.notes}")
        return {k: statistics.median(v) for k, v in times.items()} | {"runs": times}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        copy.remove()


def time_batch(n: int = 30, jobs: int = 2) -> float:
    from .. import cli

    lab_path, _ = _paths()
    tmp = tempfile.mkdtemp(prefix="kdgrade-bench-")
    try:
        _submissions(os.path.join(tmp, "subs"), n)
        t0 = time.perf_counter()
        rc = cli.main(["grade", lab_path, os.path.join(tmp, "subs"), "--out", os.path.join(tmp, "grades"),
                       "--jobs", str(jobs)])
        seconds = time.perf_counter() - t0
        if rc != 0:
            raise RuntimeError(f"kdcourse grade exited {rc}")
        return seconds
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(profile: str = "smoke", repeats: int = 5, only=(), batch: int = 30, jobs: int = 2) -> int:
    parts = set(only) or {"one", "batch"}
    unknown = parts - {"one", "batch"}
    if unknown:
        print(f"error: unknown part(s) {sorted(unknown)}; parts are one, batch")
        return 2
    if profile != "smoke":
        print(f"note: submissions are graded in the smoke profile (the grader's default); --profile {profile} ignored")
    print(f"grading benchmark on {os.cpu_count()} CPU core(s), Python {sys.version.split()[0]}")
    if "one" in parts:
        r = time_one(repeats)
        over = 100.0 * (r["sandbox"] / r["no sandbox"] - 1.0)
        print(f"one Lab 1 submission, median of {repeats}: sandbox {r['sandbox']:.2f} s, "
              f"no sandbox {r['no sandbox']:.2f} s, ratio {r['sandbox'] / r['no sandbox']:.2f} -> the sandbox adds "
              f"{over:+.0f} % (target <= 30 %)")
        print("  runs (s): " + "; ".join(f"{k}: " + ", ".join(f"{x:.2f}" for x in v) for k, v in r["runs"].items()))
    if "batch" in parts:
        s = time_batch(batch, jobs)
        print(f"batch of {batch} Lab 1 submissions, --jobs {jobs}, sandboxed: {s:.0f} s ({s / 60:.1f} min; "
              f"target <= 3 min on 2 cores), {s / batch:.1f} s per submission")
    return 0


if __name__ == "__main__":  # pragma: no cover
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=30)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--only", default="", help="comma-separated parts: one, batch")
    a = p.parse_args()
    sys.exit(main(repeats=a.repeats, only=tuple(x for x in a.only.split(",") if x), batch=a.batch, jobs=a.jobs))

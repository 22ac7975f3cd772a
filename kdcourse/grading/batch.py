"""Grade a folder of submissions: the ``kdcourse grade`` command.

    python -m kdcourse grade labs/01_classic_kd.ipynb submissions/ --out grades/ [--jobs 2]

writes the tables and feedback files of :mod:`kdcourse.grading.tables`
(``grades/01_classic_kd.csv``, ``.md``, ``.moodle.csv``, and
``grades/feedback/01_classic_kd/<student>.md``).

What the batch guarantees
    * Every submission's kernel runs in the bubblewrap sandbox of
      :mod:`kdcourse.grading.sandbox`, with the batch's grading copy of the
      package. Where the sandbox cannot start the batch refuses to run
      (exit 2, with the reason) unless ``--no-sandbox`` is given, and then
      every table says the notebooks ran unsandboxed.
    * Submissions are read by the grader, never followed: a symbolic link,
      FIFO or device named ``*.ipynb`` gets a row scored 0 with the reason
      (:func:`safe_io.read_notebook`); nbformat 3 notebooks are upgraded and
      graded.
    * Names are NFC-normalised and stripped; names that are the same or look
      alike (``bob`` / ``bob `` / ``Bob``, NFC / NFD ``zoë``) are flagged in
      both rows' notes.
    * SIGTERM or SIGINT stops the batch: running kernels are killed, the
      tables are written for what was graded and every other row says
      ``not graded (interrupted)``; exit status 128 + the signal number.
    * The solution, the package (the source folder and the grading copy) and
      the output folder are hashed at the start and again before writing;
      if any changed the batch writes nothing and exits 3 naming what
      changed.
    * ``--jobs N`` grades N submissions at a time (threads, each waiting on
      its own sandboxed kernel).
"""
from __future__ import annotations

import argparse
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from . import result as R
from . import safe_io, sandbox, tables

INTERRUPTED = "not graded (interrupted)"


# --------------------------------------------------------------------------
# One submission, and the folder
# --------------------------------------------------------------------------

class Batch:
    """The state of one run: the lab, how kernels start, the stop flag."""

    def __init__(self, lab, options, *, use_sandbox: bool = True, limits: sandbox.Limits | None = None,
                 package: sandbox.GradingCopy | None = None, grade_one=None):
        self.lab = lab
        self.options = options
        self.use_sandbox = use_sandbox
        self.limits = limits or sandbox.Limits()
        self.package = package
        self.stop = threading.Event()
        self.sandbox_label = "bubblewrap" if use_sandbox else "none (--no-sandbox)"
        self._grade_one = grade_one or _default_grade_one

    def launcher(self):
        """``start(argv, workdir=None, env=None) -> Popen`` for this batch's kernels."""
        read_only = [p for p in (self.options.cache, self.options.data) if p]

        def start(argv, workdir=None, env=None, limits=None, **kw):
            # sandboxed, the kernel works in its own size-capped tmpfs: the host folder is not bound
            workdir = None if self.use_sandbox else workdir
            return sandbox.launch(argv, workdir, env, limits or self.limits, sandbox=self.use_sandbox,
                                  package=self.package, read_only=read_only, **kw)
        return start

    def grade(self, student: str, path: str) -> R.NotebookResult:
        t0 = time.monotonic()
        exercises = self.lab.exercises
        try:
            nb, notes = safe_io.read_notebook(path, self.options.max_notebook_bytes)
        except (OSError, ValueError) as exc:
            return R.not_graded(student, path, exercises, "not a notebook", "the file is not a readable notebook",
                                [f"unreadable: {exc}"], time.monotonic() - t0, self.sandbox_label)
        if self.stop.is_set():
            return R.not_graded(student, path, exercises, INTERRUPTED, "the batch was stopped",
                                sandbox=self.sandbox_label)
        try:
            res = self._grade_one(self, nb, student, path)
        except Exception as exc:  # a bug in the grader: recorded in the row, the batch goes on
            res = R.not_graded(student, path, exercises, "grader error", "the grader failed on this notebook",
                               [f"{type(exc).__name__}: {str(exc)[:300]}"], sandbox=self.sandbox_label)
        res.notes[:0] = notes
        res.sandbox = res.sandbox or self.sandbox_label
        res.seconds = res.seconds or (time.monotonic() - t0)
        return res


def _default_grade_one(batch: Batch, nb, student: str, path: str) -> R.NotebookResult:
    from . import grade

    return grade.grade_notebook(batch.lab, nb, student=student, path=path, options=batch.options,
                                launch=batch.launcher(), sandbox=batch.sandbox_label)


def grade_all(batch: Batch, subs, jobs: int = 1, progress=None) -> list[R.NotebookResult]:
    """Grade ``subs`` (``[(raw name, path)]``); names normalised and
    collisions flagged; rows not graded when the batch stopped say so."""
    collisions = safe_io.name_collisions([raw for raw, _ in subs])
    results: list = [None] * len(subs)

    def one(k):
        raw, path = subs[k]
        if batch.stop.is_set():
            return
        r = batch.grade(safe_io.student_name(raw), path)
        if batch.stop.is_set():  # finished because its kernel was killed by the stop
            return
        results[k] = r
        if progress:
            progress(r)

    if jobs <= 1:
        for k in range(len(subs)):
            one(k)
    else:
        pool = ThreadPoolExecutor(max_workers=jobs)
        futures = [pool.submit(one, k) for k in range(len(subs))]
        try:
            for f in futures:
                while not f.done():
                    if batch.stop.wait(0.2):
                        break
                if batch.stop.is_set():
                    break
                f.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    for k, (raw, path) in enumerate(subs):
        name = safe_io.student_name(raw)
        if results[k] is None:
            results[k] = R.not_graded(name, path, batch.lab.exercises, INTERRUPTED, "the batch was stopped",
                                      sandbox=batch.sandbox_label)
        if raw != name:
            results[k].notes.append(f"name normalised from {raw!r}")
        if raw in collisions:
            results[k].notes.insert(0, "name collides with or looks like another submission's: "
                                    + ", ".join(repr(o) for o in collisions[raw]) + " (check who is who)")
    return results


# --------------------------------------------------------------------------
# Integrity of the instructor's files
# --------------------------------------------------------------------------

class Integrity:
    """Digests of what no submission may change, taken at the start."""

    def __init__(self, **paths):
        self.paths = {k: v for k, v in paths.items() if v}
        self.start = {k: safe_io.digest(*v) if isinstance(v, (list, tuple)) else safe_io.digest(v)
                      for k, v in self.paths.items()}

    def changed(self) -> list[str]:
        now = {k: safe_io.digest(*v) if isinstance(v, (list, tuple)) else safe_io.digest(v)
               for k, v in self.paths.items()}
        return [k for k in self.paths if now[k] != self.start[k]]


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Grade a folder of student notebooks for one lab: each kernel in a bubblewrap sandbox, "
                          "the score decided by the grader; writes CSV, Markdown, a Moodle import CSV and one "
                          "feedback file per student.")
    parser.add_argument("lab", nargs="?", help="the lab (labs/NN_x.ipynb; its solution is found in solutions/) or the solution")
    parser.add_argument("submissions", nargs="?", help="folder of student notebooks (name.ipynb, or name/anything.ipynb)")
    parser.add_argument("--release", action="store_true",
                        help="release check instead: every solution must score full marks and every untouched lab "
                             "zero (kdcourse.grading.release); exit 1 otherwise")
    parser.add_argument("--out", default="grades", help="folder for the tables and feedback/ (default: grades)")
    parser.add_argument("--solution", default=None, help="the solution notebook, when it is not solutions/<lab name>")
    parser.add_argument("--profile", default=R.DEFAULT_PROFILE, help="run profile for the submissions (default: smoke)")
    parser.add_argument("--timeout", type=float, default=R.DEFAULT_TIMEOUT,
                        help=f"seconds for a notebook's own cells (default {R.DEFAULT_TIMEOUT:g})")
    parser.add_argument("--probe-timeout", type=float, default=R.DEFAULT_PROBE_TIMEOUT,
                        help=f"seconds for one probe of one exercise (default {R.DEFAULT_PROBE_TIMEOUT:g})")
    parser.add_argument("--random-seeds", type=int, default=R.DEFAULT_RANDOM_SEEDS,
                        help="fresh random seeds per exercise beside the declared hidden ones "
                             f"(default {R.DEFAULT_RANDOM_SEEDS})")
    parser.add_argument("--all-cells", action="store_true", help="run every cell, not only up to the last exercise")
    parser.add_argument("--skip-tag", action="append", default=[], help="skip cells with this tag (repeatable)")
    parser.add_argument("--cache", default=None, help="a teacher cache (KDCOURSE_CACHE) the kernels may read")
    parser.add_argument("--data", default=None, help="a data folder (KDCOURSE_DATA) the kernels may read")
    parser.add_argument("--jobs", type=int, default=1, help="submissions graded at the same time (default 1)")
    parser.add_argument("--memory-gb", type=float, default=sandbox.Limits.address_space / sandbox.GiB,
                        help="address-space limit of a kernel in GiB (default 5; torch alone reserves about 3)")
    parser.add_argument("--cpu-seconds", type=int, default=sandbox.Limits.cpu_seconds,
                        help=f"CPU-time limit of a kernel (default {sandbox.Limits.cpu_seconds})")
    parser.add_argument("--max-notebook-mb", type=float, default=20.0,
                        help="largest notebook file read, in MB (default 20)")
    parser.add_argument("--no-sandbox", action="store_true",
                        help="run kernels WITHOUT the bubblewrap sandbox: only for notebooks you trust; "
                             "every table then says so")


def _options(args) -> R.Options:
    return R.Options(profile=args.profile, timeout=args.timeout, probe_timeout=args.probe_timeout,
                     all_cells=args.all_cells, skip_tags=tuple(args.skip_tag), random_seeds=args.random_seeds,
                     cache=os.path.abspath(args.cache) if args.cache else None,
                     data=os.path.abspath(args.data) if args.data else None,
                     max_notebook_bytes=int(args.max_notebook_mb * 1e6))


def _check_args(args) -> str:
    from ..profiles import PROFILES

    if args.profile not in PROFILES:
        return f"--profile {args.profile!r} is not known; use one of {sorted(PROFILES)}"
    for name in ("timeout", "probe_timeout", "memory_gb", "cpu_seconds", "max_notebook_mb"):
        if getattr(args, name) <= 0:
            return f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})"
    if args.jobs < 1:
        return f"--jobs must be at least 1 (got {args.jobs})"
    if args.random_seeds < 0:
        return f"--random-seeds must be 0 or more (got {args.random_seeds})"
    for name in ("cache", "data"):
        p = getattr(args, name)
        if p and not os.path.isdir(p):
            return f"--{name} {p!r} is not a folder"
    return ""


def main(args, grade_one=None, load_lab=None) -> int:
    """The ``grade`` subcommand (``grade_one``/``load_lab``: replacements, for tests)."""
    if getattr(args, "release", False):
        from .release import main as release

        return release(args)
    if not args.lab or not args.submissions:
        print("error: give the lab and the submissions folder (or --release)")
        return 2
    problem = _check_args(args)
    if problem:
        print(f"error: {problem}")
        return 2
    if load_lab is None:
        from .grade import load_lab
    try:
        lab = load_lab(args.lab, args.solution)
        subs, skipped = safe_io.find_submissions(args.submissions)
        dfd = safe_io.open_out_dir(args.out)
        os.close(dfd)
    except (FileNotFoundError, ValueError, safe_io.UnsafeFile) as exc:
        print(f"error: {exc}")
        return 2
    if not args.no_sandbox:
        ok, why = sandbox.available()
        if not ok:
            print(f"error: the sandbox cannot start, so untrusted notebooks are not graded: {why}")
            return 2
    options = _options(args)
    limits = sandbox.Limits(address_space=int(args.memory_gb * sandbox.GiB), cpu_seconds=int(args.cpu_seconds))
    refuse = [f for e in lab.exercises for f in e.refused_functions()]
    quiet = [e.check for e in lab.exercises if getattr(e, "check", None) is not None]
    try:
        copy = sandbox.GradingCopy.make(refuse=refuse, quiet=quiet)
    except ValueError as exc:  # a declaration the grading copy cannot make refuse
        print(f"error: cannot make the grading copy of the package: {exc}")
        return 2
    batch = Batch(lab, options, use_sandbox=not args.no_sandbox, limits=limits, package=copy, grade_one=grade_one)
    integrity = Integrity(solution=getattr(lab, "solution_path", None), package=sandbox._package_dir(),
                          grading_copy=copy.root, output_folder=os.path.abspath(args.out))
    caught: list = []

    def on_signal(signum, _frame):
        caught.append(signum)
        batch.stop.set()
        sandbox.kill_all()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)} \
        if threading.current_thread() is threading.main_thread() else {}
    print(f"grading {len(subs)} notebook(s) against {getattr(lab, 'solution_path', args.lab)} "
          f"(sandbox: {batch.sandbox_label}; {args.jobs} at a time): "
          + ", ".join(f"{e.name} ({e.points:g} pt)" for e in lab.exercises))
    for s in skipped:
        print(f"  note: {s}")

    def progress(r):
        print(f"  {r.student}: {r.total:g}/{r.max_total:g} [{r.status}] in {r.seconds:.1f} s")

    try:
        results = grade_all(batch, subs, jobs=args.jobs, progress=progress)
        sandbox.kill_all()
        changed = integrity.changed()
        if changed:
            print("error: aborted, nothing written: " + ", ".join(changed).replace("_", " ")
                  + " changed during the batch (a submission may have written to it); check it and grade again")
            return 3
        info = {"profile": options.profile, "timeout": f"{options.timeout:g}",
                "probe_timeout": f"{options.probe_timeout:g}", "sandbox": batch.sandbox_label, "jobs": args.jobs,
                "batch_notes": skipped + ([f"stopped by signal {caught[0]}: rows not graded say so"] if caught else [])}
        written = tables.write_all(args.out, lab.name, lab.exercises, results, info)
        print(f"wrote {', '.join(os.path.join(args.out, w) for w in written[:3])} and {len(written) - 3} "
              f"feedback file(s) in {os.path.join(args.out, 'feedback', lab.name)}")
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        copy.remove()
    return 128 + caught[0] if caught else 0

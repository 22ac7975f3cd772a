"""Grade a folder of student notebooks for one lab.

    python -m kdcourse grade labs/01_classic_kd.ipynb submissions/ --out grades/

writes ``grades/01_classic_kd.csv`` and ``grades/01_classic_kd.md``: one row
per student, one column of points per exercise, the hint for each failure,
the total, and notes on anything odd the notebook did.

What is graded
    The exercises come from the SOLUTION notebook (pass the lab or the
    solution; ``labs/X.ipynb`` finds ``solutions/X.ipynb``): every code cell
    with a ``### BEGIN SOLUTION`` block is one exercise, named after the
    function that holds the block. Its *visible* checks are the
    ``checks.check_*(...)`` calls the student sees in that cell; its *hidden*
    tests are the ``### BEGIN HIDDEN TESTS`` blocks of the solution (removed
    from the lab by labgen) that follow it. An exercise earns its points
    (``metadata.kdcourse.points`` or ``metadata.nbgrader.points`` of the
    solution cell, default 1) when its visible checks and its hidden tests
    all pass. The grader runs these checks itself, from the solution: what
    the student's notebook printed is never trusted.

How a submission is run (and why grading lab 1 takes seconds)
    1. The notebook alone is copied into a fresh temporary folder, which is
       the kernel's working directory, ``HOME``, ``TMPDIR``, IPython and
       matplotlib folder, and (unless ``--cache``/``--data`` are given)
       ``KDCOURSE_CACHE``/``KDCOURSE_DATA``. The profile is ``smoke`` unless
       ``--profile`` says otherwise (``KDCOURSE_PROFILE`` and an injected
       ``PROFILE = ...`` after the ``parameters`` cell, as papermill does).
    2. A fresh Python kernel runs the student's code cells in order, going on
       after errors (so one broken cell does not cost later exercises), but
       only up to the last cell that defines an exercise function: the
       training and sweeps that follow the exercises are never run
       (``--all-cells`` runs everything; ``--skip-tag`` skips tagged cells).
       In lab 1 that is the imports and a few small cells.
    3. The same kernel then runs each exercise's visible checks and hidden
       tests, each with its own time limit.

Robustness: the student's cells share one time limit (``--timeout``); a cell
that overruns it is interrupted and the rest of the student's cells are
skipped (checks still run); a kernel that ignores the interrupt is killed
(its whole process group). A cell (or check) that prints more than
``--max-output`` bytes is interrupted; outputs are counted, never kept.
Deleted, added and reordered cells, errors and files written are recorded in
the notes. Nothing outside the temporary folder is written except the two
tables; the temporary folder is removed afterwards. This protects against
accidents, not against a student who sets out to attack the grader's
machine (an absolute path still reaches the disk): run untrusted code in a
container.
"""
from __future__ import annotations

import argparse
import ast
import csv
import json
import os
import queue
import re
import shutil
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from . import labgen

DEFAULT_PROFILE = "smoke"
DEFAULT_TIMEOUT = 300.0  # seconds for all of a notebook's own cells
DEFAULT_CHECK_TIMEOUT = 120.0  # seconds for each exercise's checks
DEFAULT_MAX_OUTPUT = 2_000_000  # bytes of output one cell may produce
_INTERRUPT_GRACE = 10.0  # seconds a kernel gets to stop after an interrupt
_CHECK_CALL = re.compile(r"^(checks\.)?check_\w+$")


# --------------------------------------------------------------------------
# What the lab asks: exercises, their checks and hidden tests
# --------------------------------------------------------------------------

@dataclass
class Exercise:
    """One graded exercise of a lab (from a solution cell)."""

    name: str  # the function the student writes (or "exercise N")
    functions: list  # every function in the cell that holds a solution block
    cell_index: int  # index of the cell in the solution notebook
    cell_id: str | None
    points: float
    checks: list = field(default_factory=list)  # visible check calls (source)
    hidden: list = field(default_factory=list)  # hidden test blocks (source)


@dataclass
class Lab:
    name: str  # notebook stem, e.g. "01_classic_kd"
    solution_path: str
    solution: dict
    lab: dict  # the student version, generated from the solution
    exercises: list


def _python(src: str) -> str:
    """Cell source as plain Python (IPython magics and ``!`` lines turned
    into function calls) so that :mod:`ast` can read it."""
    try:
        from IPython.core.inputtransformer2 import TransformerManager

        return TransformerManager().transform_cell(src)
    except Exception:  # pragma: no cover - IPython is a dependency
        return src


def _parse(src: str):
    try:
        return ast.parse(_python(src))
    except (SyntaxError, ValueError):
        return None


def _defined_functions(src: str) -> list[str]:
    """Names of the top-level functions a cell defines (regex fallback when
    the cell does not parse, e.g. a student's syntax error)."""
    tree = _parse(src)
    if tree is None:
        return re.findall(r"^(?:async\s+)?def\s+(\w+)\s*\(", src, flags=re.M)
    return [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _check_calls(src: str) -> list[str]:
    """Top-level ``checks.check_*(...)`` / ``check_*(...)`` calls in a cell."""
    text = _python(src)
    tree = _parse(src)
    calls = []
    for node in tree.body if tree else []:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            func = ast.get_source_segment(text, node.value.func) or ""
            if _CHECK_CALL.match(func):
                calls.append(ast.get_source_segment(text, node))
    return calls


def _hidden_blocks(src: str) -> list[str]:
    blocks, current = [], None
    for line in src.split("\n"):
        if line.strip() == labgen.BEGIN_HIDDEN:
            current = []
        elif line.strip() == labgen.END_HIDDEN:
            if current is not None:
                blocks.append(textwrap.dedent("\n".join(current)).strip("\n"))
            current = None
        elif current is not None:
            current.append(line)
    return [b for b in blocks if b.strip()]


def _points(cell) -> float:
    meta = cell.get("metadata", {})
    for key in ("kdcourse", "nbgrader"):
        value = (meta.get(key) or {}).get("points")
        if isinstance(value, (int, float)) and value >= 0:
            return float(value)
    return 1.0


def exercises(solution: dict) -> list[Exercise]:
    """The graded exercises of a solution notebook, in order."""
    cells = solution["cells"]
    found = []
    for i in labgen.exercise_cells(solution):
        cell = cells[i]
        if cell["cell_type"] != "code":
            continue  # written answers are read by the instructor, not graded here
        src = labgen.source(cell)
        lines = src.split("\n")
        marks = [n + 1 for n, line in enumerate(lines) if line.strip() == labgen.BEGIN]
        tree = _parse(src)
        funcs = []
        for node in tree.body if tree else []:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                    any(node.lineno <= m <= (node.end_lineno or node.lineno) for m in marks):
                funcs.append(node.name)
        name = "+".join(funcs) if funcs else f"exercise {len(found) + 1}"
        visible = _check_calls(labgen.source(labgen.student_cell(cell)))
        found.append(Exercise(name, funcs, i, cell.get("id"), _points(cell), visible))
    if not found:
        return found
    # Checks in the cells after an exercise (up to the next one) that name its
    # function belong to it too; hidden tests go to the exercise they follow.
    starts = [e.cell_index for e in found]
    for i, cell in enumerate(cells):
        if cell["cell_type"] != "code":
            continue
        owner = max((e for e in found if e.cell_index <= i), key=lambda e: e.cell_index, default=found[0])
        src = labgen.source(cell)
        owner.hidden.extend(_hidden_blocks(src))
        if i not in starts and owner.functions:
            student_src = labgen.source(labgen.student_cell(cell))
            owner.checks.extend(c for c in _check_calls(student_src)
                                if any(re.search(rf"\b{f}\b", c) for f in owner.functions))
    return found


def load_lab(path: str, solution: str | None = None) -> Lab:
    """The lab to grade from a lab or solution path (the solution holds the
    hidden tests, so it must be found)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"lab notebook {path!r} does not exist; pass labs/NN_topic.ipynb or solutions/NN_topic.ipynb")
    if solution is None:
        nb = labgen.read(path)
        if labgen.exercise_cells(nb):
            solution = path
        else:
            here = os.path.dirname(os.path.abspath(path))
            candidate = os.path.join(os.path.dirname(here), "solutions", os.path.basename(path))
            if not os.path.isfile(candidate):
                raise FileNotFoundError(
                    f"{path} is a student lab; its solution {candidate} (which holds the exercises and hidden tests) "
                    f"was not found — pass the solution notebook instead, or --solution PATH")
            solution = candidate
    sol = labgen.read(solution)
    found = exercises(sol)
    if not found:
        raise ValueError(f"{solution} has no exercise cells (no '{labgen.BEGIN}' in a code cell): nothing to grade")
    names = [e.name for e in found]
    if len(set(names)) != len(names):
        raise ValueError(f"{solution}: two exercises share a name ({names}); each exercise cell must define its own function")
    stem = os.path.splitext(os.path.basename(solution))[0]
    return Lab(stem, solution, sol, labgen.make_lab(sol, solution), found)


# --------------------------------------------------------------------------
# A kernel with hard limits
# --------------------------------------------------------------------------

@dataclass
class Run:
    status: str  # "ok", "error", "timeout", "flood", "dead"
    ename: str = ""
    evalue: str = ""
    seconds: float = 0.0


class _Kernel:
    """A Python kernel whose every execution has a deadline and an output cap
    (outputs are counted, never stored).

    ``status`` of a :class:`Run`: ``timeout`` (interrupted after its time
    limit), ``flood`` (interrupted after too much output), ``dead`` (the
    kernel died, or ignored the interrupt and was killed)."""

    def __init__(self, cwd: str, env: dict, connection_file: str, log_path: str, startup_timeout: float = 120.0):
        from jupyter_client import KernelManager

        self.km = KernelManager(kernel_name="python3")
        self.km.connection_file = connection_file
        self._log = open(log_path, "wb")
        self.dead_reason = ""
        self.km.start_kernel(cwd=cwd, env=env, stdout=self._log, stderr=self._log)
        self.kc = self.km.client()
        self.kc.start_channels()
        try:
            self.kc.wait_for_ready(timeout=startup_timeout)
        except RuntimeError as exc:
            self.close()
            raise RuntimeError(f"the kernel did not start: {exc}") from exc

    def _drain_shell(self) -> None:
        while True:
            try:
                self.kc.get_shell_msg(timeout=0)
            except queue.Empty:
                return

    def _wait_idle(self, msg_id: str, seconds: float) -> bool:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                msg = self.kc.get_iopub_msg(timeout=min(0.5, max(0.01, end - time.monotonic())))
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status" \
                    and msg["content"].get("execution_state") == "idle":
                return True
        return False

    def _kill(self, reason: str) -> None:
        self.dead_reason = reason
        try:
            self.km.shutdown_kernel(now=True)  # SIGKILL to the kernel's process group
        except Exception:  # pragma: no cover - already gone
            pass

    def run(self, code: str, timeout: float, max_output: int) -> Run:
        """Execute ``code``; never blocks longer than about ``timeout`` + the
        interrupt grace period."""
        if self.dead_reason:
            return Run("dead", evalue=self.dead_reason)
        t0 = time.monotonic()
        deadline = t0 + max(0.0, timeout)
        msg_id = self.kc.execute(code, store_history=False, allow_stdin=False, stop_on_error=False)
        result, output_bytes = Run("ok"), 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or (result.status == "flood"):
                if result.status != "flood":
                    result = Run("timeout", evalue=f"time limit of {timeout:.0f} s exceeded")
                try:
                    self.km.interrupt_kernel()
                except Exception:  # pragma: no cover
                    pass
                if not self._wait_idle(msg_id, _INTERRUPT_GRACE):
                    self._kill(f"the kernel ignored the interrupt ({result.evalue}) and was killed")
                    result = Run("dead", evalue=self.dead_reason)
                break
            try:
                msg = self.kc.get_iopub_msg(timeout=min(1.0, left))
            except queue.Empty:
                if not self.km.is_alive():
                    self.dead_reason = "the kernel died (crashed, ran out of memory, or exited)"
                    result = Run("dead", evalue=self.dead_reason)
                    break
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "status" and content.get("execution_state") == "idle":
                break
            if kind == "stream":
                output_bytes += len(content.get("text", "").encode("utf-8", "replace"))
            elif kind in ("display_data", "execute_result", "update_display_data"):
                output_bytes += len(json.dumps(content.get("data", {})))
            elif kind == "error" and result.status == "ok":
                result = Run("error", content.get("ename", "Error"), _short(content.get("evalue", "")))
            if output_bytes > max_output and result.status != "flood":
                result = Run("flood", evalue=f"output over the cap of {max_output:,} bytes; the cell was interrupted")
        self._drain_shell()
        result.seconds = time.monotonic() - t0
        return result

    def close(self) -> None:
        try:
            self.kc.stop_channels()
        except Exception:  # pragma: no cover
            pass
        if not self.dead_reason:
            self._kill("closed")
        try:
            self.km.cleanup_resources()
        except Exception:  # pragma: no cover
            pass
        self._log.close()


def _short(text: str, limit: int = 400) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(text)).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------
# Grading one notebook
# --------------------------------------------------------------------------

@dataclass
class Options:
    profile: str = DEFAULT_PROFILE
    timeout: float = DEFAULT_TIMEOUT
    check_timeout: float = DEFAULT_CHECK_TIMEOUT
    max_output: int = DEFAULT_MAX_OUTPUT
    all_cells: bool = False
    skip_tags: tuple = ()
    cache: str | None = None  # share this KDCOURSE_CACHE instead of a fresh one per notebook
    data: str | None = None  # share this KDCOURSE_DATA instead of a fresh one per notebook


@dataclass
class Score:
    exercise: str
    points: float
    max_points: float
    hint: str = ""  # empty when full marks


@dataclass
class Result:
    student: str
    path: str
    scores: list
    status: str = "graded"  # or "time limit", "kernel killed", "not a notebook", ...
    notes: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def total(self) -> float:
        return sum(s.points for s in self.scores)

    @property
    def max_total(self) -> float:
        return sum(s.max_points for s in self.scores)


def structure_notes(lab: dict, submission: dict, exercises_: list | None = None) -> list[str]:
    """Cells of the lab that are missing, added or moved in a submission.

    Cells are matched by id (JupyterLab keeps them) or, when the submission
    has no ids, by source; an exercise cell matches the submission's cell
    that defines the exercise's function, however it was edited."""
    exercises_ = exercises_ or []
    by_index = {e.cell_index: e for e in exercises_}
    use_ids = all(c.get("id") for c in submission["cells"]) and all(c.get("id") for c in lab["cells"])

    def key(cell, i=None, in_lab=False):
        if in_lab and i in by_index:
            return "ex:" + by_index[i].name
        if not in_lab and cell.get("cell_type") == "code":
            defined = set(_defined_functions(labgen.source(cell)))
            for e in exercises_:
                if defined & set(e.functions):
                    return "ex:" + e.name
        return cell["id"] if use_ids else "src:" + labgen.source(cell).strip()

    lab_keys = [key(c, i, True) for i, c in enumerate(lab["cells"])]
    sub_keys = [key(c) for c in submission["cells"]]
    lab_set, sub_set = set(lab_keys), set(sub_keys)
    notes = []
    missing = [i for i, k in enumerate(lab_keys) if k not in sub_set]
    added = [k for k in sub_keys if k not in lab_set]
    if missing:
        notes.append(f"{len(missing)} lab cell(s) deleted (lab cells {', '.join(str(i) for i in missing[:8])}"
                     f"{', …' if len(missing) > 8 else ''})")
    if added:
        notes.append(f"{len(added)} cell(s) added")
    order = [lab_keys.index(k) for k in sub_keys if k in lab_set]
    if any(b < a for a, b in zip(order, order[1:])):
        notes.append("cells reordered relative to the lab")
    return notes


def plan(lab: Lab, submission: dict, options: Options) -> tuple[list[int], dict]:
    """The submission's cells to run, and where each exercise is defined
    (``{exercise name: [cell indices]}``)."""
    cells = submission["cells"]
    where = {e.name: [] for e in lab.exercises}
    for i, cell in enumerate(cells):
        if cell.get("cell_type") != "code":
            continue
        defined = set(_defined_functions(labgen.source(cell)))
        for e in lab.exercises:
            if e.functions and defined & set(e.functions):
                where[e.name].append(i)
            elif not e.functions and e.cell_id and cell.get("id") == e.cell_id:
                where[e.name].append(i)
    code = [i for i, c in enumerate(cells) if c.get("cell_type") == "code" and labgen.source(c).strip()]
    if not options.all_cells:
        last = max((i for idx in where.values() for i in idx), default=-1)
        code = [i for i in code if i <= last]
    skip = set(options.skip_tags)
    code = [i for i in code if not skip & set(cells[i].get("metadata", {}).get("tags", []))]
    return code, where


def _tree_state(root: str) -> dict:
    state = {}
    for base, dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(base, f)
            try:
                st = os.stat(p)
            except OSError:
                continue
            state[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return state


def _kernel_env(tmp: str, options: Options) -> dict:
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    for k in list(env):
        if k.startswith(("JPY_", "JUPYTER_", "PAPERMILL")):
            env.pop(k)
    home = os.path.join(tmp, "home")
    env.update({
        "HOME": home,
        "TMPDIR": os.path.join(tmp, "tmp"),
        "IPYTHONDIR": os.path.join(home, ".ipython"),
        "MPLCONFIGDIR": os.path.join(home, ".matplotlib"),
        "XDG_CACHE_HOME": os.path.join(home, ".cache"),
        "XDG_CONFIG_HOME": os.path.join(home, ".config"),
        "JUPYTER_RUNTIME_DIR": os.path.join(tmp, "runtime"),
        "MPLBACKEND": "Agg",
        "PYTHONDONTWRITEBYTECODE": "1",
        "KDCOURSE_PROFILE": options.profile,
        "KDCOURSE_CACHE": options.cache or os.path.join(tmp, "cache"),
        "KDCOURSE_DATA": options.data or os.path.join(tmp, "data"),
        "PYTHONPATH": os.pathsep.join([pkg_parent] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]),
    })
    for d in ("home", "tmp", "runtime"):
        os.makedirs(os.path.join(tmp, d), exist_ok=True)
    return env


def _error_notes(cell_errors: dict) -> list[str]:
    """"cells 6, 8 raised NotImplementedError" — one note per kind of error."""
    by_kind: dict[str, list[int]] = {}
    for i, err in cell_errors.items():
        if "output over the cap" in err:
            continue  # already noted
        name = err.split(":", 1)[0]
        kind = name if name == "NotImplementedError" else err
        by_kind.setdefault(kind, []).append(i)
    return [f"cell{'s' if len(idx) > 1 else ''} {', '.join(map(str, idx))} raised {kind}" for kind, idx in by_kind.items()]


def _failure_hint(ex: Exercise, run: Run, where: dict, cell_errors: dict, stopped: str, hidden: bool) -> str:
    kind = "hidden test" if hidden else "check"
    if run.status == "ok":
        return ""
    if run.status in ("timeout", "flood"):
        return f"{kind} stopped: {run.evalue}"
    if run.status == "dead":
        return f"not graded: {run.evalue}" if run.evalue.startswith("in cell") else f"{kind} stopped: {run.evalue}"
    if run.ename == "NotImplementedError":
        return f"not attempted: {ex.name} still raises NotImplementedError"
    missing_name = run.ename == "NameError" and any(f"'{f}'" in run.evalue for f in ex.functions)
    if missing_name:
        cells = where.get(ex.name) or []
        if not cells:
            return f"the exercise cell is missing (no `def {ex.functions[0]}` in the notebook)"
        errs = [cell_errors[i] for i in cells if i in cell_errors]
        if errs:
            return f"the cell defining {ex.name} failed: {errs[0]}"
        if stopped:
            return f"not run: {stopped}"
        return f"{run.ename}: {run.evalue}"
    if run.ename == "CheckFailed":
        return run.evalue if not hidden else f"hidden test: {run.evalue}"
    return f"{kind} failed: {run.ename}: {run.evalue}".rstrip(": ")


def grade_notebook(lab: Lab, path: str, options: Options, student: str | None = None) -> Result:
    """Grade one submission in its own temporary folder (removed afterwards)."""
    student = student or os.path.splitext(os.path.basename(path))[0]
    t0 = time.monotonic()
    zero = [Score(e.name, 0.0, e.points) for e in lab.exercises]
    try:
        submission = labgen.read(path)
        if not isinstance(submission, dict) or not isinstance(submission.get("cells"), list):
            raise ValueError("no list of cells")
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        for s in zero:
            s.hint = "not graded: the file is not a readable notebook"
        return Result(student, path, zero, "not a notebook", [f"unreadable: {_short(exc, 200)}"], time.monotonic() - t0)

    tmp = tempfile.mkdtemp(prefix="kdgrade-")
    try:
        work = os.path.join(tmp, "work")
        os.makedirs(work)
        shutil.copyfile(path, os.path.join(work, os.path.basename(path)))
        before = _tree_state(work)
        notes = structure_notes(lab.lab, submission, lab.exercises)
        order, where = plan(lab, submission, options)
        for e in lab.exercises:
            if len(where[e.name]) > 1:
                notes.append(f"{e.name} is defined in {len(where[e.name])} cells (the last one run counts)")
        cells = submission["cells"]
        params = next((i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", [])), None)
        inject = f"PROFILE = {options.profile!r}  # injected by the grader"
        try:
            kernel = _Kernel(work, _kernel_env(tmp, options), os.path.join(tmp, "runtime", "kernel.json"),
                             os.path.join(tmp, "kernel.log"))
        except Exception as exc:
            for s in zero:
                s.hint = f"not graded: {exc}"
            return Result(student, path, zero, "kernel failed", notes, time.monotonic() - t0)
        status, stopped, cell_errors = "graded", "", {}
        try:
            if params is None:
                kernel.run(inject, options.check_timeout, options.max_output)
            deadline = time.monotonic() + options.timeout
            for i in order:
                run = kernel.run(labgen.source(cells[i]), deadline - time.monotonic(), options.max_output)
                if i == params:
                    kernel.run(inject, options.check_timeout, options.max_output)
                if run.status == "error":
                    cell_errors[i] = f"{run.ename}: {run.evalue}".rstrip(": ")
                elif run.status == "flood":
                    cell_errors[i] = run.evalue
                    notes.append(f"cell {i}: {run.evalue}")
                elif run.status == "timeout":
                    stopped = f"cell {i} hit the notebook's time limit ({options.timeout:.0f} s); later cells were skipped"
                    status = "time limit"
                    notes.append(stopped)
                    break
                elif run.status == "dead":
                    status = "kernel killed" if "killed" in run.evalue else "kernel died"
                    kernel.dead_reason = f"in cell {i}, {run.evalue}"
                    notes.append(f"cell {i}: {run.evalue}")
                    break
            notes[len(notes):len(notes)] = _error_notes(cell_errors)
            scores = []
            for e in lab.exercises:
                hint = ""
                for hidden, code in [(False, c) for c in e.checks] + [(True, h) for h in e.hidden]:
                    run = kernel.run("from kdcourse import checks\n" + code, options.check_timeout, options.max_output)
                    hint = _failure_hint(e, run, where, cell_errors, stopped, hidden)
                    if hint:
                        break
                if not e.checks and not e.hidden:
                    hint = "no checks found for this exercise in the solution"
                scores.append(Score(e.name, 0.0 if hint else e.points, e.points, hint))
            if kernel.dead_reason and status == "graded":
                status = "kernel died"
        finally:
            kernel.close()
        after = _tree_state(work)
        written = sorted(k for k in after if after[k] != before.get(k))
        if written:
            notes.append("wrote files in its folder: " + ", ".join(written[:5]) + (" …" if len(written) > 5 else ""))
        return Result(student, path, scores, status, notes, time.monotonic() - t0)
    finally:
        _remove(tmp)


def _remove(folder: str) -> None:
    """Delete a temporary folder, even one whose permissions a notebook changed."""
    def retry(func, path, _exc):
        try:
            os.chmod(os.path.dirname(path), 0o700)
            os.chmod(path, 0o700)
            func(path)
        except OSError:
            pass
    if sys.version_info >= (3, 12):
        shutil.rmtree(folder, onexc=retry)
    else:
        shutil.rmtree(folder, onerror=retry)


# --------------------------------------------------------------------------
# A folder of submissions, and the score table
# --------------------------------------------------------------------------

def find_submissions(folder: str) -> list[tuple[str, str]]:
    """``(student, path)`` for every notebook under ``folder``: a file
    ``alice.ipynb`` is student ``alice``; ``alice/lab.ipynb`` is ``alice/lab``."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"submissions folder {folder!r} does not exist")
    found = []
    for base, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if f.endswith(".ipynb") and not f.startswith("."):
                path = os.path.join(base, f)
                found.append((os.path.splitext(os.path.relpath(path, folder))[0].replace(os.sep, "/"), path))
    return found


def _grade_safely(lab: Lab, path: str, options: Options, student: str) -> Result:
    """:func:`grade_notebook`, with any failure of the grader itself recorded
    in the row instead of stopping the batch."""
    try:
        return grade_notebook(lab, path, options, student)
    except Exception as exc:  # pragma: no cover - a bug in the grader, not in the notebook
        scores = [Score(e.name, 0.0, e.points, "not graded: the grader failed on this notebook") for e in lab.exercises]
        return Result(student, path, scores, "grader error", [f"{type(exc).__name__}: {_short(exc, 300)}"])


def grade_folder(lab: Lab, folder: str, options: Options, jobs: int = 1, progress=None) -> list[Result]:
    """Grade every notebook under ``folder`` (``jobs`` at a time), in order."""
    subs = find_submissions(folder)
    if jobs <= 1:
        results = []
        for student, path in subs:
            results.append(_grade_safely(lab, path, options, student))
            if progress:
                progress(results[-1])
        return results
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(_grade_safely, lab, path, options, student) for student, path in subs]
        results = []
        for f in futures:
            results.append(f.result())
            if progress:
                progress(results[-1])
        return results


def _num(x: float) -> str:
    return f"{x:g}"


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def write_tables(lab: Lab, results: list[Result], out_dir: str, options: Options | None = None) -> tuple[str, str]:
    """Write ``<lab>.csv`` and ``<lab>.md`` in ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    names = [e.name for e in lab.exercises]
    csv_path = os.path.join(out_dir, f"{lab.name}.csv")
    md_path = os.path.join(out_dir, f"{lab.name}.md")
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["student"] + [c for n in names for c in (n, f"{n} hint")] + ["total", "max", "status", "notes", "seconds"])
        for r in results:
            row = [r.student]
            for s in r.scores:
                row += [_num(s.points), s.hint]
            row += [_num(r.total), _num(r.max_total), r.status, "; ".join(r.notes), f"{r.seconds:.1f}"]
            w.writerow(row)
    max_pts = {e.name: e.points for e in lab.exercises}
    lines = [f"# Grades — {lab.name}", ""]
    if options is not None:
        lines += [f"Profile `{options.profile}`, time limit {options.timeout:g} s per notebook "
                  f"(+ {options.check_timeout:g} s per exercise check), output cap {options.max_output:,} bytes per cell"
                  f"{', every cell run' if options.all_cells else ', cells run up to the last exercise'}.", ""]
    lines.append("| student | " + " | ".join(f"{n} ({_num(max_pts[n])})" for n in names) + " | total | status | notes |")
    lines.append("|---|" + "---|" * len(names) + "---|---|---|")
    for r in results:
        cells = [(_num(s.points) + (f" — {_md(s.hint)}" if s.hint else "")) for s in r.scores]
        lines.append(f"| {_md(r.student)} | " + " | ".join(cells) +
                     f" | {_num(r.total)} / {_num(r.max_total)} | {r.status} | {_md('; '.join(r.notes))} |")
    if results:
        lines += ["", "Mean points per exercise: " + ", ".join(
            f"{n} {sum(r.scores[k].points for r in results) / len(results):.2f}" for k, n in enumerate(names))]
    with open(md_path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return csv_path, md_path


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Grade a folder of student notebooks for one lab into a CSV and a Markdown table."
    parser.add_argument("lab", help="the lab (labs/NN_x.ipynb; its solution is found in solutions/) or the solution itself")
    parser.add_argument("submissions", help="folder of student notebooks (name.ipynb, or name/anything.ipynb)")
    parser.add_argument("--out", default="grades", help="folder for <lab>.csv and <lab>.md (default: grades)")
    parser.add_argument("--solution", default=None, help="the solution notebook, when it is not solutions/<lab name>")
    parser.add_argument("--profile", default=DEFAULT_PROFILE, help="run profile for the submissions (default: smoke)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help=f"seconds for a notebook's own cells (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--check-timeout", type=float, default=DEFAULT_CHECK_TIMEOUT,
                        help=f"seconds for each exercise's checks (default {DEFAULT_CHECK_TIMEOUT:g})")
    parser.add_argument("--max-output", type=int, default=DEFAULT_MAX_OUTPUT,
                        help=f"bytes of output one cell may print before it is interrupted (default {DEFAULT_MAX_OUTPUT:,})")
    parser.add_argument("--all-cells", action="store_true", help="run every cell, not only up to the last exercise")
    parser.add_argument("--skip-tag", action="append", default=[], help="skip cells with this tag (repeatable)")
    parser.add_argument("--cache", default=None,
                        help="share this teacher cache (KDCOURSE_CACHE) instead of a fresh empty one per notebook")
    parser.add_argument("--data", default=None, help="share this data folder (KDCOURSE_DATA) instead of a fresh one")
    parser.add_argument("--jobs", type=int, default=1, help="notebooks graded at the same time (default 1)")


def main(args) -> int:
    try:
        lab = load_lab(args.lab, args.solution)
        subs = find_submissions(args.submissions)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}")
        return 2
    from .profiles import PROFILES

    if args.profile not in PROFILES:
        print(f"error: --profile {args.profile!r} is not known; use one of {sorted(PROFILES)}")
        return 2
    if args.timeout <= 0 or args.check_timeout <= 0 or args.max_output <= 0 or args.jobs < 1:
        print("error: --timeout, --check-timeout and --max-output must be positive and --jobs at least 1")
        return 2
    options = Options(profile=args.profile, timeout=args.timeout, check_timeout=args.check_timeout,
                      max_output=args.max_output, all_cells=args.all_cells, skip_tags=tuple(args.skip_tag),
                      cache=os.path.abspath(args.cache) if args.cache else None,
                      data=os.path.abspath(args.data) if args.data else None)
    print(f"grading {len(subs)} notebook(s) against {lab.solution_path}: "
          + ", ".join(f"{e.name} ({_num(e.points)} pt, {len(e.checks)} check(s), {len(e.hidden)} hidden)" for e in lab.exercises))

    def progress(r: Result) -> None:
        print(f"  {r.student}: {_num(r.total)}/{_num(r.max_total)} [{r.status}] in {r.seconds:.1f} s"
              + (f" — {'; '.join(r.notes)}" if r.notes else ""))

    results = grade_folder(lab, args.submissions, options, jobs=args.jobs, progress=progress)
    csv_path, md_path = write_tables(lab, results, args.out, options)
    print(f"wrote {csv_path} and {md_path}")
    return 0

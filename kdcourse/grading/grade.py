"""Grade one notebook: the grader's side, deciding in its own process.

    lab = load_lab("labs/01_classic_kd.ipynb")          # the declared exercises + the solution
    result = grade_notebook(lab, "alice.ipynb")           # -> result.NotebookResult

1. The notebook is read with nbformat (nbformat 3 upgraded, not rejected).
2. The statements the exercises need (:mod:`kdcourse.grading.slicing`: the
   exercise definitions and, by name, whatever they use; not the lab's
   experiments) are sent to :mod:`kdcourse.grading.runner` in a kernel
   started by ``launch`` (the batch passes the bubblewrap launcher of
   :mod:`kdcourse.grading.sandbox`; the default here runs the runner as a
   plain subprocess, for trusted notebooks and tests). Cells go on after
   errors. When that slice leaves a name undefined (a ``NameError`` in it or
   in a probe, or an exercise defined in some cell but missing) the
   notebook is graded again running every code cell up to its last exercise
   cell (:func:`plan`); ``Options.all_cells`` runs every cell from the start.
3. For each declared exercise (:mod:`kdcourse.checks.contract`) the grader
   sends probe requests for its hidden seeds plus ``Options.random_seeds``
   fresh seeds from :mod:`secrets`, receives plain data, validates it,
   computes the reference's data (and, when they differ, each known-wrong
   variant's) here, and decides with :func:`contract.diagnose_data`.
   Nothing the student's code prints or returns except that plain data is
   used; the visible checks the student's cells call decide nothing.
"""
from __future__ import annotations

import ast
import os
import re
import secrets
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from .. import labgen
from . import hints, slicing
from ..checks import contract
from . import result as R
from .session import KernelGone, Session, kill_kernel, plain_launch

STARTUP_GRACE = 120.0  # seconds for the kernel to start (its own imports) and say "started"
CELL_GRACE = 15.0  # seconds beyond the cells' own limit, counted from "started", before the kernel is killed
PROBE_GRACE = 15.0  # seconds beyond a probe's own limit before the kernel is killed


# --------------------------------------------------------------------------
# The lab: its declared exercises and its solution
# --------------------------------------------------------------------------

@dataclass
class Lab:
    name: str  # notebook stem, e.g. "01_classic_kd"
    solution_path: str
    solution: dict
    lab: dict  # the student version, generated from the solution
    exercises: list  # [contract.Exercise], in notebook order
    cells: dict  # exercise name -> index of its solution cell


def defined_functions(src: str) -> list[str]:
    """Top-level functions a cell defines (regex fallback when it does not parse)."""
    try:
        from IPython.core.inputtransformer2 import TransformerManager

        tree = ast.parse(TransformerManager().transform_cell(src))
    except (SyntaxError, ValueError, ImportError):
        return re.findall(r"^(?:(?:async\s+)?def|class)\s+(\w+)\s*[(:]", src, flags=re.M)
    return [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]


def solution_exercise_cells(solution: dict) -> dict:
    return labgen.solution_functions(solution)


def declaration_problems(solution: dict, stem: str) -> list[str]:
    return labgen.declaration_problems(solution, stem)


def load_lab(path: str, solution: str | None = None, strict: bool = True) -> Lab:
    """The lab to grade from ``labs/X.ipynb`` (its solution is found in
    ``solutions/X.ipynb``) or from the solution itself. Declarations that
    disagree with the solution raise ``ValueError`` (``strict=False``: the
    declared exercises without a solution cell are left out, for a lab
    being written)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"lab notebook {path!r} does not exist; pass labs/NN_topic.ipynb or solutions/NN_topic.ipynb")
    if solution is None:
        if labgen.exercise_cells(labgen.read(path)):
            solution = path
        else:
            here = os.path.dirname(os.path.abspath(path))
            solution = os.path.join(os.path.dirname(here), "solutions", os.path.basename(path))
            if not os.path.isfile(solution):
                raise FileNotFoundError(f"{path} is a student lab; its solution {solution} was not found — pass the "
                                        f"solution notebook instead, or --solution PATH")
    sol = labgen.read(solution)
    stem = os.path.splitext(os.path.basename(solution))[0]
    exercises = contract.exercises_for(stem)
    if not exercises:
        raise ValueError(f"{stem}: {contract.lab_module(stem)} declares no EXERCISES: nothing to grade")
    problems = declaration_problems(sol, stem)
    if problems and strict:
        raise ValueError("; ".join(problems))
    cells = solution_exercise_cells(sol)
    exercises = [e for e in exercises if e.name in cells]
    exercises.sort(key=lambda e: cells[e.name])
    return Lab(stem, solution, sol, labgen.make_lab(sol, solution), exercises, {e.name: cells[e.name] for e in exercises})


# --------------------------------------------------------------------------
# What to run, and what changed in the notebook
# --------------------------------------------------------------------------

def plan(lab: Lab, nb: dict, options: R.Options) -> tuple[list[int], dict]:
    """The code cells to run and ``{exercise: [cells defining it]}``."""
    cells = nb["cells"]
    where = {e.name: [] for e in lab.exercises}
    for i, cell in enumerate(cells):
        if cell.get("cell_type") == "code":
            for f in set(defined_functions(labgen.source(cell))):
                if f in where:
                    where[f].append(i)
    code = [i for i, c in enumerate(cells) if c.get("cell_type") == "code" and labgen.source(c).strip()]
    if not options.all_cells:
        last = max((i for idx in where.values() for i in idx), default=-1)
        code = [i for i in code if i <= last]
    skip = set(options.skip_tags)
    code = [i for i in code if not skip & set(cells[i].get("metadata", {}).get("tags", []))]
    return code, where


def structure_notes(lab: Lab, nb: dict) -> list[str]:
    """Lab cells deleted, cells added, cells reordered (matched by id, or by
    source for notebooks without ids; an exercise cell matches the cell that
    defines its function however it was edited)."""
    by_index = {i: name for name, i in lab.cells.items()}
    names = set(lab.cells)
    use_ids = all(c.get("id") for c in nb["cells"]) and all(c.get("id") for c in lab.lab["cells"])

    def key(cell, i=None, in_lab=False):
        if in_lab and i in by_index:
            return "ex:" + by_index[i]
        if not in_lab and cell.get("cell_type") == "code":
            hit = names & set(defined_functions(labgen.source(cell)))
            if hit:
                return "ex:" + sorted(hit)[0]
        return cell.get("id") if use_ids else "src:" + labgen.source(cell).strip()

    lab_keys = [key(c, i, True) for i, c in enumerate(lab.lab["cells"])]
    sub_keys = [key(c) for c in nb["cells"]]
    notes = []
    missing = [i for i, k in enumerate(lab_keys) if k not in set(sub_keys)]
    added = [k for k in sub_keys if k not in set(lab_keys)]
    if missing:
        notes.append(f"{len(missing)} lab cell(s) deleted (lab cells {', '.join(map(str, missing[:8]))}"
                     f"{', …' if len(missing) > 8 else ''})")
    if added:
        notes.append(f"{len(added)} cell(s) added")
    order = [lab_keys.index(k) for k in sub_keys if k in set(lab_keys)]
    if any(b < a for a, b in zip(order, order[1:])):
        notes.append("cells reordered relative to the lab")
    return notes


# --------------------------------------------------------------------------
# Reference data, computed here
# --------------------------------------------------------------------------

_REF_CACHE: dict = {}
_REF_LOCK = threading.Lock()
_PROBE_LOCK = threading.RLock()


def reference_data(ex: contract.Exercise, fn, key: str, seed: int):
    """``run_probe(ex, fn, seed)`` in the grader's process (declared seeds cached)."""
    k = (id(ex), key, seed)
    with _REF_LOCK:
        if k in _REF_CACHE:
            return _REF_CACHE[k]
    with _PROBE_LOCK:  # probes seed the global RNGs: one at a time when the batch grades in threads
        data = contract.run_probe(ex, fn, seed)
    if seed in ex.hidden_seeds:
        with _REF_LOCK:
            _REF_CACHE[k] = data
    return data


def _seeds(ex: contract.Exercise, options: R.Options) -> list[int]:
    return list(ex.hidden_seeds) + [secrets.randbelow(2 ** 31) + 1000 for _ in range(options.random_seeds)]


# --------------------------------------------------------------------------
# Grading one notebook
# --------------------------------------------------------------------------

def grade_notebook(lab: Lab, nb, *, student: str | None = None, path: str = "", options: R.Options | None = None,
                   launch=None, sandbox: str = "") -> R.NotebookResult:
    """Grade one submission (``nb``: a notebook node, or a path read with
    :func:`safe_io.read_notebook`). ``launch(argv, workdir, env) -> Popen``
    starts the kernel (default: :func:`plain_launch`, no sandbox)."""
    from . import safe_io

    options = options or R.Options()
    t0 = time.monotonic()
    notes: list = []
    if isinstance(nb, (str, os.PathLike)):
        path = path or str(nb)
        try:
            nb, notes = safe_io.read_notebook(str(nb), options.max_notebook_bytes)
        except (OSError, ValueError) as exc:
            return R.not_graded(student or "", path, lab.exercises, "not a notebook",
                                "the file is not a readable notebook", [f"unreadable: {exc}"], time.monotonic() - t0,
                                sandbox)
    student = student or os.path.splitext(os.path.basename(path))[0]
    launch = launch or plain_launch
    sandbox = sandbox or ("none (plain subprocess)" if launch is plain_launch else "")
    notes = list(notes) + structure_notes(lab, nb)
    order, where = plan(lab, nb, options)
    for name, idx in where.items():
        if len(idx) > 1:
            notes.append(f"{name} is defined in {len(idx)} cells (the last one run counts)")
    cells = nb["cells"]
    if options.all_cells:
        sources = {i: labgen.source(cells[i]) for i in order}
    else:
        exercise_cells = {i for idx in where.values() for i in idx}
        sources = slicing.exercise_slice(nb, [e.name for e in lab.exercises], exercise_cells)
        skip = set(options.skip_tags)
        sources = {i: s for i, s in sources.items() if not skip & set(cells[i].get("metadata", {}).get("tags", []))}
    outcome = _run(lab, cells, sources, where, options, launch)
    if not options.all_cells and outcome.get("suspect") and not outcome.get("start_failed"):
        again = _run(lab, cells, {i: labgen.source(cells[i]) for i in order}, where, options, launch)
        again["notes"].insert(0, f"graded from every cell up to the last exercise: the exercises' own definitions "
                                 f"alone left {outcome['suspect']}")
        outcome = again
    if outcome.get("start_failed"):
        return R.not_graded(student, path, lab.exercises, "sandbox failed",
                            f"the kernel did not start ({outcome['start_failed']})", notes + outcome["notes"],
                            time.monotonic() - t0, sandbox)
    return R.NotebookResult(student, path, outcome["results"], outcome["status"], notes + outcome["notes"],
                            time.monotonic() - t0, sandbox)


def _run(lab: Lab, cells, sources: dict, where: dict, options: R.Options, launch) -> dict:
    """Run ``sources`` ({cell index: code}) in a kernel (restarted once when a
    probe kills it) and probe every exercise: ``{"results", "status",
    "notes", "suspect", "start_failed"}``."""
    order = sorted(sources)
    params = next((i for i, c in enumerate(cells) if "parameters" in (c.get("metadata", {}).get("tags") or [])), None)
    job = {"lab": lab.name, "exercises": [e.name for e in lab.exercises],
           "cells": [{"index": i, "source": sources[i]} for i in order],
           "preamble": f"PROFILE = {options.profile!r}  # injected by the grader",
           "preamble_after": params if params in sources else None, "timeout": options.timeout}
    env = {"KDCOURSE_PROFILE": options.profile, "MPLBACKEND": "Agg",
           "KDCOURSE_CACHE": options.cache or ".kdcourse/cache", "KDCOURSE_DATA": options.data or ".kdcourse/data"}
    results = {e.name: R.ExerciseResult(e.name, float(e.points)) for e in lab.exercises}
    state = {"status": "graded", "cell_errors": {}, "stopped": "", "first": True, "suspect": ""}
    notes: list = []
    pending = list(lab.exercises)
    for attempt_ in range(1 + RESTARTS):
        try:
            pending = _kernel_pass(job, env, launch, options, pending, results, where, notes, state)
        except _StartFailed as exc:
            return {"start_failed": str(exc), "notes": notes}
        if not pending or state.get("cells_gone"):
            break
        notes.append(f"the kernel was restarted after probing {state['killed_by']} (cells run again)")
    for name, res in results.items():
        if name not in state.setdefault("decided", set()) and not res.hint:
            res.hint = f"not graded: {state.get('gone', 'the kernel stopped')}"
    named = [f"cell {i} ({e[0]})" for i, e in state["cell_errors"].items() if e[0] in _NAME_ERRORS]
    suspect = state["suspect"] or (f"a NameError in {named[0]}" if named else "")
    return {"results": [results[e.name] for e in lab.exercises], "status": state["status"], "notes": notes,
            "suspect": suspect}


_NAME_ERRORS = ("NameError", "UnboundLocalError")


RESTARTS = 1  # a kernel that dies while probing one exercise is restarted once for the others


class _StartFailed(RuntimeError):
    pass


def _kernel_pass(job, env, launch, options, pending, results, where, notes, state) -> list:
    """One kernel: run the cells, probe ``pending`` exercises in order. Returns
    the exercises still to probe when the kernel died while probing one
    (that one gets its hint here), else ``[]``."""
    work = tempfile.mkdtemp(prefix="kdgrade-work-")
    os.chmod(work, 0o777)
    session = None
    first = state["first"]
    state["first"] = False
    try:
        try:
            proc = launch([sys.executable, "-m", "kdcourse.grading.runner"], work, env)
        except Exception as exc:
            raise _StartFailed(str(exc)) from exc
        session = Session(proc)
        cell_errors = state["cell_errors"]
        current = None
        try:
            session.send(job)
            session.wait_started(STARTUP_GRACE)  # the cells' limit counts from here
            end = time.monotonic() + options.timeout + CELL_GRACE
            ready = None
            while ready is None:
                msg = session.read(max(0.0, end - time.monotonic()))
                if msg is None:
                    raise KernelGone(f"the notebook's cells ran past the time limit ({options.timeout:g} s) "
                                     f"and the kernel did not stop")
                if msg.get("event") == "cell" and first:
                    i = msg.get("index")
                    if msg.get("status") == "error":
                        cell_errors[i] = (str(msg.get("ename", ""))[:60], str(msg.get("evalue", "")))
                    elif msg.get("status") == "timeout":
                        state["stopped"] = (f"cell {i} hit the notebook's time limit ({options.timeout:g} s); "
                                            f"later cells were skipped")
                        state["status"] = "time limit"
                        notes.append(state["stopped"])
                elif msg.get("event") == "ready":
                    ready = msg
            if first:
                notes.extend(hints.error_notes(cell_errors))
            rid = 0
            for k, ex in enumerate(pending):
                current = ex
                res = results[ex.name]
                data, hint, extra, delegated = {}, "", [], ""
                for seed in _seeds(ex, options):
                    timeout = min(ex.timeout, options.probe_timeout) if options.probe_timeout else ex.timeout
                    session.send({"probe": ex.name, "seed": seed, "id": rid, "timeout": timeout})
                    reply = session.read(timeout + PROBE_GRACE)
                    rid += 1
                    if reply is None:
                        raise KernelGone(f"probing {ex.name}, the kernel stopped answering")
                    delegated = delegated or str(reply.get("delegated") or "")
                    if reply.get("status") != "ok":
                        hint, extra = hints.reply_hint(ex, reply, seed, where, cell_errors, state["stopped"])
                        if (reply.get("status") == "missing" and where.get(ex.name)
                                 and not any(i in cell_errors for i in where[ex.name]) and not state["stopped"]) or \
                                (reply.get("status") == "error" and reply.get("type") in _NAME_ERRORS):
                            state["suspect"] = state["suspect"] or f"{ex.name} {reply.get('status')} " \
                                                                   f"({reply.get('type', 'not defined')})"
                        break
                    try:
                        data[seed] = contract.validate(reply.get("data"))
                    except contract.PlainDataError as exc:
                        hint = f"{ex.name}'s result is not plain data the grader can read ({exc})"
                        break
                if not hint:
                    hint, extra = _decide(ex, data)
                if delegated:  # a right answer through the checks' code earns nothing; a wrong one keeps its hint
                    called = re.sub(r"[^\w.:<>/ ()-]", "", delegated)[:160]
                    hint = hint or (f"{ex.name} calls code of the course's checks ({called}), which an exercise may "
                                    f"not use while grading: the exercise must be your own code")
                    extra = list(extra) + [f"{ex.name} delegates to kdcourse.checks ({called})"]
                res.hint, res.notes = hint, extra
                res.earned = 0.0 if hint else res.points
                state.setdefault("decided", set()).add(ex.name)
            return []
        except KernelGone as exc:
            state["gone"] = str(exc)
            if current is None:  # the cells never finished: nothing to restart for
                state["cells_gone"] = True
                state["status"] = "kernel died" if state["status"] == "graded" else state["status"]
                notes.append(str(exc))
                return []
            results[current.name].hint = f"not graded: the kernel died while probing {current.name} ({exc})"
            notes.append(f"the kernel died while probing {current.name}: {exc}")
            state["killed_by"] = current.name
            return pending[pending.index(current) + 1:]
        finally:
            try:
                session.send({"quit": True})
            except KernelGone:
                pass
    finally:
        if session is not None:
            session.close(kill_kernel)
        shutil.rmtree(work, ignore_errors=True)


def _decide(ex: contract.Exercise, student: dict) -> tuple[str, list]:
    try:
        ref = {s: reference_data(ex, ex.reference, "reference", s) for s in student}
    except Exception as exc:  # pragma: no cover - a bug in a declaration, not in the notebook
        return f"not graded: the reference failed on a probe ({type(exc).__name__}: {exc})", ["grader error"]

    def variant(name, seed):
        return reference_data(ex, ex.variants[name][0], "variant:" + name, seed)

    verdict = contract.diagnose_data(ex, student, ref, variant)
    return ("" if verdict.ok else verdict.hint), ([f"matches the known mistake {verdict.variant!r}"] if verdict.variant else [])

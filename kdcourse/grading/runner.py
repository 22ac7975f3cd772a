"""The kernel's side of grading: runs one submission's code, then answers
probes with plain data. Started by :mod:`kdcourse.grading.grade` (inside the
sandbox) as ``python -m kdcourse.grading.runner``; nothing here decides a
score.

Protocol (JSON lines). The runner first moves its stdin and stdout to
private file descriptors and points fds 0, 1 and 2 at ``/dev/null``: the
student's ``print``, ``input()`` and subprocesses never see the protocol.

1. grader -> runner, one line: the job ::

       {"lab": "01_classic_kd", "exercises": ["soft_targets", "kd_loss"],
        "cells": [{"index": 2, "source": "..."}, ...],
        "preamble": "PROFILE = 'smoke'", "preamble_after": 1, "timeout": 300}

   ``preamble`` runs after the cell with index ``preamble_after`` (the
   ``parameters`` cell, as papermill injects) or first when that is ``null``.
2. runner -> grader: ``{"event": "started"}`` once its own imports are done
   (the cells' time limit counts from here), then one ``{"event": "cell", "index", "status": "ok" | "error"
   | "timeout", "ename", "evalue", "seconds"}`` per cell run (cells go on
   after an error; after the time limit the rest are skipped), then
   ``{"event": "ready", "refused": [...], "printed": bytes}``.
3. grader -> runner: ``{"probe": "kd_loss", "seed": 123, "id": 0, "timeout": 60}``;
   runner -> grader: ``{"event": "probe", "id": 0, "status": "ok", "data": ...}``
   or ``"status"`` one of ``"missing"`` (no such function defined),
   ``"not_implemented"``, ``"refused"`` (it called a reference answer),
   and, whatever the status, ``"delegated": "<what>"`` when the student's
   code called a helper of ``kdcourse.checks`` (:mod:`kdcourse.grading.guard`),
   ``"error"`` (with ``"type"`` and ``"message"``), ``"timeout"``.
   ``{"quit": true}`` ends the runner.

The student's code can of course reach everything in this process (the
protocol fds included); the design does not rely on it being honest. What it
sends back is validated plain data, compared by the grader with answers the
grader computes itself on inputs drawn from seeds chosen per run.
"""
from __future__ import annotations

import io
import json
import os
import signal
import sys
import time

MESSAGE_CAP = 500


class _Timeout(BaseException):
    """Raised by the alarm in a cell or probe that ran past its time."""


class _Sink(io.TextIOBase):
    """Where the student's prints go: counted, not kept."""

    def __init__(self, fd: int):
        self.count, self._fd = 0, fd

    def write(self, s) -> int:
        self.count += len(s)
        return len(s)

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        return False


def _alarm(*_):
    raise _Timeout()


def _set_alarm(seconds: float | None) -> None:
    signal.setitimer(signal.ITIMER_REAL, max(0.001, seconds) if seconds else 0)


def _short(text, cap: int = MESSAGE_CAP) -> str:
    s = str(text)
    return s if len(s) <= cap else s[: cap - 1] + "…"


def _shell():
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    c = Config()
    c.HistoryManager.enabled = False
    c.InteractiveShell.colors = "NoColor"
    c.InteractiveShell.xmode = "Plain"
    c.InteractiveShell.autocall = 0
    return InteractiveShell.instance(config=c)


def _run_cell(shell, source: str, deadline: float) -> dict:
    t0 = time.monotonic()
    status, ename, evalue = "ok", "", ""
    try:
        _set_alarm(deadline - t0)
        result = shell.run_cell(source, store_history=False, silent=False)
        _set_alarm(None)
        err = result.error_before_exec or result.error_in_exec
        if isinstance(err, _Timeout) or time.monotonic() >= deadline:
            status = "timeout"
        elif err is not None:
            status, ename, evalue = "error", type(err).__name__, _short(err)
    except _Timeout:
        status = "timeout"
    finally:
        _set_alarm(None)
    return {"status": status, "ename": ename, "evalue": evalue, "seconds": round(time.monotonic() - t0, 3)}


def answer_probe(exercise, fn, seed: int, timeout: float, guard=None) -> dict:
    """Run one probe on the student's function (under ``guard``, a
    :class:`kdcourse.grading.guard.Guard`, when given); the reply (without
    ``id``), with ``"delegated"`` when the student's code called a helper of
    the course's checks."""
    reply = _probe(exercise, fn, seed, timeout, guard)
    if guard is not None and guard.violation:
        reply["delegated"] = _short(guard.violation, 300)
    return reply


def _probe(exercise, fn, seed, timeout, guard) -> dict:
    from kdcourse.checks import contract

    if guard is not None:
        guard.violation = ""
    if not callable(fn):
        return {"status": "missing"}
    try:
        _set_alarm(timeout)
        data = guard.run(contract.run_probe, exercise, fn, seed) if guard else contract.run_probe(exercise, fn, seed)
        _set_alarm(None)
        return {"status": "ok", "data": data}
    except _Timeout:
        return {"status": "timeout"}
    except NotImplementedError:
        return {"status": "not_implemented"}
    except Exception as exc:  # the student's code failed (or returned something unusable)
        if contract.is_refusal(exc):
            return {"status": "refused", "message": _short(exc, 300)}
        return {"status": "error", "type": type(exc).__name__, "message": _short(exc)}
    finally:
        _set_alarm(None)


def main() -> int:
    proto_in = os.fdopen(os.dup(0), "r", encoding="utf-8")
    proto_out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    devnull = os.open(os.devnull, os.O_RDWR)
    keep_stderr = os.environ.get("KDCOURSE_RUNNER_STDERR") == "1"
    for fd in (0, 1) if keep_stderr else (0, 1, 2):
        os.dup2(devnull, fd)

    def send(msg: dict) -> None:
        proto_out.write(json.dumps(msg, allow_nan=True) + "\n")
        proto_out.flush()

    job = json.loads(proto_in.readline())
    # Everything the grading side needs is imported before any student code runs.
    from kdcourse.checks import contract

    exercises = {e.name: e for e in contract.exercises_for(job["lab"])}
    signal.signal(signal.SIGALRM, _alarm)
    sink = _Sink(1)
    sys.stdin = io.StringIO("")
    sys.stdout = sink
    if not keep_stderr:
        sys.stderr = _Sink(2)
    shell = _shell()
    from kdcourse.grading.guard import Guard

    guard = Guard(shell.user_ns, exercises.values())  # notes the checks' code before any student code runs

    send({"event": "started"})  # the grader counts the cells' time limit from here
    deadline = time.monotonic() + float(job.get("timeout", 300))
    after = job.get("preamble_after")
    preamble = job.get("preamble") or ""
    if preamble and after is None:
        shell.run_cell(preamble, store_history=False)
    stopped = False
    for cell in job["cells"]:
        if stopped:
            break
        reply = _run_cell(shell, cell["source"], deadline)
        send({"event": "cell", "index": cell["index"], **reply})
        if cell["index"] == after and preamble:
            shell.run_cell(preamble, store_history=False)
        stopped = reply["status"] == "timeout"

    refused = contract.refuse_references(exercises.values())
    send({"event": "ready", "refused": refused, "printed": sink.count, "stopped": stopped})
    for line in proto_in:
        try:
            req = json.loads(line)
        except ValueError:
            continue
        if req.get("quit"):
            break
        name, rid = req.get("probe"), req.get("id")
        ex = exercises.get(name)
        if ex is None:
            send({"event": "probe", "id": rid, "status": "error", "type": "GraderError",
                  "message": f"lab {job['lab']} declares no exercise {name!r}"})
            continue
        fn = shell.user_ns.get(name)
        reply = answer_probe(ex, fn, int(req.get("seed", 0)), float(req.get("timeout", ex.timeout)), guard)
        send({"event": "probe", "id": rid, **reply})
    return 0


if __name__ == "__main__":
    sys.exit(main())

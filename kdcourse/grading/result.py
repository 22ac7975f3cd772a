"""What grading one notebook returns: plain dataclasses, shared by the
one-notebook grader (:mod:`kdcourse.grading.grade`) and the batch, tables and
feedback files (:mod:`kdcourse.grading.batch`).

    NotebookResult(student, path, exercises=[ExerciseResult(...), ...], status, notes, seconds, sandbox)

* ``ExerciseResult.earned`` is ``points`` or ``0.0`` (an exercise is right or
  it is not); ``hint`` says why points were lost ("" on full marks) and may
  contain the student's own text (an exception message) only inside
  :func:`student_text`'s label, already capped; ``notes`` are facts the
  instructor may want (e.g. "delegates to kdcourse.losses.kd_loss").
* ``NotebookResult.status``: ``"graded"`` (even with zero points), or why the
  notebook could not be graded as a whole: ``"not a notebook"``,
  ``"time limit"`` (its cells overran; exercises defined before still
  graded), ``"kernel died"``, ``"sandbox failed"``, ``"grader error"``,
  ``"not graded"`` (the batch stopped before it). ``notes``: cells that
  raised, deleted / added / reordered cells, probes that timed out.
* ``sandbox``: how the kernel was isolated (``"bubblewrap"``, or
  ``"none (--no-sandbox)"``), so the tables can say so.

Strings here are plain text: escaping for CSV, Markdown or HTML is the
writer's job.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

STUDENT_TEXT_CAP = 200  # characters of a student's own message kept in a hint

DEFAULT_PROFILE = "smoke"
DEFAULT_TIMEOUT = 300.0  # seconds for all of a notebook's own cells
DEFAULT_PROBE_TIMEOUT = 60.0  # seconds for one probe (one exercise, one seed)
DEFAULT_RANDOM_SEEDS = 2  # per exercise and run, drawn with `secrets`, beside the declared hidden seeds


def student_text(text, cap: int = STUDENT_TEXT_CAP) -> str:
    """The student's own text (an exception message), labelled and capped:
    ``[student's message: "..."]``. Control characters become spaces; ANSI
    colour codes are dropped."""
    s = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(text))
    s = "".join(" " if unicodedata.category(ch)[0] == "C" else ch for ch in s)
    s = re.sub(r"\s+", " ", s).strip()
    if len(s) > cap:
        s = s[: cap - 1] + "…"
    return f'[student\'s message: "{s}"]'


@dataclass
class Options:
    """How submissions are run (the batch builds it from the command line)."""

    profile: str = DEFAULT_PROFILE
    timeout: float = DEFAULT_TIMEOUT  # all of a notebook's own cells
    probe_timeout: float = DEFAULT_PROBE_TIMEOUT  # one probe
    all_cells: bool = False  # run every cell, not only up to the last exercise cell
    skip_tags: tuple = ()
    random_seeds: int = DEFAULT_RANDOM_SEEDS
    cache: str | None = None  # share this KDCOURSE_CACHE instead of a fresh one per notebook
    data: str | None = None  # share this KDCOURSE_DATA instead of a fresh one per notebook
    max_notebook_bytes: int = 20_000_000


@dataclass
class ExerciseResult:
    name: str  # the function the student defines, e.g. "kd_loss"
    points: float  # what the exercise is worth
    earned: float = 0.0
    hint: str = ""  # why points were lost; "" on full marks
    notes: list = field(default_factory=list)

    @property
    def full(self) -> bool:
        return self.earned == self.points


@dataclass
class NotebookResult:
    student: str
    path: str
    exercises: list = field(default_factory=list)  # [ExerciseResult], in the lab's order
    status: str = "graded"
    notes: list = field(default_factory=list)
    seconds: float = 0.0
    sandbox: str = ""

    @property
    def total(self) -> float:
        return sum(e.earned for e in self.exercises)

    @property
    def max_total(self) -> float:
        return sum(e.points for e in self.exercises)

    def exercise(self, name: str) -> ExerciseResult:
        return next(e for e in self.exercises if e.name == name)


def not_graded(student: str, path: str, exercises, status: str, reason: str, notes=(), seconds: float = 0.0,
               sandbox: str = "") -> NotebookResult:
    """A result with every exercise at zero for one reason (``exercises``:
    the lab's declared exercises, anything with ``.name`` and ``.points``)."""
    return NotebookResult(student, path, [ExerciseResult(e.name, float(e.points), 0.0, f"not graded: {reason}")
                                          for e in exercises], status, list(notes), seconds, sandbox)

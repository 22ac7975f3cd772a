"""What the grader writes: the score tables, an LMS import file and one
feedback file per student.

In ``--out`` (default ``grades/``), for lab ``01_classic_kd``:

``01_classic_kd.csv``
    One row per submission: ``student``, then for each exercise ``<name>``
    (points earned) and ``<name> hint``, then ``total``, ``max``, ``status``,
    ``sandbox``, ``notes``, ``seconds``.
``01_classic_kd.md``
    The same as a Markdown table, with how the batch ran (profile, limits,
    sandbox) above it and the mean points per exercise below.
``01_classic_kd.moodle.csv``
    Moodle's gradebook CSV import ("Grades → Import → CSV file"), three
    columns: ``Username`` (the submission's file name, or its folder for
    ``alice/lab.ipynb``), ``01_classic_kd`` (the total points) and
    ``Feedback`` (one line: the points per exercise and the first hint). On
    import choose "Identify user by: Username → username", map
    ``01_classic_kd`` to the lab's grade item and ``Feedback`` to that item's
    feedback. Rows whose grade could not be decided (interrupted, grader
    error) have an empty grade, which Moodle skips.
``feedback/01_classic_kd/<student>.md``
    For each student: the total, each exercise with its points, the hint and
    the notes, and the notebook's own notes; the file name is the student's
    name with anything but letters, digits, ``.``, ``_`` and ``-`` turned into
    ``_`` (a number is added where two names would share a file).

Every file is written through :func:`safe_io.write_atomic`; every CSV cell
goes through :func:`safe_io.csv_cell` (no formulas) and every Markdown text
through :func:`safe_io.md_text` (no raw HTML, no table breaking).
"""
from __future__ import annotations

import csv
import io
import os
import re
import unicodedata

from .safe_io import csv_cell, md_text, open_out_dir, write_atomic

UNDECIDED = ("not graded (interrupted)", "grader error")


def _num(x: float) -> str:
    return f"{x:g}"


def _csv(rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    for row in rows:
        w.writerow([csv_cell(c) for c in row])
    return buf.getvalue()


def scores_csv(exercises, results) -> str:
    names = [e.name for e in exercises]
    rows = [["student"] + [c for n in names for c in (n, f"{n} hint")]
            + ["total", "max", "status", "sandbox", "notes", "seconds"]]
    for r in results:
        row = [r.student]
        for e in r.exercises:
            row += [_num(e.earned), "; ".join([e.hint] * bool(e.hint) + list(e.notes))]
        row += [_num(r.total), _num(r.max_total), r.status, r.sandbox, "; ".join(r.notes), f"{r.seconds:.1f}"]
        rows.append(row)
    return _csv(rows)


def username(student: str) -> str:
    return student.split("/", 1)[0]


def moodle_csv(lab_name: str, results) -> str:
    rows = [["Username", lab_name, "Feedback"]]
    for r in results:
        grade = "" if r.status in UNDECIDED else _num(r.total)
        parts = [f"{e.name} {_num(e.earned)}/{_num(e.points)}" for e in r.exercises]
        first = next((f"{e.name}: {e.hint}" for e in r.exercises if e.hint), "")
        feedback = f"{_num(r.total)}/{_num(r.max_total)} ({', '.join(parts)})" + (f". {first}" if first else "")
        if r.status != "graded":
            feedback = f"[{r.status}] " + feedback
        rows.append([username(r.student), grade, feedback[:1000]])
    return _csv(rows)


def header_lines(lab_name: str, info: dict) -> list[str]:
    """How the batch ran, for the Markdown table and the feedback files."""
    lines = []
    sandbox = info.get("sandbox", "")
    if sandbox and not sandbox.startswith("bubblewrap"):
        lines += [f"**Not sandboxed ({md_text(sandbox)})**: the submissions' code ran with the grader's "
                  f"rights; these scores are only as trustworthy as the notebooks.", ""]
    bits = []
    for key, label in (("profile", "profile"), ("timeout", "time limit per notebook (s)"),
                       ("probe_timeout", "per probe (s)"), ("sandbox", "sandbox"), ("jobs", "jobs")):
        if key in info:
            bits.append(f"{label} {md_text(info[key])}")
    if bits:
        lines += ["Graded with " + ", ".join(bits) + ".", ""]
    for note in info.get("batch_notes", []):
        lines.append(f"- {md_text(note)}")
    if info.get("batch_notes"):
        lines.append("")
    return lines


def scores_md(lab_name: str, exercises, results, info: dict) -> str:
    names = [e.name for e in exercises]
    lines = [f"# Grades — {md_text(lab_name)}", ""] + header_lines(lab_name, info)
    lines.append("| student | " + " | ".join(f"{md_text(e.name)} ({_num(e.points)})" for e in exercises)
                 + " | total | status | notes |")
    lines.append("|---|" + "---|" * len(names) + "---|---|---|")
    for r in results:
        cells = []
        for e in r.exercises:
            text = "; ".join([e.hint] * bool(e.hint) + list(e.notes))
            cells.append(_num(e.earned) + (f" — {md_text(text)}" if text else ""))
        lines.append(f"| {md_text(r.student)} | " + " | ".join(cells)
                     + f" | {_num(r.total)} / {_num(r.max_total)} | {md_text(r.status)} | {md_text('; '.join(r.notes))} |")
    decided = [r for r in results if r.status not in UNDECIDED]
    if decided:
        lines += ["", "Mean points per exercise: " + ", ".join(
            f"{md_text(n)} {sum(r.exercises[k].earned for r in decided) / len(decided):.2f}"
            for k, n in enumerate(names))]
    return "\n".join(lines) + "\n"


def feedback_md(lab_name: str, r, info: dict) -> str:
    lines = [f"# {md_text(lab_name)} — feedback for {md_text(r.student)}", "",
             f"**Total: {_num(r.total)} / {_num(r.max_total)}** ({md_text(r.status)})", ""]
    for e in r.exercises:
        lines.append(f"## {md_text(e.name)}: {_num(e.earned)} / {_num(e.points)}")
        lines.append("")
        lines.append(md_text(e.hint) if e.hint else "Correct.")
        for n in e.notes:
            lines.append(f"- {md_text(n)}")
        lines.append("")
    if r.notes:
        lines += ["## Notes on the notebook", ""] + [f"- {md_text(n)}" for n in r.notes] + [""]
    lines += header_lines(lab_name, info)
    return "\n".join(lines).rstrip("\n") + "\n"


def feedback_names(students) -> list[str]:
    """A file name (``.md``) for each student, in order: unique (two rows
    with the same name get two files), plain characters only."""
    out, used = [], set()
    for s in students:
        base = unicodedata.normalize("NFKD", s)
        base = "".join(ch for ch in base if not unicodedata.combining(ch))
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._") or "student"
        base = base[:100]
        name, k = base, 2
        while name.lower() in used:
            name, k = f"{base}-{k}", k + 1
        used.add(name.lower())
        out.append(name + ".md")
    return out


def write_all(out_dir: str, lab_name: str, exercises, results, info: dict) -> list[str]:
    """Write every file above; returns their paths (relative to ``out_dir``)."""
    dfd = open_out_dir(out_dir)
    written = []
    try:
        for name, text in ((f"{lab_name}.csv", scores_csv(exercises, results)),
                           (f"{lab_name}.md", scores_md(lab_name, exercises, results, info)),
                           (f"{lab_name}.moodle.csv", moodle_csv(lab_name, results))):
            write_atomic(dfd, name, text)
            written.append(name)
    finally:
        os.close(dfd)
    fb_dir = os.path.join(out_dir, "feedback", lab_name)
    fdfd = open_out_dir(fb_dir)
    try:
        for r, fname in zip(results, feedback_names([r.student for r in results])):
            write_atomic(fdfd, fname, feedback_md(lab_name, r, info))
            written.append(f"feedback/{lab_name}/{fname}")
    finally:
        os.close(fdfd)
    return written

"""The grader's own input and output (kdcourse.grading.safe_io, tables,
batch) with a stand-in for grading one notebook: fast, no kernels.

What is checked is what an instructor opens: the CSV a spreadsheet reads
(no formula runs), the Markdown (no raw HTML), the Moodle import file, the
feedback files, and that nothing planted in the submissions or output
folder is read through or written through."""
from __future__ import annotations

import argparse
import csv
import io
import os
import signal
import threading
import time
import types

import nbformat
import pytest

from kdcourse.grading import batch, result as R, safe_io, tables

EXERCISES = [types.SimpleNamespace(name="soft_targets", points=1.0, check=None, refused_functions=lambda: ()),
             types.SimpleNamespace(name="kd_loss", points=2.0, check=None, refused_functions=lambda: ())]


def _result(student, earned=(1.0, 2.0), hint="", status="graded", notes=()):
    exs = [R.ExerciseResult(e.name, e.points, x, "" if x == e.points else hint) for e, x in zip(EXERCISES, earned)]
    return R.NotebookResult(student, f"{student}.ipynb", exs, status, list(notes), 1.0, "bubblewrap")


def _notebook(path, version=4):
    if version == 4:
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell("x = 1")]
        nbformat.write(nb, str(path))
    else:
        nb = nbformat.v3.new_notebook()
        nb.worksheets = [nbformat.v3.new_worksheet(cells=[nbformat.v3.new_code_cell(input="x = 1\ny = 2")])]
        with open(path, "w") as f:
            nbformat.v3.nbjson.write(nb, f)


# --------------------------------------------------------------------------
# Reading: only regular files, never blocking, never following a link
# --------------------------------------------------------------------------

def test_reading_refuses_fifo_symlink_device_folder_and_oversize_without_blocking(tmp_path):
    good = tmp_path / "good.ipynb"
    _notebook(good)
    fifo = tmp_path / "fifo.ipynb"
    os.mkfifo(fifo)
    link = tmp_path / "link.ipynb"
    link.symlink_to(good)
    (tmp_path / "dir.ipynb").mkdir()
    done = threading.Event()

    def read_all():
        for p, why in ((fifo, "FIFO"), (link, "symbolic link"), ("/dev/zero", "device"),
                       (tmp_path / "dir.ipynb", "directory")):
            with pytest.raises(safe_io.UnsafeFile, match=why):
                safe_io.read_regular(str(p))
        done.set()
    t = threading.Thread(target=read_all, daemon=True)
    t.start()
    t.join(20)
    assert done.is_set(), "reading a FIFO (or device) must not block"
    assert safe_io.read_regular(str(good)).startswith(b"{")
    with pytest.raises(safe_io.UnsafeFile, match="over the cap"):
        safe_io.read_regular(str(good), cap=10)


def test_nbformat_3_is_upgraded_and_graded_not_rejected(tmp_path):
    p = tmp_path / "old.ipynb"
    _notebook(p, version=3)
    nb, notes = safe_io.read_notebook(str(p))
    assert nb["nbformat"] == 4 and [c["source"] for c in nb["cells"]] == ["x = 1\ny = 2"]
    assert any("nbformat 3" in n for n in notes)
    (tmp_path / "junk.ipynb").write_text("not json")
    with pytest.raises(ValueError, match="not a notebook"):
        safe_io.read_notebook(str(tmp_path / "junk.ipynb"))


def test_find_submissions_keeps_a_row_for_links_and_fifos_and_never_follows_them(tmp_path):
    subs = tmp_path / "subs"
    (subs / "alice").mkdir(parents=True)
    _notebook(subs / "alice" / "lab.ipynb")
    _notebook(subs / "bob.ipynb")
    os.mkfifo(subs / "fifo.ipynb")
    (subs / "cheat.ipynb").symlink_to(subs / "bob.ipynb")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    _notebook(outside / "x.ipynb")
    (subs / "linked_dir").symlink_to(outside)
    found, skipped = safe_io.find_submissions(str(subs))
    assert [s for s, _ in found] == ["alice/lab", "bob", "cheat", "fifo"]
    assert any("cheat.ipynb" in s and "symbolic link" in s for s in skipped)
    assert any("linked_dir" in s for s in skipped)


# --------------------------------------------------------------------------
# Writing: atomic, never through a planted link or FIFO
# --------------------------------------------------------------------------

def test_write_atomic_replaces_a_planted_symlink_or_fifo_and_leaves_the_target_alone(tmp_path):
    out = tmp_path / "grades"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / "lab.csv").symlink_to(victim)
    os.mkfifo(out / "lab.md")
    done = threading.Event()

    def write():
        safe_io.write_atomic(str(out), "lab.csv", "a,b\n")
        safe_io.write_atomic(str(out), "lab.md", "# t\n")
        done.set()
    t = threading.Thread(target=write, daemon=True)
    t.start()
    t.join(20)
    assert done.is_set(), "writing over a FIFO must not block"
    assert victim.read_text() == "precious"
    assert not os.path.islink(out / "lab.csv") and (out / "lab.csv").read_text() == "a,b\n"
    assert (out / "lab.md").read_text() == "# t\n"
    assert sorted(os.listdir(out)) == ["lab.csv", "lab.md"]  # no temporary file left


def test_an_output_folder_that_is_a_symlink_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "out").symlink_to(real)
    with pytest.raises(safe_io.UnsafeFile, match="symbolic link"):
        safe_io.write_atomic(str(tmp_path / "out"), "x.csv", "x")
    assert os.listdir(real) == []


# --------------------------------------------------------------------------
# Text: formulas, HTML, names
# --------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["=cmd|' /C calc'!A0", "=HYPERLINK(\"http://x\",\"y\")", "+1+1", "-2+3", "@SUM(A1)",
                                  "\t=1", "\r=1", "  =1", "\uff1d1"])
def test_csv_cells_that_a_spreadsheet_would_run_are_neutralised(text):
    assert safe_io.csv_cell(text) == "'" + text


def test_csv_cells_that_are_plain_stay_plain():
    assert [safe_io.csv_cell(x) for x in ("alice", "1.5", 2.0, 0.5, "kd_loss: off by T²")] == \
        ["alice", "1.5", "2", "0.5", "kd_loss: off by T²"]


def test_markdown_escapes_html_and_table_syntax():
    s = safe_io.md_text("<script>alert(1)</script> | `x` *y* [a](b)\nnext")
    assert "<" not in s and ">" not in s and "\n" not in s
    assert "\\|" in s and "\\`" in s and "\\*" in s and "\\[" in s


def test_names_are_normalised_and_look_alikes_flagged():
    assert safe_io.student_name("  zoe\u0308 ") == "zo\u00eb"
    col = safe_io.name_collisions(["bob", "bob ", "zo\u00eb", "zoe\u0308", "carol", "Carol", "dave"])
    assert col["bob"] == ["bob "] and col["zoe\u0308"] == ["zo\u00eb"] and col["Carol"] == ["carol"]
    assert "dave" not in col


def test_digest_sees_changes_and_does_not_follow_links(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f.py").write_text("x = 1")
    d0 = safe_io.digest(str(tmp_path / "a"))
    (tmp_path / "a" / "__pycache__").mkdir()
    (tmp_path / "a" / "__pycache__" / "f.pyc").write_bytes(b"\0")
    assert safe_io.digest(str(tmp_path / "a")) == d0  # caches are not content
    (tmp_path / "a" / "f.py").write_text("x = 2")
    d1 = safe_io.digest(str(tmp_path / "a"))
    assert d1 != d0
    os.mkfifo(tmp_path / "a" / "pipe")
    assert safe_io.digest(str(tmp_path / "a")) != d1  # a planted FIFO counts and does not block


# --------------------------------------------------------------------------
# Tables and feedback files
# --------------------------------------------------------------------------

def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def test_tables_moodle_csv_and_feedback_files_hold_hostile_text(tmp_path):
    hostile = "=HYPERLINK(\"http://evil\",\"click\") <img src=x onerror=alert(1)>"
    results = [_result("=cmd|' /C calc'!A0", (0.0, 2.0), hint=f"soft_targets raised {R.student_text(hostile)}"),
               _result("alice"), _result("zoë", (1.0, 0.0), hint="off by T²", notes=["cell 3 raised ValueError"])]
    written = tables.write_all(str(tmp_path), "01_lab", EXERCISES, results, {"profile": "smoke", "sandbox": "bubblewrap"})
    assert sorted(written)[:3] == ["01_lab.csv", "01_lab.md", "01_lab.moodle.csv"]
    rows = _read_csv(tmp_path / "01_lab.csv")
    assert rows[0] == ["student", "soft_targets", "soft_targets hint", "kd_loss", "kd_loss hint", "total", "max",
                       "status", "sandbox", "notes", "seconds"]
    assert rows[1][0] == "'=cmd|' /C calc'!A0" and rows[1][1:4:2] == ["0", "2"] and rows[1][5:7] == ["2", "3"]
    for row in rows:
        for cell in row:
            assert not cell.lstrip(" ").startswith(("=", "+", "@", "\t", "\r")) and not cell.startswith("-"), cell
    moodle = _read_csv(tmp_path / "01_lab.moodle.csv")
    assert moodle[0] == ["Username", "01_lab", "Feedback"]
    assert moodle[2] == ["alice", "3", "3/3 (soft_targets 1/1, kd_loss 2/2)"]
    assert moodle[3][:2] == ["zoë", "1"] and "off by T²" in moodle[3][2]
    md = (tmp_path / "01_lab.md").read_text()
    assert "<img" not in md and "&lt;img" in md and md.count("\n| ") == 4
    fb = tmp_path / "feedback" / "01_lab"
    assert sorted(os.listdir(fb)) == ["alice.md", "cmd_C_calc_A0.md", "zoe.md"]
    z = (fb / "zoe.md").read_text()
    assert "Total: 1 / 3" in z and "off by T²" in z and "cell 3 raised ValueError" in z and "## kd\\_loss: 0 / 2" in z


def test_unsandboxed_batches_say_so_in_every_table(tmp_path):
    tables.write_all(str(tmp_path), "lab", EXERCISES, [_result("a")], {"sandbox": "none (--no-sandbox)"})
    assert "Not sandboxed" in (tmp_path / "lab.md").read_text()
    assert "Not sandboxed" in (tmp_path / "feedback" / "lab" / "a.md").read_text()
    assert _read_csv(tmp_path / "lab.csv")[1][8] == "bubblewrap"  # the row says how it was actually run


def test_feedback_file_names_are_unique_and_plain():
    names = tables.feedback_names(["bob", "bob", "Bob", "../../etc/passwd", ".hidden", "zoë"])
    assert names == ["bob.md", "bob-2.md", "Bob-3.md", "etc_passwd.md", "hidden.md", "zoe.md"]


# --------------------------------------------------------------------------
# The batch, with a stand-in for grading one notebook
# --------------------------------------------------------------------------

def _lab(tmp_path):
    sol = tmp_path / "solution.ipynb"
    _notebook(sol)
    return types.SimpleNamespace(name="01_lab", exercises=EXERCISES, solution_path=str(sol))


def _args(tmp_path, subs, *extra):
    p = argparse.ArgumentParser()
    batch.add_arguments(p)
    return p.parse_args([str(tmp_path / "lab.ipynb"), str(subs), "--out", str(tmp_path / "grades"), "--no-sandbox",
                         *extra])


def _subs(tmp_path, names):
    subs = tmp_path / "subs"
    subs.mkdir()
    for n in names:
        _notebook(subs / f"{n}.ipynb")
    return subs


def test_batch_flags_look_alike_names_and_grades_everyone(tmp_path):
    subs = _subs(tmp_path, ["bob", "bob ", "zo\u00eb", "zoe\u0308"])
    lab = _lab(tmp_path)
    rc = batch.main(_args(tmp_path, subs), grade_one=lambda b, nb, student, path: _result(student),
                    load_lab=lambda *a: lab)
    assert rc == 0
    rows = {tuple(r[:1] + r[9:10]) for r in _read_csv(tmp_path / "grades" / "01_lab.csv")[1:]}
    assert len(rows) == 4
    notes = [r[9] for r in _read_csv(tmp_path / "grades" / "01_lab.csv")[1:]]
    assert all("looks like another submission" in n for n in notes)
    assert len(os.listdir(tmp_path / "grades" / "feedback" / "01_lab")) == 4


def test_sigterm_writes_the_tables_for_what_was_graded_and_marks_the_rest(tmp_path):
    subs = _subs(tmp_path, ["a1", "a2", "a3", "a4"])
    lab = _lab(tmp_path)

    def grade_one(b, nb, student, path):
        if student == "a2":  # an unsandboxed submission kills its parent
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)
        return _result(student)

    rc = batch.main(_args(tmp_path, subs), grade_one=grade_one, load_lab=lambda *a: lab)
    assert rc == 128 + signal.SIGTERM
    rows = {r[0]: r for r in _read_csv(tmp_path / "grades" / "01_lab.csv")[1:]}
    assert rows["a1"][7] == "graded" and rows["a1"][5] == "3"
    assert [rows[s][7] for s in ("a2", "a3", "a4")] == [batch.INTERRUPTED] * 3
    assert [rows[s][5] for s in ("a2", "a3", "a4")] == ["0"] * 3
    moodle = {r[0]: r for r in _read_csv(tmp_path / "grades" / "01_lab.moodle.csv")[1:]}
    assert moodle["a1"][1] == "3" and moodle["a3"][1] == ""  # Moodle skips an undecided grade
    assert "stopped by signal" in (tmp_path / "grades" / "01_lab.md").read_text()


def test_a_changed_solution_or_output_folder_aborts_without_writing(tmp_path):
    subs = _subs(tmp_path, ["a", "b"])
    lab = _lab(tmp_path)

    def tamper(b, nb, student, path):
        with open(lab.solution_path, "a") as f:
            f.write(" ")
        return _result(student)

    assert batch.main(_args(tmp_path, subs), grade_one=tamper, load_lab=lambda *a: lab) == 3
    assert os.listdir(tmp_path / "grades") == []

    def plant(b, nb, student, path):
        (tmp_path / "grades" / "01_lab.csv").write_text("student,total\nmallory,100\n")
        return _result(student)

    assert batch.main(_args(tmp_path, subs), grade_one=plant, load_lab=lambda *a: lab) == 3
    assert (tmp_path / "grades" / "01_lab.csv").read_text() == "student,total\nmallory,100\n"


def test_batch_rows_for_unreadable_files_say_why(tmp_path):
    subs = _subs(tmp_path, ["ok"])
    os.mkfifo(subs / "pipe.ipynb")
    (subs / "link.ipynb").symlink_to(subs / "ok.ipynb")
    lab = _lab(tmp_path)
    rc = batch.main(_args(tmp_path, subs, "--jobs", "2"), grade_one=lambda b, nb, student, path: _result(student),
                    load_lab=lambda *a: lab)
    assert rc == 0
    rows = {r[0]: r for r in _read_csv(tmp_path / "grades" / "01_lab.csv")[1:]}
    assert rows["ok"][7] == "graded"
    assert rows["pipe"][7] == rows["link"][7] == "not a notebook"
    assert "FIFO" in rows["pipe"][9] and "symbolic link" in rows["link"][9]


def test_bad_arguments_are_named(tmp_path, capsys):
    subs = _subs(tmp_path, ["a"])
    for extra, word in ((["--jobs", "0"], "--jobs"), (["--timeout", "-1"], "--timeout"),
                        (["--profile", "huge"], "--profile"), (["--cache", str(tmp_path / "nope")], "--cache")):
        assert batch.main(_args(tmp_path, subs, *extra), load_lab=lambda *a: _lab(tmp_path)) == 2
        assert word in capsys.readouterr().out


def test_without_a_sandbox_untrusted_work_is_refused(tmp_path, capsys, monkeypatch):
    from kdcourse.grading import sandbox

    subs = _subs(tmp_path, ["a"])
    monkeypatch.setattr(sandbox, "available", lambda refresh=False: (False, "bubblewrap is not installed"))
    p = argparse.ArgumentParser()
    batch.add_arguments(p)
    args = p.parse_args([str(tmp_path / "lab.ipynb"), str(subs), "--out", str(tmp_path / "grades")])
    assert batch.main(args, grade_one=lambda *a: pytest.fail("graded without a sandbox"),
                      load_lab=lambda *a: _lab(tmp_path)) == 2
    assert "sandbox cannot start" in capsys.readouterr().out
    assert not os.path.exists(tmp_path / "grades" / "01_lab.csv")

"""Every attack of the grading issue, as a Lab 1 submission (smoke profile),
graded in ONE sandboxed batch (``kdcourse grade --jobs 2``): the grade and
the instructor's files must hold. Notebooks keep only the cells grading
needs (``grading_notebooks.reduced``), so each takes seconds.

A notebook that solves nothing (the untouched lab) plus an attack must
score 0; a correct notebook plus an attack on the instructor's files keeps
its marks and changes nothing outside; later submissions are graded as if
nothing happened. The hostile code gets the real host paths (the strongest
case: it knows where everything is)."""
from __future__ import annotations

import copy
import csv
import os
import shutil
import sys
import time
import unicodedata

import pytest

from grading_notebooks import (LAB1_LAB, LAB1_SOLUTION, ROOT, cell_defining, imports_cell, insert, insert_needed,
                               last_exercise_cell, read_rows, reduced, student_copy, write)
from kdcourse import cli, labgen
from kdcourse.grading import safe_io, sandbox

pytestmark = pytest.mark.notebooks
MARK = f"planted by a submission {os.getpid()}"
LAB = "01_classic_kd"
FORMULA_DIR, FORMULA_FILE = "=cmd|' ", "C calc'!A0"
FORMULA_NAME = FORMULA_DIR + "/" + FORMULA_FILE
FORMULA_KEY = "'" + FORMULA_NAME  # as the CSV shows it: neutralised


def _need_sandbox():
    ok, why = sandbox.available()
    if not ok:
        if os.environ.get("KDCOURSE_REQUIRE_SANDBOX") == "1":
            pytest.fail(f"KDCOURSE_REQUIRE_SANDBOX=1 but the sandbox cannot start: {why}")
        pytest.skip(f"bubblewrap sandbox unavailable: {why}")


def _declared():
    from kdcourse.grading import grade

    return grade.load_lab(LAB1_LAB).exercises


def _stubs(exercises) -> str:
    """Definitions that make a cell count as an exercise cell (so it runs);
    each reads ``_RAN``, so the grader also runs the statement binding it."""
    return "".join(f"def {e.name}(*args, **kwargs):\n    _RAN\n\n\n" for e in exercises)


def _refs(exercises):
    """(exercise name, module, function name) of each package reference an exercise refuses."""
    return [(e.name, f.__module__, f.__name__) for e in exercises for f in e.refused_functions()[:1]]

EXEC_NOTEBOOK = """
def _run_notebook(paths):
    import json
    for p in paths:
        try:
            with open(p) as f:
                nb = json.load(f)
        except Exception:
            continue
        for c in nb.get('cells', []):
            if c.get('cell_type') == 'code':
                try:
                    exec(''.join(c['source']), globals())
                except BaseException:
                    pass
        return p
"""


def attacks(paths: dict, exercises) -> dict:
    """{name: (base, where, code)}: ``base`` "lab" (solves nothing) or
    "good" (the solution's answers); ``where`` "early" (after the imports)
    or "late" (after the last exercise cell)."""
    p = {k: repr(str(v)) for k, v in paths.items()}
    STUBS = _stubs(exercises)
    refs = _refs(exercises)
    delegate = "import importlib\n" + "".join(
        f"\n\ndef {n}(*args, **kwargs):\n    return getattr(importlib.import_module({m!r}), {f!r})(*args, **kwargs)\n"
        for n, m, f in refs)
    capture = "import importlib\n_refs = {" + ", ".join(
        f"{n!r}: getattr(importlib.import_module({m!r}), {f!r})" for n, m, f in refs) + "}\n"
    from_source = "import importlib\n_ns = {}\n" + "".join(
        f"for _path in (importlib.import_module({m!r}).__file__, {p['root_package']}.rstrip('/') + '/' + {m!r}.replace('.', '/')[9:] + '.py'):\n"
        f"    try:\n        _ns.setdefault({m!r}, {{}})\n        exec(compile(open(_path).read(), _path, 'exec'), _ns[{m!r}])\n"
        f"    except Exception:\n        pass\n" for m in sorted({m for _n, m, _f in refs})) + "".join(
        f"\n\ndef {n}(*args, **kwargs):\n    return _ns[{m!r}][{f!r}](*args, **kwargs)\n" for n, m, f in refs)
    return {
        "forge_checks": ("lab", "early", f"""
import kdcourse.checks as _c
from kdcourse.checks import lab1 as _l, contract as _k
for _m in (_c, _l):
    for _n in dir(_m):
        if _n.startswith('check_'):
            setattr(_m, _n, lambda *a, **k: True)
_k.compare = lambda *a, **k: None
_k.diagnose_data = lambda *a, **k: _k.Verdict(True)
_k.run_probe = lambda ex, fn, seed: ex.probe(ex.reference, seed)   # answer with the reference's data
"""),
        "forge_allclose": ("lab", "early", """
import torch, torch.testing
torch.allclose = lambda *a, **k: True
torch.isclose = lambda a, b, *x, **k: torch.ones_like(a, dtype=torch.bool)
torch.testing.assert_close = lambda *a, **k: None
torch.Tensor.__eq__ = lambda self, other: True
"""),
        "forge_reference_losses": ("lab", "early", """
import torch, kdcourse.losses as _L
from kdcourse.losses import response as _R
for _m in (_L, _R):
    _m.kd_loss = lambda *a, **k: torch.tensor(0.0)
    _m.soft_targets = lambda *a, **k: torch.tensor(0.0)
"""),
        "forge_exception_display": ("lab", "early", """
_ip = get_ipython()
_ip.set_custom_exc((BaseException,), lambda *a, **k: None)
_ip._showtraceback = lambda *a, **k: None
_ip.showtraceback = lambda *a, **k: None
"""),
        "forge_input_transformer": ("lab", "early", """
get_ipython().input_transformers_cleanup.append(
    lambda lines: [l for l in lines if 'NotImplementedError' not in l and 'check' not in l])
"""),
        "forge_fake_checks_module": ("lab", "early", """
import sys, types
_fake = types.ModuleType('kdcourse.checks')
_fake.__path__ = []
for _n in ('check_soft_targets', 'check_kd_loss', 'run_probe', 'validate', 'is_refusal'):
    setattr(_fake, _n, lambda *a, **k: True)
for _name in ('kdcourse.checks', 'kdcourse.checks.lab1', 'kdcourse.checks.contract'):
    sys.modules[_name] = _fake
import kdcourse
kdcourse.checks = _fake
"""),
        "read_solution": ("lab", "late", STUBS + EXEC_NOTEBOOK + f"""
import os, json, glob, kdcourse
_c = [os.path.join(os.path.dirname(os.path.dirname(kdcourse.__file__)), 'solutions', '01_classic_kd.ipynb'),
      {p['solution']}, {p['root_solution']}, '../solutions/01_classic_kd.ipynb']
for _pid in os.listdir('/proc'):
    if _pid.isdigit():
        try:
            _c.append(os.path.join(os.readlink(f'/proc/{{_pid}}/cwd'), 'solutions', '01_classic_kd.ipynb'))
        except OSError:
            pass
        try:
            for _a in open(f'/proc/{{_pid}}/cmdline', 'rb').read().split(b'\\0'):
                _a = _a.decode(errors='ignore')
                _c += [_a, os.path.join(os.path.dirname(os.path.dirname(_a)), 'solutions', '01_classic_kd.ipynb')]
        except OSError:
            pass
for _p in os.environ.get('PYTHONPATH', '').split(':'):
    _c += [os.path.join(_p, '..', 'solutions', '01_classic_kd.ipynb'),
           os.path.join(os.path.dirname(_p), 'solutions', '01_classic_kd.ipynb')]
try:
    import importlib.metadata as _md
    _url = json.loads(_md.distribution('kdcourse').read_text('direct_url.json'))['url']
    _c.append(_url.replace('file://', '') + '/solutions/01_classic_kd.ipynb')
except Exception:
    pass
for _top in ('/work', '/tmp', '/home', '/opt', '/mnt', '/srv'):
    _c += glob.glob(_top + '/**/solutions/*.ipynb', recursive=True)
_RAN = _run_notebook([c for c in _c if c.endswith('.ipynb')])
"""),
        "classmate": ("lab", "late", STUBS + EXEC_NOTEBOOK + f"""
import os, sys


def _everywhere(name):  # every folder the kernel can list, less the system's and Python's own trees
    skip = {'/proc', '/sys', '/dev', '/usr', '/lib', '/lib64', '/bin', '/sbin', '/etc', sys.prefix, sys.base_prefix}
    for root, dirs, files in os.walk('/'):
        dirs[:] = [d for d in dirs if os.path.join(root, d) not in skip]
        if name in files:
            yield os.path.join(root, name)


_RAN = _run_notebook([{p['alice']}, '../submissions/alice.ipynb'] + list(_everywhere('alice.ipynb')))
"""),
        "import_reference": ("lab", "late", delegate),
        # the checks' private copy of a right answer (a known-wrong variant's formula that happens to be right)
        "delegates_to_checks": ("lab", "late", "from kdcourse.checks import lab1_training as _t\n\n\n"
                                               "def kd_grad(s, t, T):\n    return _t._kd_formula(s, t, T)\n"),
        "captured_reference": ("lab", "early", capture),
        "reference_source": ("lab", "late", from_source),
        "writes_outside": ("good", "early", f"""
import os, sys, kdcourse
_targets = [{p['solution']}, {p['root_solution']}, {p['root_lab1_checks']}, {p['root_sitecustomize']},
            os.path.join(os.path.dirname(kdcourse.__file__), 'checks', 'lab1.py'),
            os.path.join(os.path.dirname(os.path.dirname(kdcourse.__file__)), 'sitecustomize.py'),
            {p['site_sitecustomize']}, {p['earlier_table']}, {p['table_csv']}, {p['victim']}, {p['bashrc']},
            {p['git_hook']}, {p['later_submission']}, os.path.expanduser('~/.bashrc')]
for _t in _targets:
    try:
        os.makedirs(os.path.dirname(_t), exist_ok=True)
        with open(_t, 'a') as _f:
            _f.write({MARK!r} + '\\n')
    except OSError:
        pass
"""),
        "detached": ("good", "early", f"""
import subprocess, sys
_code = '''import os, time
os.setsid()
if os.fork():
    os._exit(0)
for _ in range(1200):
    time.sleep(0.25)
    for t in ({p['table_csv']}, {p['earlier_table']}):
        try:
            open(t, 'w').write('student,total\\\\nmallory,100\\\\n')
        except OSError:
            pass
'''
subprocess.Popen([sys.executable, '-c', _code, {MARK!r}], start_new_session=True,
                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
"""),
        "kills_parent": ("good", "early", """
import os, signal
for _sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    for _pid in (os.getppid(), -1):
        try:
            os.kill(_pid, _sig)
        except OSError:
            pass
"""),
    }


def _with_raising_bodies(sol):
    return reduced(student_copy(sol, {
        "soft_targets": lambda fn: "raise ValueError('=HYPERLINK(\"http://evil.example\",\"click\")')",
        "kd_loss": lambda fn: "raise ValueError('<img src=x onerror=alert(1)><script>alert(2)</script>')"}))


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    _need_sandbox()
    home = tmp_path_factory.mktemp("course")
    for sub, src in (("solutions", LAB1_SOLUTION), ("labs", LAB1_LAB)):
        os.makedirs(home / sub)
        shutil.copyfile(src, home / sub / os.path.basename(src))
    sol, lab = labgen.read(LAB1_SOLUTION), reduced(labgen.read(LAB1_LAB))
    good = reduced(student_copy(sol))
    subs, out = home / "submissions", home / "grades"
    out.mkdir()
    (out / "00_earlier.csv").write_text("student,total\nalice,2\n")
    victim = home / "victim.txt"
    victim.write_text("precious")
    (out / f"{LAB}.csv").symlink_to(victim)  # a planted link at the table's path
    os.mkfifo(out / f"{LAB}.md")  # and a FIFO
    import site

    paths = {"solution": home / "solutions" / f"{LAB}.ipynb", "root_solution": LAB1_SOLUTION,
             "root_lab1_checks": os.path.join(ROOT, "kdcourse", "checks", "lab1.py"),
             "root_package": os.path.join(ROOT, "kdcourse"),
             "root_sitecustomize": os.path.join(ROOT, "sitecustomize.py"),
             "site_sitecustomize": os.path.join(site.getsitepackages()[0], "sitecustomize.py"),
             "earlier_table": out / "00_earlier.csv", "table_csv": out / f"{LAB}.csv", "victim": victim,
             "bashrc": os.path.expanduser("~/.bashrc"), "git_hook": os.path.join(ROOT, ".git", "hooks", "pre-commit"),
             "later_submission": subs / "zz_later_good.ipynb", "alice": subs / "alice.ipynb"}
    cases = {}
    exercises = _declared()
    for name, (base, where, code) in attacks(paths, exercises).items():
        nb = good if base == "good" else lab
        at = imports_cell(nb) + 1 if where == "early" else last_exercise_cell(nb) + 1
        # early code runs where the grader runs it: in a statement an exercise needs
        cases[name] = insert_needed(nb, at, code) if where == "early" else insert(nb, at, code)
    cap = cases["captured_reference"]
    k = last_exercise_cell(cap) + 1
    cases["captured_reference"] = insert(cap, k, "".join(f"def {n}(*a, **k):\n    return _refs[{n!r}](*a, **k)\n\n\n"
                                                         for n, _m, _f in _refs(exercises)))
    cases.update({"alice": good, "zz_later_good": good, "zz_later_untouched": lab, "bob": good, "bob ": lab,
                  unicodedata.normalize("NFC", "zoë"): good, unicodedata.normalize("NFD", "zoë"): lab,
                  "hostile_messages": _with_raising_bodies(sol)})
    for name, nb in cases.items():
        write(nb, subs / f"{name}.ipynb")
    write(good, subs / "nbformat3.ipynb", version=3)
    write(good, subs / FORMULA_DIR / f"{FORMULA_FILE}.ipynb")
    os.mkfifo(subs / "fifo.ipynb")
    (subs / "link_to_solution.ipynb").symlink_to(paths["solution"])
    shared = {p: _marked(p) for p in (paths["root_lab1_checks"], paths["root_sitecustomize"], paths["site_sitecustomize"],
                                      paths["bashrc"], paths["git_hook"])}
    assert not any(shared.values())
    before = {"course": safe_io.digest(str(home / "solutions"), str(home / "labs")),
              "submissions": safe_io.digest(str(subs)), "earlier": safe_io.digest(str(out / "00_earlier.csv")),
              "victim": victim.read_text()}
    import tempfile

    private_tmp = tmp_path_factory.mktemp("grader-tmp")  # the batch's temporary folders, apart from other runs
    saved, tempfile.tempdir = tempfile.tempdir, str(private_tmp)
    t0 = time.monotonic()
    try:
        rc = cli.main(["grade", str(home / "labs" / f"{LAB}.ipynb"), str(subs), "--out", str(out), "--jobs", "2",
                       "--timeout", "30", "--random-seeds", "1"])
    finally:
        tempfile.tempdir = saved
    seconds = time.monotonic() - t0
    time.sleep(2.0)  # a detached process that survived would rewrite the tables by now
    return {"exercises": exercises, "rc": rc, "rows": read_rows(out / f"{LAB}.csv"), "home": home, "out": out, "subs": subs, "before": before,
            "shared": list(shared), "private_tmp": private_tmp, "seconds": seconds, "paths": paths,
            "students": {unicodedata.normalize("NFC", n).strip() for n in cases} | {"nbformat3", FORMULA_KEY,
                                                                                    "fifo", "link_to_solution"}}


def _marked(path) -> bool:
    try:
        with open(path, errors="replace") as f:
            return MARK in f.read()
    except OSError:
        return False


def _total(batch, student):
    return batch["rows"][student]["total"]


# --------------------------------------------------------------------------
# The grade holds
# --------------------------------------------------------------------------

def test_the_batch_completes_with_one_row_per_submission(batch):
    assert batch["rc"] == 0
    assert set(batch["rows"]) == batch["students"]


@pytest.mark.parametrize("attack", ["forge_checks", "forge_allclose", "forge_reference_losses", "forge_exception_display",
                                    "forge_input_transformer", "forge_fake_checks_module"])
def test_forging_in_the_kernel_scores_zero(batch, attack):
    row = batch["rows"][attack]
    assert row["total"] == "0" and row["max"] != "0", row


@pytest.mark.parametrize("attack", ["read_solution", "classmate"])
def test_reading_and_running_the_solution_or_a_classmate_scores_zero(batch, attack):
    row = batch["rows"][attack]
    # zero because the files are out of the kernel's sight, not because the search ran out of time
    assert row["total"] == "0" and row["status"] == "graded", row


@pytest.mark.parametrize("attack", ["import_reference", "captured_reference", "reference_source"])
def test_delegating_to_the_reference_scores_zero_and_says_why(batch, attack):
    row = batch["rows"][attack]
    assert row["total"] == "0", row
    refusing = [n for n, _m, _f in _refs(batch["exercises"])]
    assert {"soft_targets", "kd_loss"} <= set(refusing)
    if attack != "reference_source":  # (from source: the copy's bodies are refusals too, or the file is hidden)
        assert all("reference answer" in row[f"{n} hint"] for n in refusing), row


def test_delegating_to_the_checks_helpers_scores_zero_and_says_why(batch):
    row = batch["rows"]["delegates_to_checks"]
    assert row["total"] == "0" and row["kd_grad"] == "0", row
    assert "course's checks" in row["kd_grad hint"] and "_kd_formula" in row["kd_grad hint"], row


def test_a_symlink_or_fifo_named_ipynb_is_not_a_notebook_and_does_not_hang(batch):
    for name, why in (("link_to_solution", "symbolic link"), ("fifo", "FIFO")):
        row = batch["rows"][name]
        assert row["total"] == "0" and row["status"] == "not a notebook" and why in row["notes"], row


def test_attacks_on_files_and_processes_keep_a_correct_notebooks_marks(batch):
    for name in ("writes_outside", "detached", "alice", "zz_later_good", "nbformat3", FORMULA_KEY):
        row = batch["rows"][name]
        assert row["total"] == row["max"] != "0", row
    assert _total(batch, "zz_later_untouched") == "0"  # later students: nothing made everyone pass


def test_nbformat_3_with_correct_answers_gets_full_marks(batch):
    row = batch["rows"]["nbformat3"]
    assert row["total"] == row["max"] and "nbformat 3" in row["notes"], row


def test_look_alike_names_are_flagged_both_ways(batch):
    rows = batch["rows"]
    assert "bob" in rows and "zoë" in rows  # NFC, stripped
    flagged = [r for r in csv.DictReader(open(batch["out"] / f"{LAB}.csv", encoding="utf-8"))
               if "looks like another submission" in r["notes"]]
    assert sorted(r["student"] for r in flagged) == ["bob", "bob", "zoë", "zoë"]
    full = flagged[0]["max"]
    assert sorted(r["total"] for r in flagged) == sorted(["0", "0", full, full])  # both rows kept, each its own grade


# --------------------------------------------------------------------------
# The instructor's files hold
# --------------------------------------------------------------------------

def test_nothing_outside_the_output_folder_changed(batch):
    b = batch["before"]
    assert safe_io.digest(str(batch["home"] / "solutions"), str(batch["home"] / "labs")) == b["course"]
    assert safe_io.digest(str(batch["subs"])) == b["submissions"]
    assert safe_io.digest(str(batch["out"] / "00_earlier.csv")) == b["earlier"]
    assert (batch["home"] / "victim.txt").read_text() == b["victim"]
    assert [p for p in batch["shared"] if _marked(p)] == []


def test_tables_replaced_the_planted_link_and_fifo(batch):
    out = batch["out"]
    for name in (f"{LAB}.csv", f"{LAB}.md", f"{LAB}.moodle.csv"):
        assert os.path.isfile(out / name) and not os.path.islink(out / name)
    assert "mallory" not in (out / f"{LAB}.csv").read_text()


def test_no_process_outlives_the_batch_and_no_temporary_folder_is_left(batch):
    found = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if MARK.encode() in f.read():
                    found.append(pid)
        except OSError:
            pass
    assert found == []
    assert os.listdir(batch["private_tmp"]) == []


def test_csv_and_markdown_carry_no_formula_and_no_raw_html(batch):
    out = batch["out"]
    for name in (f"{LAB}.csv", f"{LAB}.moodle.csv"):
        with open(out / name, encoding="utf-8", newline="") as f:
            for row in csv.reader(f):
                for cell in row:
                    assert not cell.lstrip(" ").startswith(("=", "+", "-", "@", "\t", "\r")), (name, cell)
    assert FORMULA_KEY in batch["rows"] and FORMULA_NAME not in batch["rows"]
    md = (out / f"{LAB}.md").read_text(encoding="utf-8")
    assert "<img" not in md and "<script" not in md and "&lt;img" in md
    for fb in os.listdir(out / "feedback" / LAB):
        text = (out / "feedback" / LAB / fb).read_text(encoding="utf-8")
        assert "<img" not in text and "<script" not in text
    hint = batch["rows"]["hostile_messages"]["soft_targets hint"]
    assert "HYPERLINK" in hint and "student's message" in hint  # kept, labelled, not at a cell's start


def test_feedback_file_per_student_with_points_and_hints(batch):
    fb = batch["out"] / "feedback" / LAB
    with open(batch["out"] / f"{LAB}.csv", encoding="utf-8", newline="") as f:
        n_rows = len(list(csv.reader(f))) - 1  # every row, look-alike names included
    assert len(os.listdir(fb)) == n_rows > len(batch["rows"])  # "bob"/"bob " each get their own file
    text = (fb / "forge_checks.md").read_text(encoding="utf-8")
    assert f"Total: 0 / {batch['rows']['forge_checks']['max']}" in text and "## soft\\_targets: 0 / 1" in text

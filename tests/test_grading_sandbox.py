"""The sandbox around a submission's kernel (kdcourse.grading.sandbox),
tested directly: what code inside can see, write, reach and leave behind.

Each test runs a few lines of Python under :func:`sandbox.launch` exactly as
the grader starts a kernel. Without bubblewrap the tests skip with the reason,
unless ``KDCOURSE_REQUIRE_SANDBOX=1`` (CI), where they fail."""
from __future__ import annotations

import inspect
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from kdcourse.grading import sandbox

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _need_sandbox():
    ok, why = sandbox.available()
    if not ok:
        if os.environ.get("KDCOURSE_REQUIRE_SANDBOX") == "1":
            pytest.fail(f"KDCOURSE_REQUIRE_SANDBOX=1 but the sandbox cannot start: {why}")
        pytest.skip(f"bubblewrap sandbox unavailable: {why}")


@pytest.fixture(scope="module")
def copy():
    _need_sandbox()
    from kdcourse.checks import lab1
    from kdcourse.losses import response

    c = sandbox.GradingCopy.make(refuse=[response.kd_loss, response.soft_targets],
                                 quiet=[lab1.check_kd_loss, lab1.check_soft_targets])
    yield c
    c.remove()


def run_inside(code: str, copy, *, limits=None, workdir=None, timeout=120, use_sandbox=True, env=None):
    """Run ``code`` in a kernel-like process; returns (returncode, stdout, stderr)."""
    proc = sandbox.launch([sys.executable, "-c", code], workdir, env or {}, limits, sandbox=use_sandbox,
                          package=copy, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        sandbox.kill(proc)
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def report(code: str, copy, **kw) -> dict:
    """Run ``code`` that fills a dict ``R``; return it (from the last line of stdout)."""
    rc, out, err = run_inside("import json, os, sys\nR = {}\n" + code + "\nprint('\\n' + json.dumps(R))", copy, **kw)
    assert rc == 0, f"exit {rc}: {err[-2000:]}"
    return json.loads(out.strip().splitlines()[-1])


def test_an_unprivileged_user_without_capabilities(copy):
    r = report("R['ids'] = [os.getuid(), os.geteuid(), os.getgid()]\n"
               "R['caps'] = [l.split()[1] for l in open('/proc/self/status') if l.startswith(('CapEff', 'CapPrm'))]\n"
               "R['nnp'] = [l.split()[1] for l in open('/proc/self/status') if l.startswith('NoNewPrivs')]", copy)
    assert r["ids"] == [65534, 65534, 65534]
    assert r["caps"] == ["0000000000000000", "0000000000000000"]
    assert r["nnp"] == ["1"]


def test_the_course_folder_is_out_of_sight_and_the_package_is_the_grading_copy(copy, tmp_path):
    (tmp_path / "submissions").mkdir()
    (tmp_path / "submissions" / "classmate.ipynb").write_text("{}")
    secret = [os.path.join(ROOT, "solutions", "01_classic_kd.ipynb"), os.path.join(ROOT, "kdcourse", "losses"),
              os.path.join(ROOT, ".git"), str(tmp_path / "submissions" / "classmate.ipynb"),
              os.path.expanduser("~/.bashrc"), os.path.expanduser("~/.cache"), "/proc/1/cwd/solutions", "/sys/kernel"]
    secret = [p for p in secret if os.path.exists(p) and not p.startswith("/proc")] + ["/proc/1/cwd/solutions"]
    assert len(secret) >= 5  # the host sees them
    r = report(f"""
import kdcourse, importlib.metadata as md
R['file'] = kdcourse.__file__
R['seen'] = [p for p in {secret!r} if os.path.exists(p) and os.listdir(p) if os.path.isdir(p)] + \\
            [p for p in {secret!r} if os.path.isfile(p)]
R['pythonpath'] = os.environ.get('PYTHONPATH')
try:
    R['direct_url'] = md.distribution('kdcourse').read_text('direct_url.json')
except Exception as e:
    R['direct_url'] = type(e).__name__
R['root'] = sorted(os.listdir('/'))
R['cwd'] = os.getcwd()
R['home'] = os.listdir(os.path.expanduser('~'))
R['tmp'] = os.listdir('/tmp')
""", copy)
    assert r["file"] == sandbox.PACKAGE_MOUNT + "/kdcourse/__init__.py"
    assert r["seen"] == []
    assert r["pythonpath"] == sandbox.PACKAGE_MOUNT
    assert r["direct_url"] in ("PackageNotFoundError", None) or ROOT not in r["direct_url"]
    # /tmp is the sandbox's own; the only entry it may show is the mount point
    # of the read-only interpreter/venv when those live under the host's /tmp
    # (a course cloned there); the course's own files stay hidden (``seen``).
    mounts = {os.path.realpath(q).split("/")[2] for q in (sys.prefix, sys.base_prefix)
              if os.path.realpath(q).startswith("/tmp/")}
    assert r["cwd"] == sandbox.WORKDIR and r["home"] == ["work"] and set(r["tmp"]) <= mounts
    # the host's temp folder (where pytest keeps these files) is not the sandbox's
    assert not any(p in r["root"] for p in ("sys", "mnt", "srv", "var"))


def test_nothing_outside_can_be_written(copy, tmp_path):
    targets = [os.path.join(ROOT, "kdcourse", "checks", "lab1.py"), os.path.join(ROOT, "sitecustomize.py"),
               os.path.join(ROOT, "solutions", "01_classic_kd.ipynb"), os.path.join(ROOT, ".git", "hooks", "pre-commit"),
               os.path.expanduser("~/.bashrc"), sandbox.PACKAGE_MOUNT + "/kdcourse/checks/lab1.py",
               sandbox.PACKAGE_MOUNT + "/sitecustomize.py", sys.executable, "/etc/passwd", "/usr/lib/attack.txt",
               os.path.join(sys.prefix, "lib", "sitecustomize.py")]
    before = {t: (os.path.getmtime(t), os.path.getsize(t)) for t in targets if os.path.exists(t)}
    r = report(f"""
R['written'] = []
for t in {targets!r}:
    try:
        os.makedirs(os.path.dirname(t), exist_ok=True)
        with open(t, 'a') as f:
            f.write('# planted by a submission\\n')
        R['written'].append(t)
    except OSError:
        pass
""", copy)
    after = {t: (os.path.getmtime(t), os.path.getsize(t)) for t in targets if os.path.exists(t)}
    assert after == before  # nothing on the host changed, nothing new appeared
    # whatever the sandbox could create lives only in its own throw-away root
    assert all(not t.startswith(("/usr", "/etc", sandbox.PACKAGE_MOUNT, sys.prefix)) for t in r["written"]), r


def test_the_reference_answers_refuse_and_their_source_is_not_in_the_copy(copy):
    from kdcourse.losses import response

    r = report("""
import torch
import kdcourse.losses as L
from kdcourse.losses import response
from kdcourse.checks import lab1
R['refused'] = []
for f in (L.kd_loss, response.kd_loss, L.soft_targets):
    try:
        f(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    except RuntimeError as e:
        R['refused'].append(str(e))
R['check'] = lab1.check_kd_loss(lambda *a, **k: 0)
R['source'] = open(response.__file__).read()
""", copy)
    assert len(r["refused"]) == 3 and all(sandbox.REFUSAL_MARK in m for m in r["refused"])
    assert r["check"] is True
    body = inspect.getsource(response.kd_loss).split('"""')[-1]
    lines = [ln.strip() for ln in body.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert lines and not any(ln in r["source"] for ln in lines if len(ln) > 25)


def test_no_network_not_even_the_hosts_loopback(copy):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        r = report(f"""
import socket
try:
    socket.create_connection(('127.0.0.1', {port}), timeout=3)
    R['connected'] = True
except OSError as e:
    R['connected'] = False
R['interfaces'] = [n for _, n in socket.if_nameindex()]
""", copy)
    finally:
        server.close()
    assert r["connected"] is False
    assert r["interfaces"] == ["lo"]


def test_own_pid_namespace_the_grader_cannot_be_signalled(copy):
    me = os.getpid()
    r = report(f"""
import signal
R['ppid'] = os.getppid()
R['pids'] = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())
try:
    os.kill({me}, 0)
    R['sees_grader'] = True
except ProcessLookupError:
    R['sees_grader'] = False
try:
    os.kill(os.getppid(), signal.SIGTERM)
    R['parent'] = 'signalled'
except OSError as e:
    R['parent'] = e.errno
""", copy)
    assert r["sees_grader"] is False
    assert r["ppid"] == 1 and max(r["pids"]) < 50
    assert r["parent"] in ("signalled", 1)  # the sandbox's own init at most (EPERM when it is another user's)
    assert os.getpid() == me  # the grader is still here


def test_a_detached_process_does_not_outlive_the_sandbox(copy, tmp_path):
    marker = f"kdcourse-detached-{os.getpid()}-{time.time_ns()}"
    code = f"""
import os, sys, time, subprocess
subprocess.Popen([sys.executable, '-c', 'import os, time\\nos.setsid()\\nif os.fork() == 0:\\n    while True: time.sleep(0.1)\\n', {marker!r}],
                 start_new_session=True)
time.sleep(1.0)
print('started', flush=True)
time.sleep(3600)
"""
    proc = sandbox.launch([sys.executable, "-c", code], None, {}, None, package=copy)
    try:
        assert proc.stdout.readline().strip() == b"started"

        def alive():
            found = []
            for p in os.listdir("/proc"):
                try:
                    with open(f"/proc/{p}/cmdline", "rb") as f:
                        if marker.encode() in f.read():
                            found.append(p)
                except OSError:
                    pass
            return found
        assert alive(), "the detached grandchild should be running before the kill"
    finally:
        sandbox.kill(proc)
    deadline = time.monotonic() + 10
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert alive() == []


def test_memory_cpu_and_tmpfs_limits(copy):
    r = report("""
try:
    x = bytearray(6 * 2**30)
    R['memory'] = 'allocated'
except MemoryError:
    R['memory'] = 'MemoryError'
try:
    with open('/tmp/big', 'wb') as f:
        for _ in range(80):
            f.write(b'x' * 2**20)
    R['tmp'] = 'written'
except OSError as e:
    R['tmp'] = e.errno
""", copy, limits=sandbox.Limits(tmp_size=32 * 2**20))
    assert r["memory"] == "MemoryError"
    assert r["tmp"] == 28  # ENOSPC: the tmpfs is capped
    t0 = time.monotonic()
    rc, _, _ = run_inside("while True:\n    pass", copy, limits=sandbox.Limits(cpu_seconds=1), timeout=60)
    assert rc != 0 and time.monotonic() - t0 < 30  # SIGXCPU, then SIGKILL at the hard limit


def test_a_bound_workdir_is_the_only_writable_host_folder(copy, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    r = report("open('answer.txt', 'w').write('42')\nR['cwd'] = os.getcwd()", copy, workdir=str(work))
    assert r["cwd"] == sandbox.WORKDIR and (work / "answer.txt").read_text() == "42"


def test_without_the_sandbox_the_limits_and_the_copy_still_apply(copy, tmp_path):
    r = report("import kdcourse, resource\nR['file'] = kdcourse.__file__\n"
               "R['as'] = resource.getrlimit(resource.RLIMIT_AS)[0]", copy, use_sandbox=False, workdir=str(tmp_path))
    assert r["file"] == os.path.join(copy.root, "kdcourse", "__init__.py")
    assert r["as"] == sandbox.Limits().address_space


def test_unavailable_sandbox_says_why_and_how_to_fix(monkeypatch):
    monkeypatch.setattr(sandbox, "BWRAP", "no-such-bwrap-binary")
    monkeypatch.setattr(sandbox, "_AVAILABLE", None)
    ok, why = sandbox.available()
    assert not ok and "ensure_bubblewrap.sh" in why and "--no-sandbox" in why
    with pytest.raises(sandbox.SandboxUnavailable):
        sandbox.launch([sys.executable, "-c", "pass"])
    monkeypatch.setattr(sandbox, "_AVAILABLE", None)


def test_grading_copy_rejects_what_it_cannot_replace():
    with pytest.raises(ValueError, match="not defined in the kdcourse package"):
        sandbox.GradingCopy.make(refuse=[json.dumps])


def test_kill_all_stops_every_live_kernel(copy):
    procs = [sandbox.launch([sys.executable, "-c", "import time; time.sleep(3600)"], package=copy) for _ in range(2)]
    sandbox.kill_all()
    assert all(p.poll() is not None for p in procs)
    assert sandbox._LIVE == set()


def test_every_labs_declarations_make_a_grading_copy_and_a_class_answer_refuses():
    from kdcourse.checks import contract

    labs = [n for n in range(1, 10) if contract.exercises_for(n)]
    assert len(labs) >= 5
    for n in labs:
        ex = contract.exercises_for(n)
        refuse = [f for e in ex for f in e.refused_functions()]
        with sandbox.GradingCopy.make(refuse=refuse, quiet=[e.check for e in ex]) as c:
            assert sum(map(len, c.replaced.values())) >= len(refuse) > 0, n
    classes = [f for n in labs for e in contract.exercises_for(n) for f in e.refused_functions() if isinstance(f, type)]
    if classes:
        cls = classes[0]
        with sandbox.GradingCopy.make(refuse=[cls]) as c:
            rc = subprocess.run([sys.executable, "-c", f"import {cls.__module__} as m\ntry:\n    m.{cls.__name__}()\n"
                                 f"except RuntimeError as e:\n    print(e)"], capture_output=True, text=True,
                                env={**os.environ, "PYTHONPATH": c.root}, cwd=c.root, timeout=120)
            assert sandbox.REFUSAL_MARK in rc.stdout, rc.stderr[-1000:]


def test_lab3_mask_tokens_may_not_delegate_to_the_packages_masking():
    # the package's MLM objectives mask with review_tokens.mask_tokens; an answer that calls it (under any of its
    # import paths) or its 80/10/10 step must be refused in the grading kernel like a reference answer
    from kdcourse.checks import contract

    ex = contract.exercises_for(3)
    refuse = [f for e in ex for f in e.refused_functions()]
    code = """
import torch
from kdcourse.data import review_tokens, reviews
import kdcourse.transformers_kd as tk
ids = torch.randint(5, 50, (4, 12))
for name, call in (("reviews", lambda: reviews.mask_tokens(ids, 50, torch.Generator())),
                   ("transformers_kd", lambda: tk.mask_tokens(ids, 50, torch.Generator())),
                   ("replace_picked", lambda: review_tokens.replace_picked(ids, ids > 20, 50, torch.Generator()))):
    try:
        call()
        print(name, "ran")
    except RuntimeError as e:
        print(name, e)
"""
    with sandbox.GradingCopy.make(refuse=refuse) as c:
        rc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": c.root}, cwd=c.root, timeout=120)
    lines = rc.stdout.splitlines()
    assert len(lines) == 3 and all(sandbox.REFUSAL_MARK in ln for ln in lines), (rc.stdout, rc.stderr[-1000:])

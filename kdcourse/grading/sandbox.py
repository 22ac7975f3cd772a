"""Where a submission's code runs: a bubblewrap sandbox around its kernel.

    copy = GradingCopy.make(refuse=[lab1.kd_loss_reference], quiet=[lab1.check_kd_loss])
    proc = launch([sys.executable, "-m", "kdcourse.grading.runner"], None, env, Limits(),
                  package=copy)          # -> subprocess.Popen (stdin/stdout are pipes)
    ...
    kill(proc)                            # the whole sandbox, every process in it

What the kernel sees (``launch(..., sandbox=True)``, the default)
    * ``/usr`` (with ``/bin``, ``/lib*`` as in the host), ``/etc``, the Python
      installation and the virtual environment: read-only, at their usual
      paths. Nothing else of the host: not the course folder (when the venv
      lives in it, only the venv is bound), the solutions, the submissions, the
      output folder, ``/proc`` of the host, ``/sys`` or the grader's home.
    * The *grading copy* of the package (:class:`GradingCopy`, made once per
      batch), read-only at ``/opt/kdcourse-grading`` and first on
      ``PYTHONPATH``; the editable-install hook that would point at the course
      folder is hidden, and so is an installed copy of the package. In the
      copy the reference answers of the lab's exercises refuse to run (their
      bodies are replaced: the source of the answer is not in the copy) and
      the visible ``check_*`` functions print a line and return ``True``: what
      the student's cells call decides nothing; the grader decides in its own
      process from the probes' plain data.
    * Its own empty ``/tmp`` and home (``/home/student``, the working
      directory ``/home/student/work`` unless ``workdir`` is bound there),
      both size-limited tmpfs; a minimal ``/dev``.
    * No network (``--unshare-net``: not even loopback to other kernels), its
      own PID namespace (``--unshare-pid``: it cannot see or signal the
      grader; ``os.getppid()`` is the sandbox's init), IPC and UTS
      namespaces; ``--die-with-parent`` and a new session. When the sandbox's
      init dies the kernel kills every process left in the namespace, so a
      ``setsid``/double-fork child cannot outlive :func:`kill`.
    * An unprivileged user: uid/gid 65534. When the grader runs as root the
      sandbox drops to 65534 for real (``setresuid`` after the mounts; no
      capabilities, ``no_new_privs``); otherwise an unprivileged user
      namespace maps 65534 inside to the instructor outside, with no
      capabilities on the host.
    * Limits (:class:`Limits`, ``setrlimit`` before ``bwrap`` starts, inherited
      by everything inside): address space (torch alone reserves about 3 GB,
      so 5 GiB), CPU seconds, file size, open files, processes.

``sandbox=False`` (the instructor's explicit ``--no-sandbox``) runs the same
command without bubblewrap (still its own session, the limits and the
grading copy first on ``PYTHONPATH``): only for trusted notebooks.
:func:`available` says whether the sandbox can start on this machine and,
when not, why; the batch refuses untrusted work in that case.
"""
from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass

from .grading_copy import QUIET_MARK, REFUSAL_MARK, GradingCopy, _package_dir  # noqa: F401  (re-exported)

SANDBOX_UID = 65534
SANDBOX_GID = 65534
HOME = "/home/student"
WORKDIR = HOME + "/work"
PACKAGE_MOUNT = "/opt/kdcourse-grading"
BWRAP = os.environ.get("KDCOURSE_BWRAP", "bwrap")
GiB = 2**30

_LIVE: set = set()
_LIVE_LOCK = threading.Lock()


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot create its namespaces here."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one kernel (``setrlimit``; 0 means unlimited)."""

    address_space: int = 5 * GiB  # bytes of virtual memory per process
    cpu_seconds: int = 900  # CPU time per process (all threads together)
    file_size: int = 512 * 2**20  # bytes of one written file
    open_files: int = 1024
    processes: int = 4096  # RLIMIT_NPROC (counted per user: all kernels of a batch together)
    tmp_size: int = 1 * GiB  # bytes of each tmpfs (/tmp, the home)


# --------------------------------------------------------------------------
# The grading copy of the package
# --------------------------------------------------------------------------

def _preexec(limits: Limits):
    def apply():
        for what, value in ((resource.RLIMIT_AS, limits.address_space), (resource.RLIMIT_CPU, limits.cpu_seconds),
                            (resource.RLIMIT_FSIZE, limits.file_size), (resource.RLIMIT_NOFILE, limits.open_files),
                            (resource.RLIMIT_NPROC, limits.processes), (resource.RLIMIT_CORE, 0)):
            if value or what == resource.RLIMIT_CORE:
                soft, hard = resource.getrlimit(what)
                new = value if hard == resource.RLIM_INFINITY else min(value, hard)
                resource.setrlimit(what, (new, new))
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return apply


def _dirs(path: str, made: set, args: list) -> None:
    """``--dir`` for every missing ancestor of a mount point, world-readable
    (bubblewrap would otherwise copy the host's 0700 ``/root``)."""
    parts = os.path.normpath(path).split(os.sep)[1:-1]
    for k in range(1, len(parts) + 1):
        d = "/" + "/".join(parts[:k])
        if d not in made:
            made.add(d)
            args += ["--perms", "0755", "--dir", d]


def _system_binds(made: set) -> list:
    args = ["--ro-bind", "/usr", "/usr"]
    made.add("/usr")
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        p = "/" + name
        if os.path.islink(p):
            args += ["--symlink", os.readlink(p), p]
        elif os.path.isdir(p):
            args += ["--ro-bind", p, p]
        made.add(p)
    args += ["--ro-bind", "/etc", "/etc"]
    made.add("/etc")
    return args


def _python_roots() -> list[str]:
    """Folders the interpreter needs: the base installation and the venv."""
    roots = []
    for p in (sys.base_prefix, sys.prefix, os.path.dirname(os.path.realpath(sys.executable))):
        p = os.path.realpath(p)
        if p.startswith("/usr/") or p == "/usr" or any(p == r or p.startswith(r + "/") for r in roots):
            continue
        roots = [r for r in roots if not r.startswith(p + "/")] + [p]
    return roots


def _hidden_in(roots: list[str]) -> list[str]:
    """Files and folders under the bound roots that lead back to the course
    folder or hold an uncopied package: the editable hook, direct_url.json,
    an installed kdcourse."""
    import sysconfig

    hide = []
    pkg = _package_dir()
    sites = {os.path.realpath(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")}
    for root in roots:
        if pkg == root or pkg.startswith(root + "/"):
            hide.append(pkg)
    for base in sites:
        if not any(base == r or base.startswith(r + "/") for r in roots) or not os.path.isdir(base):
            continue
        for f in os.listdir(base):
            low = f.lower()
            if "kdcourse" in low and (low.startswith("__editable__") or low.endswith((".dist-info", ".egg-info",
                                                                                     ".egg-link"))):
                hide.append(os.path.join(base, f))
    return sorted(set(hide))


def bwrap_args(workdir: str | None, limits: Limits, package: GradingCopy | None, read_only=()) -> list:
    """The bubblewrap command line (without the command) for one kernel."""
    made: set = {"/"}
    args = [BWRAP, "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--hostname", "grading"]
    root = os.geteuid() == 0
    if root:
        args += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_GID)]
    args += _system_binds(made)
    args += ["--proc", "/proc", "--dev", "/dev",
             "--perms", "1777", "--size", str(limits.tmp_size), "--tmpfs", "/tmp"]
    made.update({"/proc", "/dev", "/tmp"})
    _dirs(HOME + "/x", made, args)
    args += ["--perms", "0777", "--size", str(limits.tmp_size), "--tmpfs", HOME]
    made.add(HOME)
    roots = _python_roots()
    for r in roots:
        _dirs(r, made, args)
        args += ["--ro-bind", r, r]
        made.add(r)
    for h in _hidden_in(roots):
        args += (["--tmpfs", h] if os.path.isdir(h) else ["--ro-bind", "/dev/null", h])
    if package is not None:
        _dirs(PACKAGE_MOUNT + "/x", made, args)
        args += ["--ro-bind", package.root, PACKAGE_MOUNT]
    for p in read_only:
        p = os.path.realpath(p)
        _dirs(p, made, args)
        args += ["--ro-bind", p, p]
    if workdir is not None:
        if root:
            os.chown(workdir, SANDBOX_UID, SANDBOX_GID)
        args += ["--bind", workdir, WORKDIR]
    else:
        args += ["--perms", "0777", "--dir", WORKDIR]
    args += ["--chdir", WORKDIR]
    if root:  # mounts done: become uid 65534 for real (capabilities go with uid 0)
        args += [sys.executable, "-I", "-S", "-c",
                 f"import os,sys;os.setgroups([]);os.setresgid({SANDBOX_GID},{SANDBOX_GID},{SANDBOX_GID});"
                 f"os.setresuid({SANDBOX_UID},{SANDBOX_UID},{SANDBOX_UID});os.execv(sys.argv[1],sys.argv[1:])"]
    return args


def sandbox_env(env: dict | None, package: GradingCopy | None, sandbox: bool = True) -> dict:
    """The kernel's environment: what the caller gives, plus a fixed home,
    temp folder, and the grading copy first on ``PYTHONPATH`` (the host's
    ``PYTHONPATH`` is never passed on)."""
    out = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONNOUSERSITE": "1",
           "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if sandbox:
        out.update({"HOME": HOME, "TMPDIR": "/tmp", "MPLCONFIGDIR": "/tmp/matplotlib",
                    "IPYTHONDIR": "/tmp/ipython", "XDG_CACHE_HOME": "/tmp/cache"})
    out.update(env or {})
    out.pop("PYTHONPATH", None)
    out.pop("PYTHONSTARTUP", None)
    out.pop("PYTHONHOME", None)
    if package is not None:
        out["PYTHONPATH"] = PACKAGE_MOUNT if sandbox else package.root
    return out


def launch(argv, workdir: str | None = None, env: dict | None = None, limits: Limits | None = None, *,
           sandbox: bool = True, package: GradingCopy | None = None, read_only=(),
           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) -> subprocess.Popen:
    """Start ``argv`` (e.g. ``[sys.executable, "-m", "kdcourse.grading.runner"]``)
    as one submission's kernel; returns the :class:`subprocess.Popen`.

    ``workdir``: a host folder bound read-write as the kernel's working
    directory (``None``: an empty folder in the sandbox's tmpfs). ``env``:
    variables to set (``PYTHONPATH`` is the grading copy's, never the
    caller's). ``read_only``: host folders the kernel may read (e.g. a shared
    teacher cache), at their own paths. ``sandbox=False`` runs without
    bubblewrap (``--no-sandbox``). Raises :class:`SandboxUnavailable` when
    bubblewrap cannot run. Stop it with :func:`kill`."""
    limits = limits or Limits()
    argv = [str(a) for a in argv]
    if sandbox:
        ok, why = available()
        if not ok:
            raise SandboxUnavailable(why)
        cmd = bwrap_args(workdir, limits, package, read_only) + argv
        cwd = None
    else:
        cmd, cwd = argv, workdir
    proc = subprocess.Popen(cmd, cwd=cwd, env=sandbox_env(env, package, sandbox), stdin=stdin, stdout=stdout,
                            stderr=stderr, preexec_fn=_preexec(limits), start_new_session=True, close_fds=True)
    with _LIVE_LOCK:
        _LIVE.add(proc)
    return proc


def kill(proc: subprocess.Popen, wait: float = 10.0) -> None:
    """Kill a kernel and everything it started: SIGKILL to its process group
    (with the sandbox: bwrap, whose death takes its PID namespace along)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except OSError:
        pass
    try:
        proc.wait(timeout=wait)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
        pass
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        try:
            if stream:
                stream.close()
        except OSError:
            pass
    with _LIVE_LOCK:
        _LIVE.discard(proc)


def kill_all() -> None:
    """Kill every kernel :func:`launch` started and has not seen killed (on
    SIGTERM/SIGINT or at the end of a batch)."""
    with _LIVE_LOCK:
        live = list(_LIVE)
    for proc in live:
        kill(proc, wait=2.0)


_AVAILABLE: tuple | None = None


def available(refresh: bool = False) -> tuple[bool, str]:
    """``(True, "")`` when a bubblewrap sandbox starts here, else
    ``(False, reason)`` (the reason names the fix)."""
    global _AVAILABLE
    if _AVAILABLE is not None and not refresh:
        return _AVAILABLE
    if shutil.which(BWRAP) is None:
        _AVAILABLE = (False, f"bubblewrap ({BWRAP}) is not installed: run scripts/ensure_bubblewrap.sh "
                             f"(apt-get install bubblewrap), or pass --no-sandbox for trusted notebooks only")
        return _AVAILABLE
    cmd = bwrap_args(None, Limits(), None) + [sys.executable, "-I", "-S", "-c", "import os; print(os.getuid())"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=sandbox_env({}, None),
                           preexec_fn=_preexec(Limits()))
        ok = r.returncode == 0 and r.stdout.strip() == str(SANDBOX_UID)
        why = "" if ok else (f"bubblewrap cannot start a sandbox here (exit {r.returncode}: "
                             f"{(r.stderr or r.stdout).strip()[:300]}); unprivileged user namespaces may be "
                             f"disabled (sysctl kernel.unprivileged_userns_clone / "
                             f"kernel.apparmor_restrict_unprivileged_userns), or pass --no-sandbox for trusted notebooks only")
    except (OSError, subprocess.TimeoutExpired) as exc:
        ok, why = False, f"bubblewrap failed to start: {exc}"
    _AVAILABLE = (ok, why)
    return _AVAILABLE

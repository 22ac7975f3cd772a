"""The grader's end of the pipe to one runner (:mod:`kdcourse.grading.runner`):
JSON lines out, JSON lines in, each read with a deadline and a size cap;
the kernel's end can send anything, and anything that is not a JSON object
ends the session."""
from __future__ import annotations

import json
import os
import selectors
import subprocess
import time

MAX_LINE = 64 * 2 ** 20  # bytes of one protocol line


class KernelGone(RuntimeError):
    pass


class Session:
    """One runner process: send JSON lines, read JSON lines with deadlines."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self._buf = b""
        self._sel = selectors.DefaultSelector()
        self._sel.register(proc.stdout, selectors.EVENT_READ)
        self._fd = proc.stdout.fileno()

    def send(self, msg: dict) -> None:
        try:
            self.proc.stdin.write((json.dumps(msg) + "\n").encode("utf-8"))
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError) as exc:
            raise KernelGone("the kernel stopped reading (it exited or was killed)") from exc

    def read(self, timeout: float) -> dict | None:
        """The next message, ``None`` at the deadline; :class:`KernelGone` at EOF
        or on a line that is not a JSON object."""
        end = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = end - time.monotonic()
            if left <= 0:
                return None
            if not self._sel.select(min(left, 1.0)):
                continue
            chunk = os.read(self._fd, 1 << 20)
            if not chunk:
                raise KernelGone("the kernel exited (it crashed, ran out of memory or time, or called exit)")
            self._buf += chunk
            if len(self._buf) > MAX_LINE:
                raise KernelGone(f"the kernel sent a message over {MAX_LINE // 2 ** 20} MB")
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            msg = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise KernelGone("the kernel sent something that is not a JSON message") from exc
        if not isinstance(msg, dict):
            raise KernelGone("the kernel sent something that is not a JSON message")
        return msg

    def wait_started(self, timeout: float) -> None:
        """Wait for the runner's first message, ``{"event": "started"}``
        (sent after its own imports, before any student code):
        :class:`KernelGone` when it does not come within ``timeout``."""
        msg = self.read(timeout)
        if msg is None:
            raise KernelGone(f"the kernel did not start in {timeout:g} s")
        if msg.get("event") != "started":
            raise KernelGone("the kernel's first message was not 'started'")

    def close(self, kill) -> None:
        try:
            self._sel.close()
        finally:
            kill(self.proc)


def plain_launch(argv, workdir=None, env=None, **_kw) -> subprocess.Popen:
    """Run the runner as a plain subprocess (no sandbox: trusted notebooks,
    tests). Same interface as the batch's sandboxed launcher."""
    from . import sandbox

    return sandbox.launch(argv, workdir, env, sandbox=False)


def kill_kernel(proc) -> None:
    from . import sandbox

    sandbox.kill(proc)



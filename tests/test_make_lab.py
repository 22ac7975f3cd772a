"""`make lab` starts JupyterLab headless, as root or not: the server it starts
answers on 127.0.0.1 with the first lab page."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lab_command(port: int) -> list[str]:
    """The exact command line `make lab` runs (read with `make -n`)."""
    out = subprocess.run(["make", "-n", "--no-print-directory", "lab", f"PORT={port}", f"VENV={sys.prefix}"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    lines = [line for line in out.splitlines() if re.search(r"/jupyter lab ", line)]
    assert len(lines) == 1, out
    return shlex.split(lines[0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_make_lab_command_is_headless_and_root_safe():
    cmd = _lab_command(8888)
    assert "--no-browser" in cmd and "--ip=127.0.0.1" in cmd and cmd[-1] == "labs/01_classic_kd.ipynb"
    assert ("--allow-root" in cmd) == (os.geteuid() == 0)  # only where Jupyter would refuse without it


@pytest.mark.notebooks
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_lab_serves_the_first_lab(tmp_path):
    port = _free_port()
    cmd = _lab_command(port)
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
               JUPYTER_DATA_DIR=str(tmp_path / "data"), BROWSER="false")
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        token, deadline = None, time.time() + 120
        while token is None and time.time() < deadline:
            assert proc.poll() is None, "jupyter lab exited:\n" + (tmp_path / "server.log").read_text()
            m = re.search(rf"http://127\.0\.0\.1:{port}/lab\S*\?token=(\w+)", (tmp_path / "server.log").read_text())
            token = m.group(1) if m else None
            time.sleep(0.5)
        assert token, "no URL with a token in the server's output:\n" + (tmp_path / "server.log").read_text()
        url = f"http://127.0.0.1:{port}/lab/tree/labs/01_classic_kd.ipynb?token={token}"
        with urllib.request.urlopen(url, timeout=30) as resp:
            page = resp.read().decode("utf-8", "replace")
        assert resp.status == 200 and "JupyterLab" in page
        api = f"http://127.0.0.1:{port}/api/contents/labs/01_classic_kd.ipynb?content=0&token={token}"
        with urllib.request.urlopen(api, timeout=30) as resp:
            assert b'"type": "notebook"' in resp.read().replace(b'"type":"notebook"', b'"type": "notebook"')
    finally:
        os.kill(proc.pid, signal.SIGTERM)  # the server we started, by its PID
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()

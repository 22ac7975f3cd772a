"""Execute notebooks (papermill / nbclient) the way CI, the benchmarks and the
course report do, and read an executed notebook's cell timings."""
from __future__ import annotations

import contextlib
import os
import tempfile
import time

from . import nbio


@contextlib.contextmanager
def _patched_environ(env: dict | None):
    """Set ``env`` in ``os.environ`` for the block; restore the old values after."""
    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def execute(path: str, profile: str = "smoke", cwd: str | None = None, parameters: dict | None = None,
            timeout: int = 600, env: dict | None = None) -> dict:
    """Run a notebook top to bottom with papermill (``PROFILE`` injected);
    returns the executed notebook as a dict. Raises on the first error."""
    import papermill as pm

    params = {"PROFILE": profile, **(parameters or {})}
    with _patched_environ(env), tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.ipynb")
        t0 = time.perf_counter()
        try:
            pm.execute_notebook(path, out, parameters=params, cwd=cwd or os.path.dirname(os.path.abspath(path)),
                                kernel_name="python3", progress_bar=False, execution_timeout=timeout, log_output=False)
        except pm.PapermillExecutionError as exc:  # keep the outputs up to the failure for reports
            if os.path.exists(out):
                exc.notebook = nbio.read(out)
            raise
        nb = nbio.read(out)
        nb.setdefault("metadata", {})["kdcourse_seconds"] = time.perf_counter() - t0
        return nb


def run_all_allow_errors(path: str, cwd: str | None = None, timeout: int = 600, env: dict | None = None) -> list[dict]:
    """Execute every cell of a notebook, continuing after errors (JupyterLab's
    "Run All" does stop at the first error; this runs further so a test sees
    every cell). Returns ``[{"index", "error"}]`` for cells that raised."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    with _patched_environ(env):
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=True,
                                resources={"metadata": {"path": cwd or os.path.dirname(os.path.abspath(path))}})
        client.execute()
    errors = []
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                errors.append({"index": i, "error": out.get("ename"), "value": out.get("evalue")})
    return errors


def slowest_cells(nb: dict, n: int = 5) -> str:
    """``"#12 (## 3. Teacher vs …) 61 s, …"``: the ``n`` code cells that took
    longest in an executed notebook (papermill's per-cell durations), each
    with the heading it sits under."""
    heading, rows = "", []
    for i, cell in enumerate(nb.get("cells", [])):
        src = cell.get("source", "")
        src = "".join(src) if isinstance(src, list) else src
        if cell.get("cell_type") == "markdown":
            heads = [line.lstrip("#").strip() for line in src.splitlines() if line.startswith("#")]
            heading = heads[-1] if heads else heading
        elif cell.get("cell_type") == "code":
            sec = (cell.get("metadata", {}).get("papermill") or {}).get("duration")
            if sec is not None:
                rows.append((float(sec), i, heading))
    rows.sort(reverse=True)
    return ", ".join(f"#{i} ({h[:30]}) {sec:.0f} s" for sec, i, h in rows[:n]) or "no cell timings"

"""Execute notebooks (papermill / nbclient) the way CI, the grader and the
course report do."""
from __future__ import annotations

import os
import tempfile
import time

from . import labgen


def execute(path: str, profile: str = "smoke", cwd: str | None = None, parameters: dict | None = None,
            timeout: int = 600, env: dict | None = None) -> dict:
    """Run a notebook top to bottom with papermill (``PROFILE`` injected);
    returns the executed notebook as a dict. Raises on the first error."""
    import papermill as pm

    params = {"PROFILE": profile, **(parameters or {})}
    old_env = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "out.ipynb")
            t0 = time.perf_counter()
            try:
                pm.execute_notebook(path, out, parameters=params, cwd=cwd or os.path.dirname(os.path.abspath(path)),
                                    kernel_name="python3", progress_bar=False, execution_timeout=timeout, log_output=False)
            except pm.PapermillExecutionError as exc:  # keep the outputs up to the failure for reports
                if os.path.exists(out):
                    exc.notebook = labgen.read(out)
                raise
            nb = labgen.read(out)
            nb.setdefault("metadata", {})["kdcourse_seconds"] = time.perf_counter() - t0
            return nb
    finally:
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_all_allow_errors(path: str, cwd: str | None = None, timeout: int = 600, env: dict | None = None) -> list[dict]:
    """Execute every cell of a notebook, continuing after errors (JupyterLab's
    "Run All" does stop at the first error; this runs further so a test sees
    every cell). Returns ``[{"index", "error"}]`` for cells that raised."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    old_env = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=True,
                                resources={"metadata": {"path": cwd or os.path.dirname(os.path.abspath(path))}})
        client.execute()
    finally:
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    errors = []
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                errors.append({"index": i, "error": out.get("ename"), "value": out.get("evalue")})
    return errors

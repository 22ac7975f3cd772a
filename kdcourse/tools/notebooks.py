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


# --------------------------------------------------------------------------
# nbval's comparison of marked outputs, on a notebook executed once
# --------------------------------------------------------------------------

#: Output keys nbval (0.11) leaves out of the comparison; images too (nbval
#: compares them only with nbdime).
NBVAL_SKIP_COMPARE = ("metadata", "traceback", "prompt_number", "output_type", "name", "execution_count",
                      "application/vnd.jupyter.widget-view+json", "image/png", "image/jpeg")
_COMMENT_MARKERS = {"PYTEST_VALIDATE_IGNORE_OUTPUT": ("check", False), "NBVAL_IGNORE_OUTPUT": ("check", False),
                    "NBVAL_CHECK_OUTPUT": ("check", True), "NBVAL_RAISES_EXCEPTION": ("check_exception", True),
                    "NBVAL_SKIP": ("skip", True)}
_TAG_MARKERS = {**{k.lower().replace("_", "-"): v for k, v in _COMMENT_MARKERS.items()},
                "raises-exception": ("check_exception", True)}


def _text(value):
    return "".join(value) if isinstance(value, list) else value


def nbval_options(cell: dict) -> dict:
    """nbval's options for a code cell under ``--nbval-lax``: ``check``
    (compare outputs), ``skip``, ``check_exception``. Tags first, then
    comment lines (``# NBVAL_CHECK_OUTPUT`` alone on a comment line), which
    win; unmarked cells are not compared."""
    options = {"check": False, "skip": False, "check_exception": False}
    for tag in cell.get("metadata", {}).get("tags", []) or []:
        if tag in _TAG_MARKERS:
            key, value = _TAG_MARKERS[tag]
            options[key] = value
    for line in _text(cell.get("source", "")).splitlines():
        line = line.strip()
        if line.startswith("#") and line.lstrip("#").strip() in _COMMENT_MARKERS:
            key, value = _COMMENT_MARKERS[line.lstrip("#").strip()]
            options[key] = value
    return options


def _coalesce_streams(outputs: list[dict]) -> list[dict]:
    """Streams of one name merged into one, the text before a carriage
    return dropped (nbval's ``coalesce_streams``)."""
    import re

    merged, streams = [], {}
    for out in outputs:
        out = {k: _text(v) if k == "text" else v for k, v in out.items()}
        if out.get("output_type") == "stream":
            if out.get("name") in streams:
                streams[out["name"]]["text"] += out["text"]
                continue
            streams[out.get("name")] = out
        merged.append(out)
    for out in streams.values():  # nbval's backspace loop never runs (its condition starts false): none here either
        out["text"] = re.sub(r"^.*\r(?=[^\n])", "", out["text"], flags=re.MULTILINE)
    return merged


def _flatten(outputs: list[dict]) -> dict[str, list]:
    """nbval's key -> values view: a stream's text under its name, every
    other key (``data`` flattened to its MIME types) but the skipped ones."""
    flat: dict[str, list] = {}
    for out in _coalesce_streams(outputs):
        if out.get("output_type") == "stream":
            out = {"output_type": "stream", out.get("name"): out.get("text", "")}
        for key, value in out.items():
            if key in NBVAL_SKIP_COMPARE:
                continue
            items = value.items() if key == "data" else [(key, value)]
            for k, v in items:
                if k not in NBVAL_SKIP_COMPARE:
                    flat.setdefault(k, []).append(_text(v))
    return flat


def compare_outputs(executed: list[dict], reference: list[dict]) -> str | None:
    """``None`` when nbval would accept ``executed`` for a cell whose stored
    outputs are ``reference``; else what differs."""
    test, ref = _flatten(executed), _flatten(reference)
    if set(ref) - set(test):
        return f"missing output fields from running code: {sorted(set(ref) - set(test))}"
    if set(test) - set(ref):
        return f"unexpected output fields from running code: {sorted(set(test) - set(ref))}"
    for key, ref_values in ref.items():
        if len(test[key]) != len(ref_values):
            return f"dissimilar number of outputs for {key!r}: stored {ref_values!r}, got {test[key]!r}"
        for r, t in zip(ref_values, test[key]):
            if r != t:
                return f"{key!r} differs:\n--- stored\n{r}\n+++ this run\n{t}"
    return None


def checked_output_differences(executed: dict, reference: dict) -> tuple[int, list[str]]:
    """Compare an executed copy of ``reference`` with the outputs stored in
    it, as ``pytest --nbval-lax`` does, without executing it again.

    Cells pair up by position (papermill's injected parameters cell left
    out) and must have the same source. Returns ``(cells compared,
    problems)``. What nbval would treat specially in a run of its own —
    ``NBVAL_SKIP`` (not executed) and ``NBVAL_RAISES_EXCEPTION`` (an error
    allowed) — is a problem here: the shared execution runs every cell and
    stops at any error."""
    def code(nb):
        return [c for c in nb.get("cells", []) if c.get("cell_type") == "code"
                and "injected-parameters" not in (c.get("metadata", {}).get("tags") or [])]

    ref_cells, run_cells = code(reference), code(executed)
    if len(ref_cells) != len(run_cells):
        return 0, [f"the executed notebook has {len(run_cells)} code cells, the stored one {len(ref_cells)}"]
    compared, problems = 0, []
    for i, (ref, run) in enumerate(zip(ref_cells, run_cells)):
        if _text(ref.get("source", "")) != _text(run.get("source", "")):
            problems.append(f"code cell {i}: the executed source differs from the stored one")
            continue
        opts = nbval_options(ref)
        if opts["skip"] or opts["check_exception"]:
            problems.append(f"code cell {i} is marked to be skipped or to raise: not supported by the shared execution")
            continue
        if ref.get("execution_count") is None:
            if ref.get("outputs"):
                problems.append(f"code cell {i}: unrun reference cell has outputs (execution_count is null)")
            continue  # nbval compares nothing for a cell that never ran
        if opts["check"]:
            compared += 1
            diff = compare_outputs(run.get("outputs", []), ref.get("outputs", []))
            if diff:
                first = next((ln for ln in _text(ref["source"]).splitlines() if "NBVAL" not in ln), "")
                problems.append(f"code cell {i} ({first[:60]}): cell outputs differ: {diff}")
    return compared, problems

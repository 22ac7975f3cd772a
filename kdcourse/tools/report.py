"""The course report: run every solution notebook, keep what it measured.

    python -m kdcourse report --profile laptop --out report/

executes each ``solutions/NN_*.ipynb`` top to bottom in the chosen profile
(:func:`kdcourse.notebooks.execute`, one notebook after the other, each in a
temporary working folder) and writes

* ``report/report.md`` — per notebook: its runtime, then, under the heading
  of the section it belongs to, every figure it printed (text output,
  Markdown tables) and every plot;
* ``report/figures/<notebook>/cellNN-K.png`` — the plots, extracted from the
  notebook's outputs;
* ``report/results.json`` — the same, machine-readable.

The README's results tables are filled from this report, so each of its
numbers comes from a run anyone can repeat with the command above. Widget
outputs (interactive only) and stderr (warnings, progress bars) are left out.
A notebook that fails is reported with its error, the others still run, and
the command exits with status 1.
"""
from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import platform
import re
import shutil
import tempfile
import time

from .. import labgen

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# reprs that are not results: figures, artists, and the True a passing check returns
_BORING = re.compile(r"^(<Figure size [^>]*>|<matplotlib\.[^>]*>|\[<matplotlib\.[^\]]*\]|Text\(.*\)|None|True)$", re.S)
_WIDGET = "application/vnd.jupyter.widget-view+json"


def _heading(md: str) -> str | None:
    """The last Markdown heading in a cell (``## 3. Teacher vs ...``)."""
    found = None
    for line in md.split("\n"):
        m = re.match(r"^(#{1,4})\s+(.*\S)\s*$", line)
        if m:
            found = m.group(2)
    return found


def _text(value) -> str:
    return _ANSI.sub("", "".join(value) if isinstance(value, list) else str(value)).replace("\r\n", "\n")


def extract(nb: dict, name: str, figures_dir: str, link_prefix: str) -> list[dict]:
    """The measured outputs of an executed notebook, in order, each as
    ``{"cell", "heading", "kind": "stream"|"text"|"markdown"|"image"|"error", ...}``;
    PNG images are written to ``figures_dir``."""
    items, heading = [], None
    # numbered as in the source notebook (papermill's injected parameters cell left out)
    cells = [c for c in nb["cells"] if "injected-parameters" not in c.get("metadata", {}).get("tags", [])]
    for i, cell in enumerate(cells):
        if cell["cell_type"] == "markdown":
            heading = _heading(labgen.source(cell)) or heading
            continue
        if cell["cell_type"] != "code":
            continue
        n_img = 0
        for out in cell.get("outputs", []):
            kind = out.get("output_type")
            if kind == "stream":
                text = _text(out.get("text", ""))
                if out.get("name") != "stdout" or not text.strip():
                    continue
                last = items[-1] if items else None
                if last and last["cell"] == i and last["kind"] == "stream":  # one block per cell's printout
                    last["text"] += text
                else:
                    items.append({"cell": i, "heading": heading, "kind": "stream", "text": text})
            elif kind in ("display_data", "execute_result"):
                data = out.get("data", {})
                if _WIDGET in data:
                    continue
                if "image/png" in data:
                    n_img += 1
                    os.makedirs(figures_dir, exist_ok=True)
                    fname = f"cell{i:02d}-{n_img}.png"
                    with open(os.path.join(figures_dir, fname), "wb") as f:
                        f.write(base64.b64decode(_text(data["image/png"])))
                    items.append({"cell": i, "heading": heading, "kind": "image", "path": f"{link_prefix}/{fname}"})
                elif "text/markdown" in data:
                    items.append({"cell": i, "heading": heading, "kind": "markdown", "text": _text(data["text/markdown"]).strip()})
                elif "text/plain" in data:
                    text = _text(data["text/plain"]).strip()
                    if text and not _BORING.match(text):
                        items.append({"cell": i, "heading": heading, "kind": "text", "text": text})
            elif kind == "error":
                items.append({"cell": i, "heading": heading, "kind": "error",
                              "text": f"{out.get('ename', 'Error')}: {_text(out.get('evalue', ''))}"})
    for it in items:
        if it["kind"] == "stream":
            it["text"] = it["text"].strip("\n")
    return items


def _environment(profile: str) -> dict:
    import torch

    from .. import runtime

    return {"profile": profile, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "device": str(runtime.device()),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform()}


def run_all(paths: list[str], profile: str, out_dir: str, timeout: int = 3600, cache: str | None = None,
            log=None) -> dict:
    """Execute ``paths`` in ``profile``; write figures under ``out_dir`` and
    return the results (see :func:`write_report`)."""
    from .notebooks import execute, slowest_cells

    log = log or (lambda msg: print(msg, flush=True))
    results = {"environment": _environment(profile), "notebooks": []}
    env = {"KDCOURSE_PROFILE": profile, "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    if cache:
        env["KDCOURSE_CACHE"] = os.path.abspath(cache)
    for path in paths:
        name = os.path.splitext(os.path.basename(path))[0]
        fig_dir = os.path.join(out_dir, "figures", name)
        shutil.rmtree(fig_dir, ignore_errors=True)
        log(f"running {path} (profile {profile}) ...")
        entry = {"name": name, "path": path, "status": "ok", "seconds": None, "slowest": None, "error": None, "items": []}
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="kdreport-") as cwd:
            try:
                nb = execute(path, profile=profile, cwd=cwd, env=env, timeout=timeout)
                entry["seconds"] = nb.get("metadata", {}).get("kdcourse_seconds", time.perf_counter() - t0)
                entry["items"] = extract(nb, name, fig_dir, f"figures/{name}")
                entry["slowest"] = slowest_cells(nb)
            except Exception as exc:  # the report says what failed; the other notebooks still run
                entry["status"] = "failed"
                entry["seconds"] = time.perf_counter() - t0
                ename = getattr(exc, "ename", type(exc).__name__)
                evalue = getattr(exc, "evalue", str(exc))
                cell = getattr(exc, "exec_count", None)
                entry["error"] = f"{ename}: {_text(evalue)[-2000:]}" + (f" (execution count {cell})" if cell else "")
        log(f"  {entry['status']} in {entry['seconds']:.1f} s" + (f": {entry['error'][:300]}" if entry["error"] else ""))
        results["notebooks"].append(entry)
    return results


def _fence(text: str) -> str:
    ticks = "```"
    while ticks in text:
        ticks += "`"
    return f"{ticks}text\n{text}\n{ticks}"


def write_report(results: dict, out_dir: str, command: str) -> str:
    """Write ``report.md`` and ``results.json`` in ``out_dir``; return the
    Markdown path."""
    os.makedirs(out_dir, exist_ok=True)
    env = results["environment"]
    lines = [
        "# kdcourse — course report", "",
        f"Every solution notebook executed top to bottom in profile `{env['profile']}` on {env['date']}: "
        f"Python {env['python']}, torch {env['torch']}, device `{env['device']}`, {env['cpu_count']} CPU(s) "
        f"({env['torch_threads']} torch threads), {env['platform']}.", "",
        f"Reproduce with `{command}`. Runtimes are wall-clock seconds for the whole notebook "
        "(teachers trained on the first run and cached afterwards — a second run is faster) "
        "and depend on the machine and on what else it was running.", "",
        "| notebook | status | runtime (s) | outputs | plots |", "|---|---|---|---|---|",
    ]
    for nb in results["notebooks"]:
        n_img = sum(1 for it in nb["items"] if it["kind"] == "image")
        lines.append(f"| [{nb['name']}](#{nb['name'].lower()}) | {nb['status']} | "
                     f"{nb['seconds']:.1f} | {len(nb['items']) - n_img} | {n_img} |")
    for nb in results["notebooks"]:
        lines += ["", f"## {nb['name']}", "", f"`{nb['path']}` — {nb['status']} in {nb['seconds']:.1f} s."
                  + (f" Slowest cells: {nb['slowest']}." if nb.get("slowest") else "")]
        if nb["error"]:
            lines += ["", "**Failed:**", "", _fence(nb["error"])]
        heading = object()
        for it in nb["items"]:
            if it["heading"] != heading:
                heading = it["heading"]
                if heading:
                    lines += ["", f"### {heading}"]
            lines.append("")
            if it["kind"] == "image":
                lines.append(f"![cell {it['cell']}]({it['path']})")
            elif it["kind"] == "markdown":
                lines.append(it["text"])
            elif it["kind"] == "error":
                lines.append(f"**error in cell {it['cell']}:** `{it['text']}`")
            else:
                lines.append(_fence(it["text"]))
    md_path = os.path.join(out_dir, "report.md")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, ensure_ascii=False)
    return md_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Run every solution notebook in a profile and write a Markdown report of what it measured."
    parser.add_argument("--profile", default="laptop", help="smoke, laptop (default) or full")
    parser.add_argument("--out", default="report", help="output folder (default: report)")
    parser.add_argument("--solutions", default="solutions", help="folder of solution notebooks (default: solutions)")
    parser.add_argument("--only", action="append", default=[],
                        help="run only notebooks whose name contains this text (repeatable), e.g. --only 01")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell (default 3600)")
    parser.add_argument("--cache", default=None,
                        help="teacher cache folder (default: $KDCOURSE_CACHE or ~/.cache/kdcourse, so teachers are reused)")


def main(args) -> int:
    from ..profiles import PROFILES

    if args.profile not in PROFILES:
        print(f"error: --profile {args.profile!r} is not known; use one of {sorted(PROFILES)}")
        return 2
    if not os.path.isdir(args.solutions):
        print(f"error: solutions folder {args.solutions!r} does not exist")
        return 2
    paths = labgen.solution_notebooks(args.solutions)
    if args.only:
        paths = [p for p in paths if any(s in os.path.basename(p) for s in args.only)]
    if not paths:
        print(f"error: no solution notebooks (NN_name.ipynb) in {args.solutions!r}"
              + (f" matching {args.only}" if args.only else ""))
        return 2
    command = f"python -m kdcourse report --profile {args.profile}" + "".join(f" --only {s}" for s in args.only)
    results = run_all(paths, args.profile, args.out, timeout=args.timeout, cache=args.cache)
    md = write_report(results, args.out, command)
    failed = [nb["name"] for nb in results["notebooks"] if nb["status"] != "ok"]
    print(f"wrote {md}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0

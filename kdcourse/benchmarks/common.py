"""What every lab benchmark shares: timing a solution notebook's "Run All" and
the command-line tail (``--profile``, ``--repeats``, ``--only``)."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from ..tools.notebooks import slowest_cells  # noqa: F401  (re-exported: benchmarks read it here)


def run_all(notebook: str, profile: str, cache: str | None = None, label: str = "") -> float:
    """Execute ``notebook`` top to bottom in ``profile`` (a fresh kernel, a
    temporary working folder, ``$KDCOURSE_CACHE`` = ``cache`` when given),
    print its wall time and return it in seconds. Raises on a failing cell."""
    from ..tools.notebooks import execute, slowest_cells

    env = {"MPLBACKEND": "Agg"}
    if cache is not None:
        env["KDCOURSE_CACHE"] = cache
    name = os.path.basename(notebook).split("_")[0]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kdcourse-bench-nb-") as cwd:
        nb = execute(notebook, profile=profile, cwd=cwd, env=env, timeout=3600)
    seconds = time.perf_counter() - t0
    print(f"Lab {name.lstrip('0')} Run All, profile {profile}{', ' + label if label else ''}: {seconds:.0f} s "
          f"(load average now {os.getloadavg()[0]:.1f}); slowest cells: {slowest_cells(nb)}", flush=True)
    return seconds


def smoke_run_all(notebook: str) -> float:
    """Run All in the smoke profile from an empty teacher cache."""
    with tempfile.TemporaryDirectory(prefix="kdcourse-bench-smoke-") as cache:
        return run_all(notebook, "smoke", cache=cache, label="empty cache")


def cli(main, parts: tuple, doc: str | None, all_parts: tuple | None = None, extras: dict | None = None) -> None:
    """``python -m kdcourse.benchmarks.labN [--profile P] [--repeats R] [--only a,b]``;
    ``extras`` maps further option names to ``add_argument`` keywords, passed
    to ``main`` as keyword arguments."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="laptop")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default=",".join(parts), help="comma-separated subset of " + ",".join(all_parts or parts))
    for name, kwargs in (extras or {}).items():
        ap.add_argument(f"--{name}", **kwargs)
    a = ap.parse_args()
    only = tuple(p for p in a.only.split(",") if p)
    unknown = sorted(set(only) - set(all_parts or parts))
    if unknown:
        ap.error(f"--only: unknown part(s) {', '.join(unknown)}; choose from {', '.join(all_parts or parts)}")
    sys.exit(main(a.profile, a.repeats, only, **{name: getattr(a, name) for name in (extras or {})}))

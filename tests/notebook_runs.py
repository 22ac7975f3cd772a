"""The notebook executions of one test session, two at a time.

Each solution (papermill, smoke profile) and each untouched lab (every cell,
past errors) is executed once per session, in its own worker process: one
notebook kernel keeps one core busy, so two run side by side on the course's
2-core machines. A process of its own per notebook because executing one
changes process-wide state (the working directory, the environment its
kernel inherits). Only the notebooks the selected tests ask for are run;
the solutions go first, so the labs find the teachers they trained in the
session's one teacher cache."""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

JOBS = max(1, int(os.environ.get("KDCOURSE_NOTEBOOK_JOBS", "2")))


def run(kind: str, path: str, cwd: str, env: dict, timeout: int) -> tuple:
    """``(result, None)`` or ``(None, error text)``, in a worker process."""
    from kdcourse.tools.notebooks import execute, run_all_allow_errors

    try:
        if kind == "solution":
            return execute(path, profile="smoke", cwd=cwd, env=env, timeout=timeout), None
        return run_all_allow_errors(path, cwd=cwd, env=env, timeout=timeout), None
    except Exception as exc:  # noqa: BLE001 - reported to every test that uses this notebook
        return None, f"{type(exc).__name__}: {exc}"


class NotebookRuns:
    """``runs.get(kind, path)``: the result of the session's one execution of
    ``path`` (``kind`` "solution" or "lab"), started for every selected
    notebook when the first is asked for."""

    def __init__(self, wanted: list, env: dict, mktemp, timeout: int = 900):
        # two kernels of two threads each on two cores spend their time
        # contending (3.5x the CPU time, twice the wall time, measured): with
        # two at a time, each kernel's torch gets one thread
        one = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} if JOBS > 1 else {}
        self.wanted, self.env, self.mktemp, self.timeout = wanted, {**env, **one}, mktemp, timeout
        self.pool, self.futures = None, {}

    def _submit(self, key) -> None:
        kind, path = key
        cwd = str(self.mktemp(f"run-{kind}-" + os.path.splitext(os.path.basename(path))[0]))
        self.futures[key] = self.pool.submit(run, kind, path, cwd, self.env, self.timeout)

    def get(self, kind: str, path: str) -> tuple:
        if self.pool is None:
            self.pool = ProcessPoolExecutor(max_workers=JOBS, mp_context=multiprocessing.get_context("spawn"),
                                            max_tasks_per_child=1)
            for key in sorted(self.wanted, key=lambda k: (k[0] != "solution", k[1])):
                self._submit(key)
        if (kind, path) not in self.futures:
            self._submit((kind, path))
        return self.futures[(kind, path)].result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

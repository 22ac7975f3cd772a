import os

import pytest
import torch

# Tests never download and never touch a user's cache.
os.environ.setdefault("KDCOURSE_DEVICE", "cpu")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KDCOURSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KDCOURSE_DATA", str(tmp_path / "data"))
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def notebook_env(tmp_path_factory):
    """The environment every notebook of this run executes in: the smoke
    profile and ONE teacher cache for the whole session (empty at its start,
    never a student's), so a teacher the first notebook trains is reused by
    every later one, as in a class that runs the labs in order."""
    return {"KDCOURSE_PROFILE": "smoke", "KDCOURSE_CACHE": str(tmp_path_factory.mktemp("teacher-cache")),
            "MPLBACKEND": "Agg"}


@pytest.fixture(scope="session")
def executed_solution(tmp_path_factory, notebook_env):
    """``executed_solution(path)``: the solution notebook at ``path`` executed
    once per session (papermill, smoke profile), shared by the notebook test
    and the nbval comparison. A failed execution fails every test that asks
    for it, with the error and the outputs up to it."""
    from kdcourse.tools.notebooks import execute

    done: dict[str, tuple] = {}

    def run(path: str) -> dict:
        if path not in done:
            cwd = tmp_path_factory.mktemp("run-" + os.path.splitext(os.path.basename(path))[0])
            try:
                done[path] = (execute(path, profile="smoke", cwd=str(cwd), env=notebook_env, timeout=900), None)
            except Exception as exc:  # noqa: BLE001 - reported to every test that uses this notebook
                done[path] = (None, f"{type(exc).__name__}: {exc}")
        nb, error = done[path]
        if error is not None:
            pytest.fail(f"{os.path.basename(path)} did not execute in the smoke profile:\n{error[-6000:]}", pytrace=False)
        return nb

    return run
